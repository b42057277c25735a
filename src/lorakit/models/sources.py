"""Which base model a command loads, and which adapter on top of it (`ModelSource`).

An adapter records the base it was trained on (`base_model_name_or_path`) and the base's
quantization, so `--model` and `--quantize` default to what the adapter was trained with.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from lorakit.io import adapter_base_quantization, check_adapter_files, load_adapter, read_adapter_config
from lorakit.models.loading import Task, load_model
from lorakit.models.packaged import PACKAGED_NAMES
from lorakit.quantization import quantization_error
from lorakit.state import lora_layers

__all__ = ["ModelSource", "adapter_directory", "load_source", "recorded_base"]


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
    recorded = read_adapter_config(adapter_directory(adapter)).base_model_name_or_path
    if recorded in PACKAGED_NAMES.values():  # a packaged model records its upstream id, not its alias
        return next(alias for alias, name in PACKAGED_NAMES.items() if name == recorded)
    if recorded and Path(recorded).exists():
        return recorded
    return None


def _warn_full_precision(model: nn.Module, scheme: str) -> None:
    """Warn that an adapter trained on a quantized base now runs on full-precision weights, naming
    how far those are from the ones it was trained with."""
    error = max((quantization_error(layer.base_layer.weight, scheme) for _, layer in lora_layers(model)), default=0.0)
    warnings.warn(
        f"the adapter was trained on a base stored as {scheme} and runs here on the full-precision weights, "
        f"which differ from the ones it was trained with by up to {error:.3g} (max |W − dequant({scheme}(W))| "
        f"over the adapted layers); pass --quantize auto to use the base it was trained on",
        stacklevel=2,
    )
