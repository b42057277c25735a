"""A base layer's weight as the LoRA maths reads it: a dense (out, in) matrix, whatever its layout
(transformers' `Conv1D` stores (in, out)) or storage (NF4 / bf16, `lorakit.quantized`).

A leaf module beneath `layers`, `variants` and `kernels`.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lorakit.quantized import dequantized_weight

__all__ = ["conv1d_type", "dense_weight", "is_conv1d"]


def conv1d_type() -> type[nn.Module] | None:
    """transformers' `Conv1D` (GPT-2 style layers, weight stored (in, out)), or None when it is not loaded.

    Read from `sys.modules`, never imported: a model holding a Conv1D has imported the module that
    defines it, and `import lorakit` stays free of transformers (an extra, slow to import).
    """
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is a transformers `Conv1D` (a linear layer whose weight is (in, out))."""
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """W0 of a linear base layer (`nn.Linear`, `Conv1D`, `QuantizedLinear`) as a dense (out, in)
    tensor outside autograd (a quantized weight dequantized, a Conv1D's transposed)."""
    weight = dequantized_weight(base.weight.detach())
    return weight.T if is_conv1d(base) else weight
