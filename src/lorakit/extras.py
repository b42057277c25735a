"""Optional dependencies: which extra provides what, and a clear error when one is missing.

`pip install lorakit` brings torch, safetensors and tqdm: enough to inject, train, merge, save and
load adapters on any model. The rest comes with extras (`scripts/install.sh` installs them all):

| extra | packages | needed for |
|---|---|---|
| `cli` | transformers, gguf, matplotlib, psutil, pyarrow | `lorakit`: models, tokenizers, plots, free RAM, parquet |
| `eval` | sacrebleu, pycocoevalcap (and a Java runtime) | the E2E NLG scores (BLEU, NIST, METEOR, ROUGE-L, CIDEr) |
| `quantize` | torchao | NF4 bases (QLoRA; `lorakit.quantization`) |
| `serve` | fastapi, uvicorn, prometheus_client | `lorakit serve` (`lorakit.serve`) |
| `tensorboard` | tensorboard | `--report-to tensorboard` (`lorakit.train.reporting`) |
| `mlflow` | mlflow-skinny, sqlalchemy, alembic | `--report-to mlflow`: a local SQLite tracking store |
| `datasets` | datasets | data in a Hugging Face `datasets` folder (`save_to_disk`; local files only) |
| `all` | all of them | |
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from lorakit.errors import MissingExtraError

__all__ = ["EXTRAS", "available", "require", "require_extra"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "cli": ("transformers", "gguf", "matplotlib", "psutil", "pyarrow"),
    "eval": ("sacrebleu", "pycocoevalcap"),
    "quantize": ("torchao",),
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
    "datasets": ("datasets",),
}
"""extra -> the import names of the packages it installs."""


def available(module: str) -> bool:
    """Whether `module` can be imported (found on the path; nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import `module`, which extra `extra` installs.

    Args:
        module: import name, e.g. "sacrebleu".
        extra: the extra that brings it, e.g. "eval".
        what: what needs it, for the message, e.g. "E2E BLEU".

    Returns:
        The module.

    Raises:
        MissingExtraError: it is not installed (the message names the pip command).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(_message([module], extra, what)) from err


def require_extra(extra: str, what: str) -> None:
    """Check, without importing them, that every package of `extra` is installed.

    Raises:
        MissingExtraError: naming the missing packages and the pip command.
    """
    missing = [m for m in EXTRAS[extra] if not available(m)]
    if missing:
        raise MissingExtraError(_message(missing, extra, what))


def _message(missing: list[str], extra: str, what: str) -> str:
    return (
        f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed; "
        f"install the {extra!r} extra: pip install 'lorakit[{extra}]' (or bash scripts/install.sh)"
    )
