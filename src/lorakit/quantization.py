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

from collections.abc import Sequence

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.quantized import (
    NF4_BLOCK_SIZE,
    NF4_SCALER_BLOCK_SIZE,
    SCHEMES,
    FrozenLinear,
    QuantizedLinear,
    Scheme,
    _nf4_module,
    dequantized_weight,
    is_quantized,
    nf4_scaler_block,
    plain_linear,
    quantization_error,
    quantization_of,
    quantized_bytes,
    stored_bytes,
)
from lorakit.state import find_state
from lorakit.targeting import names_module

# The names of lorakit.quantized again on purpose: this is the public module, quantized the leaf
# that layers and kernels import without the state machinery.
__all__ = [
    "NF4_BLOCK_SIZE",
    "NF4_SCALER_BLOCK_SIZE",
    "SCHEMES",
    "FrozenLinear",
    "QuantizedLinear",
    "Scheme",
    "dequantize",
    "dequantized_weight",
    "is_quantized",
    "linears_to_quantize",
    "nf4_scaler_block",
    "plain_linear",
    "quantization_error",
    "quantization_of",
    "quantize",
    "quantized_bytes",
    "stored_bytes",
]


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
    chosen = linears_to_quantize(model, scheme, skip, include_head=include_head)
    replacements = {path: QuantizedLinear.from_linear(m, scheme) for path, m in chosen.items()}
    for path, new in replacements.items():
        model.set_submodule(path, new)
    _own_memory(model)
    return model


def linears_to_quantize(
    model: nn.Module, scheme: str = "nf4", skip: Sequence[str] = (), *, include_head: bool = False
) -> dict[str, nn.Linear]:
    """The linear layers `quantize(model, scheme, skip, include_head=...)` replaces, checked first.

    Every `nn.Linear` but the output head (`get_output_embeddings`, unless `include_head`) and the
    modules `skip` names. Nothing is changed; the weights may be on the meta device (the streaming
    loader asks before it reads any: `lorakit.models.streaming`).

    Returns:
        Module path → layer, in `named_modules` order.

    Raises:
        ConfigError, MissingExtraError: as `quantize` documents (checked in the same order).
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    already = quantization_of(model)
    if already is not None:
        raise ConfigError(f"this model is already quantized ({already}); load it again to quantize it another way")
    if find_state(model) is not None:
        raise ConfigError("this model carries LoRA adapters; quantize the base first, then inject or load adapters")
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    linears = {path: m for path, m in model.named_modules() if isinstance(m, nn.Linear) and path}
    unused = [s for s in skip if not any(names_module(p, s) for p in linears)]
    if unused:
        raise ConfigError(f"skip entries {unused} name no linear layer of this model")
    chosen = {
        path: m
        for path, m in linears.items()
        if (include_head or m is not head) and not any(names_module(path, s) for s in skip)
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
    return chosen


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
