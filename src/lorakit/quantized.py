"""Quantized linear layers, the leaf beneath `lorakit.quantization`: what a layer, a merge or an
export needs to read a weight stored as NF4 or bf16 (`QuantizedLinear`, `dequantized_weight`,
`is_quantized`), without the model-level `quantize` (which needs lorakit's bookkeeping).

See `lorakit.quantization` for what the schemes are and how a model is quantized.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.extras import require
from lorakit.kernels import nf4 as nf4_kernels

__all__ = [
    "NF4_BLOCK_SIZE",
    "NF4_SCALER_BLOCK_SIZE",
    "SCHEMES",
    "FrozenLinear",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "dequantized_weight",
    "is_quantized",
    "nf4_scaler_block",
    "plain_embedding",
    "plain_linear",
    "quantization_error",
    "quantization_of",
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


def _to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as torchao's NF4Tensor in QLoRA's layout (64-blocks, double-quantized scalers),
    made by `kernels.nf4.quantize` (torchao's `to_nf4` when that path is off: the same bits)."""
    nf4_type, to_nf4 = _nf4_module()
    return nf4_kernels.quantize(weight, NF4_BLOCK_SIZE, nf4_scaler_block(weight.numel()), nf4_type, to_nf4)


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
    stores_table: bool = False
    """True for an output head stored in bf16 beside a quantized model's linear layers (its weight
    may be the input embeddings' table: tied weights stay one tensor)."""

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        scheme: Scheme,
        *,
        original_dtype: torch.dtype | None = None,
        head: bool = False,
        table: nn.Parameter | None = None,
    ) -> QuantizedLinear:
        """A quantized copy of `linear` (same device, the weight frozen, the bias kept as is).

        Args:
            linear: the layer.
            scheme: `"nf4"` or `"bf16"`.
            original_dtype: the dtype it computes in (default: its weight's own dtype).
            head: the output head, stored in bf16 beside the linear layers (`stores_table`).
            table: with `head`, a `QuantizedEmbedding`'s bf16 table to take as the weight (a head
                tied to the input embeddings stays tied) instead of a bf16 copy of its own.
        """
        weight = linear.weight.detach()
        with torch.device("meta"):  # no throwaway full-size weight
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.scheme, new.original_dtype = scheme, original_dtype or weight.dtype
        if head:
            new.scheme, new.stores_table = "bf16", True
        if table is not None:
            new.weight = table
        else:
            stored = _to_nf4(weight) if new.scheme == "nf4" else weight.to(torch.bfloat16)
            new.weight = nn.Parameter(stored, requires_grad=False)
        new.bias = linear.bias
        return new.train(linear.training)  # a layer of an eval-mode model stays in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = FrozenLinear.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme}"


class QuantizedEmbedding(nn.Embedding):
    """An `nn.Embedding` whose frozen table is stored in bf16 (the input embeddings of a quantized
    model, under either scheme: QLoRA keeps them in its 16-bit compute dtype, not in NF4).

    The rows looked up are cast to `original_dtype`, the table's dtype before, so the model computes
    in its own dtype as before, with the table's values rounded to bf16. Build with `from_embedding`.
    """

    scheme: str = "bf16"
    original_dtype: torch.dtype = torch.float32

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, original_dtype: torch.dtype | None = None) -> QuantizedEmbedding:
        """A copy of `embedding` with its table in bf16 (same device, frozen).

        Args:
            embedding: a plain `nn.Embedding`.
            original_dtype: the dtype its rows are computed in (default: the table's own dtype; the
                streaming load passes the load dtype, having read the table in bf16 already).
        """
        weight = embedding.weight.detach()
        new = _empty_embedding(cls, embedding)
        new.original_dtype = original_dtype or weight.dtype
        new.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        return new.train(embedding.training)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input).to(self.original_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stored=bf16"


def plain_embedding(module: QuantizedEmbedding, dtype: torch.dtype | None = None) -> nn.Embedding:
    """A plain `nn.Embedding` with `module`'s table in `dtype` (default: its dtype before storage)."""
    plain = _empty_embedding(nn.Embedding, module)
    plain.weight = nn.Parameter(module.weight.detach().to(dtype or module.original_dtype), requires_grad=False)
    return plain.train(module.training)


def _empty_embedding(cls: type[nn.Embedding], like: nn.Embedding) -> nn.Embedding:
    """A `cls` with `like`'s sizes and options and its table on the meta device (no throwaway
    full-size table): the caller sets the weight."""
    with torch.device("meta"):
        return cls(
            like.num_embeddings,
            like.embedding_dim,
            padding_idx=like.padding_idx,
            max_norm=like.max_norm,
            norm_type=like.norm_type,
            scale_grad_by_freq=like.scale_grad_by_freq,
            sparse=like.sparse,
        )


def dequantized_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A quantized (or plain) weight as a dense tensor of `dtype` (default: the weight's nominal dtype)."""
    if _is_nf4(weight):
        return nf4_kernels.dequantize(weight, dtype)
    return weight if dtype is None else weight.to(dtype)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a layer `quantize` made (its weight stored as NF4 or bf16)."""
    return isinstance(module, (QuantizedLinear, QuantizedEmbedding))


def quantization_of(model: nn.Module) -> str | None:
    """The scheme of the model's quantized linear layers (`"nf4"`, `"bf16"`), or None when none is.

    Embeddings and an output head stored in bf16 alongside (`QuantizedLinear.stores_table`) do not
    count: an NF4 model with a bf16 head is an NF4 model."""
    linear = (m.scheme for m in model.modules() if isinstance(m, QuantizedLinear) and not m.stores_table)
    return next(linear, None) or ("bf16" if any(is_quantized(m) for m in model.modules()) else None)


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies as stored (an NF4 weight: its 4-bit codes, scalers and lookup table)."""
    if _is_nf4(tensor):
        inner = (tensor.quantized_data, tensor.quantized_scalers, tensor.quantization_factor, tensor.scaler_mean)
        return sum(t.numel() * t.element_size() for t in (*inner, tensor.nf4))
    return tensor.numel() * tensor.element_size()


def quantized_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters occupy as stored (`stored_bytes` of each)."""
    return sum(stored_bytes(p) for p in module.parameters())


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
        nf4 = _to_nf4(weight.detach())
        restored = dequantized_weight(nf4, weight.dtype)
    else:
        restored = weight.detach().to(torch.bfloat16).to(weight.dtype)
    return float((restored - weight.detach()).abs().max()) if weight.numel() else math.nan
