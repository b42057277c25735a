"""transformers' `from_pretrained` on local files: a model for a task, a tokenizer with a pad token,
and the dtype keyword across transformers versions. transformers is imported when they run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ModelLoadError

__all__ = ["dtype_kwargs", "model_from_dir", "tokenizer_from_dir"]


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The keyword `from_pretrained` takes the weights' dtype by in the installed transformers."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    # `dtype=` replaced `torch_dtype=` in transformers 4.56.
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def model_from_dir(directory: Path, *, task: str, num_labels: int, dtype: torch.dtype) -> nn.Module:
    """The model in `directory` with the Auto class of `task` (`causal-lm`, `classification`, `base`).

    Raises:
        ModelLoadError: transformers cannot load it (the directory and the cause are named).
    """
    import transformers

    kwargs: dict[str, Any] = {"local_files_only": True, **dtype_kwargs(dtype)}
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


def tokenizer_from_dir(directory: Path, *, causal: bool) -> Any:
    """The tokenizer in `directory`; for a causal LM with a pad token (EOS when it has none).

    Raises:
        ModelLoadError: transformers cannot load it.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {directory}: {exc}") from exc
    if causal and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Padding positions are masked out of attention and loss, so reusing EOS is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
