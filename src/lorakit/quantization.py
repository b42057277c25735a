"""Frozen low-precision bases: the linear layers' weights stored as NF4 (QLoRA) or bf16.

QLoRA (Dettmers et al., 2023) trains LoRA adapters over a base whose weights are frozen in 4-bit
NormalFloat: 64-weight blocks, each with an absmax scaler, the scalers themselves quantized to 8
bits in blocks of 256 ("double quantization") — about 0.52 bytes a weight, 0.13× fp32. Where a
weight's number of 64-blocks is not a multiple of 256 (SmolLM2's 576×576 attention projections
have 5,184), the scalers are grouped in the largest power of two that divides it instead. The
weights come from torchao's `NF4Tensor` (its import path moved in torchao 0.18; both are tried).
`bf16` stores the weights in bfloat16 (0.5× fp32).

`quantize(model, scheme)` replaces every `nn.Linear` (but the output head, unless asked) by a
`QuantizedLinear`: still an `nn.Linear`, so `lorakit.inject`, training, generation, saving,
loading and mixed batches work on it unchanged. Its forward dequantizes the weight to the input's
dtype for one product and keeps only the compressed weight for the backward (`FrozenLinear`), so
neither the model at rest nor a training step holds a full-precision copy of a base weight. The
weights never train.

Merging an adapter into a quantized layer writes the dequantized weight plus ΔW in full precision
(`lorakit.merge`), keeping the compressed original to restore exactly on unmerge;
`dequantize(model)` turns every quantized layer back into a plain `nn.Linear`. Nothing is ever
re-quantized silently.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError
from lorakit.extras import require
from lorakit.kernels import nf4 as nf4_kernels

__all__ = [
    "NF4_BLOCK_SIZE",
    "NF4_SCALER_BLOCK_SIZE",
    "SCHEMES",
    "FrozenLinear",
    "QuantizedLinear",
    "dequantize",
    "dequantized_weight",
    "is_quantized",
    "nf4_scaler_block",
    "plain_linear",
    "quantization_error",
    "quantization_of",
    "quantize",
    "quantized_bytes",
    "stored_bytes",
]

Scheme = Literal["nf4", "bf16"]
SCHEMES: tuple[str, ...] = ("nf4", "bf16")
NF4_BLOCK_SIZE = 64
"""Weights per NF4 block, each with its own absmax scaler (QLoRA's default)."""
NF4_SCALER_BLOCK_SIZE = 256
"""Scalers per block of the double quantization (QLoRA's default; smaller where it does not divide)."""


def nf4_scaler_block(numel: int) -> int:
    """The scaler block of a weight of `numel` values: 256, or the largest power of two dividing
    its number of 64-blocks (double quantization needs whole scaler blocks)."""
    blocks = numel // NF4_BLOCK_SIZE
    size = NF4_SCALER_BLOCK_SIZE
    while blocks % size:
        size //= 2
    return size


def _nf4_module():
    """torchao's NF4 pieces: from `torchao.quantization` since 0.18, `torchao.dtypes.nf4tensor` before.

    torchao logs a warning for each GPU kernel library it cannot load on a CPU-only machine, and
    torch one for an Enum it registers; neither matters for NF4, so both are silenced while importing.
    """
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        require("torchao", "quantize", "NF4 quantization")
        try:
            from torchao.quantization import NF4Tensor, to_nf4  # torchao >= 0.18
        except ImportError:  # torchao 0.17 and older
            from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return NF4Tensor, to_nf4


def _is_nf4(tensor: Any) -> bool:
    return type(tensor).__name__ == "NF4Tensor"


class FrozenLinear(torch.autograd.Function):
    """x·Wᵀ with a frozen, compressed W: dequantized to x's dtype in the forward and again in the
    backward; only the compressed W is kept in between (not a full-precision copy per layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, dequantized_weight(weight, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad @ dequantized_weight(weight, grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None


class QuantizedLinear(nn.Linear):
    """An `nn.Linear` whose frozen weight is stored as NF4 or bf16 (see the module docstring).

    y = x·dequant(W)ᵀ + b, computed in x's dtype; the bias stays in its own dtype (and may train,
    e.g. with `LoraConfig(bias="all")`). Build with `QuantizedLinear.from_linear`.

    Attributes:
        scheme: `"nf4"` or `"bf16"`.
        original_dtype: the weight's dtype before quantization (what `dequantize` restores).
    """

    scheme: str = "nf4"
    original_dtype: torch.dtype = torch.float32

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme) -> QuantizedLinear:
        """A quantized copy of `linear` (same device, the weight frozen, the bias kept as is)."""
        weight = linear.weight.detach()
        with torch.device("meta"):  # no throwaway full-size weight
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.scheme, new.original_dtype = scheme, weight.dtype
        if scheme == "nf4":
            _, to_nf4 = _nf4_module()
            stored = to_nf4(weight, NF4_BLOCK_SIZE, nf4_scaler_block(weight.numel()))
        else:
            stored = weight.to(torch.bfloat16)
        new.weight = nn.Parameter(stored, requires_grad=False)
        new.bias = linear.bias
        return new.train(linear.training)  # a layer of an eval-mode model stays in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = FrozenLinear.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme}"


def dequantized_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A quantized (or plain) weight as a dense tensor of `dtype` (default: the weight's nominal dtype)."""
    if _is_nf4(weight):
        return nf4_kernels.dequantize(weight, dtype)
    return weight if dtype is None else weight.to(dtype)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a layer `quantize` made (its weight stored as NF4 or bf16)."""
    return isinstance(module, QuantizedLinear)


def quantization_of(model: nn.Module) -> str | None:
    """The scheme of the model's quantized layers (`"nf4"`, `"bf16"`), or None when none is."""
    return next((m.scheme for m in model.modules() if isinstance(m, QuantizedLinear)), None)


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies as stored (an NF4 weight: its 4-bit codes, scalers and lookup table)."""
    if _is_nf4(tensor):
        inner = (tensor.quantized_data, tensor.quantized_scalers, tensor.quantization_factor, tensor.scaler_mean)
        return sum(t.numel() * t.element_size() for t in (*inner, tensor.nf4))
    return tensor.numel() * tensor.element_size()


def quantized_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters occupy as stored (`stored_bytes` of each)."""
    return sum(stored_bytes(p) for p in module.parameters())


def quantize(
    model: nn.Module, scheme: str = "nf4", skip: Sequence[str] = (), *, include_head: bool = False
) -> nn.Module:
    """Store the frozen weights of the model's linear layers as NF4 or bf16, in place.

    Every `nn.Linear` is replaced by a `QuantizedLinear` except the output head (unless
    `include_head`) and the modules `skip` names; embeddings and norms keep their precision. Every
    layer is checked before any is replaced, so an error leaves the model as it was.

    Args:
        model: a model without lorakit adapters (quantize first, then `lorakit.inject`).
        scheme: `"nf4"` (QLoRA: 4-bit NormalFloat, blocks of 64, double quantization) or `"bf16"`.
        skip: module-name suffixes (whole dotted segments, as `target_modules`) to leave as they are.
        include_head: quantize the output head too.

    Returns:
        The same model object.

    Raises:
        ConfigError: an unknown scheme, a model already quantized or carrying adapters, a skip
            entry that names no linear layer, or layers whose size NF4 cannot block (listed).
        MissingExtraError: NF4 without torchao (`pip install 'lorakit[quantize]'`).
    """
    from lorakit.state import find_state

    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    already = quantization_of(model)
    if already is not None:
        raise ConfigError(f"this model is already quantized ({already}); load it again to quantize it another way")
    if find_state(model) is not None:
        raise ConfigError("this model carries LoRA adapters; quantize the base first, then inject or load adapters")
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    linears = {path: m for path, m in model.named_modules() if isinstance(m, nn.Linear) and path}
    unused = [s for s in skip if not any(p == s or p.endswith("." + s) for p in linears)]
    if unused:
        raise ConfigError(f"skip entries {unused} name no linear layer of this model")
    chosen = {
        path: m
        for path, m in linears.items()
        if (include_head or m is not head) and not any(path == s or path.endswith("." + s) for s in skip)
    }
    if scheme == "nf4":
        _nf4_module()  # a missing torchao is reported before anything changes
        bad = [
            f"{p} ({m.out_features}×{m.in_features})" for p, m in chosen.items() if m.weight.numel() % NF4_BLOCK_SIZE
        ]
        if bad:
            raise ConfigError(
                f"NF4 stores weights in blocks of {NF4_BLOCK_SIZE} values, so a weight's size must be a multiple "
                f"of {NF4_BLOCK_SIZE}; these are not: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. "
                "Pass them in skip= to keep them as they are"
            )
    replacements = {path: QuantizedLinear.from_linear(m, scheme) for path, m in chosen.items()}
    for path, new in replacements.items():
        model.set_submodule(path, new)
    _own_memory(model)
    return model


def _own_memory(model: nn.Module) -> None:
    """Give every tensor of the model but the quantized weights memory of its own.

    transformers maps a safetensors checkpoint into memory, and the mapping lives while any tensor
    uses it: the pages of the full-precision weights `quantize` just read would stay resident (in
    SmolLM2-135M, 400 MB beside 52 MB of NF4 weights). Copying the rest (embeddings, norms, biases,
    buffers; tied weights stay tied) lets the mapping go.
    """
    quantized = {id(m.weight) for m in model.modules() if isinstance(m, QuantizedLinear)}
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if id(tensor) not in quantized:
                tensor.data = tensor.data.clone()


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn every `QuantizedLinear` of `model` back into a plain `nn.Linear`, in place.

    The weights are the dequantized ones (what the model computed with), in `dtype` (default: the
    dtype they had before `quantize`). Not the original full-precision values: those are gone.

    Returns:
        The same model object.
    """
    for path, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            model.set_submodule(path, plain_linear(module, dtype))
    return model


def plain_linear(module: QuantizedLinear, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain `nn.Linear` with `module`'s weight dequantized (in `dtype`, default the weight's dtype
    before quantization) and its bias."""
    weight = dequantized_weight(module.weight.detach(), dtype or module.original_dtype)
    with torch.device("meta"):
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    plain.weight = nn.Parameter(weight.clone(), requires_grad=False)
    plain.bias = module.bias
    return plain.train(module.training)


def quantization_error(weight: torch.Tensor, scheme: str) -> float:
    """max |W − dequant(quant(W))| of one full-precision weight under `scheme`."""
    if scheme == "nf4":
        _, to_nf4 = _nf4_module()
        nf4 = to_nf4(weight.detach(), NF4_BLOCK_SIZE, nf4_scaler_block(weight.numel()))
        restored = dequantized_weight(nf4, weight.dtype)
    else:
        restored = weight.detach().to(torch.bfloat16).to(weight.dtype)
    return float((restored - weight.detach()).abs().max()) if weight.numel() else math.nan
