"""Frozen low-precision bases: the linear layers' weights stored as NF4 (QLoRA) or bf16.

QLoRA (Dettmers et al., 2023) trains LoRA adapters over a base whose weights are frozen in 4-bit
NormalFloat: 64-weight blocks, each with an absmax scaler, the scalers themselves quantized to 8
bits in blocks of 256 ("double quantization") — about 0.52 bytes a weight, 0.13× fp32. Where a
weight's number of 64-blocks is not a multiple of 256 (SmolLM2's 576×576 attention projections
have 5,184), the scalers are grouped in the largest power of two that divides it instead. The
weights come from torchao's `NF4Tensor` (its import path moved in torchao 0.18; both are tried).
`bf16` stores the weights in bfloat16 (0.5× fp32). Under either scheme the input embeddings and the
output head are stored in bf16 beside them (`QuantizedEmbedding`, and a `QuantizedLinear` with
`stores_table`; a tied head keeps sharing the embeddings' table), as QLoRA keeps them in its 16-bit
compute dtype: at SmolLM2-135M's 49,152-token vocabulary the fp32 table is 113 MB beside 55 MB of
NF4 linear weights, at Qwen2.5-0.5B's 151,936 tokens (untied) 1,090 MB beside 190 MB. Rows and
logits are still computed in the model's dtype (the chunked loss converts the head a vocabulary
slice at a time); `quantize(..., tables=False)` keeps them as they are.

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
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.quantized import (
    NF4_BLOCK_SIZE,
    NF4_SCALER_BLOCK_SIZE,
    SCHEMES,
    FrozenLinear,
    QuantizedEmbedding,
    QuantizedLinear,
    Scheme,
    _nf4_module,
    dequantized_weight,
    is_quantized,
    nf4_scaler_block,
    plain_embedding,
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
    "QuantizedEmbedding",
    "QuantizedLinear",
    "Scheme",
    "TablesToStore",
    "dequantize",
    "dequantized_weight",
    "is_quantized",
    "linears_to_quantize",
    "nf4_scaler_block",
    "plain_embedding",
    "plain_linear",
    "quantization_error",
    "quantization_of",
    "quantize",
    "quantized_bytes",
    "storage_summary",
    "store_tables",
    "stored_bytes",
    "tables_to_store",
]


def quantize(
    model: nn.Module,
    scheme: str = "nf4",
    skip: Sequence[str] = (),
    *,
    include_head: bool = False,
    tables: bool = True,
) -> nn.Module:
    """Store the frozen weights of the model's linear layers as NF4 or bf16, in place.

    Every `nn.Linear` is replaced by a `QuantizedLinear` except the output head (unless
    `include_head`) and the modules `skip` names; the input embeddings and the output head are
    stored in bf16 (with `tables`, see the module docstring); norms keep their precision. Every
    layer is checked before any is replaced, so an error leaves the model as it was.

    Args:
        model: a model without lorakit adapters (quantize first, then `lorakit.inject`).
        scheme: `"nf4"` (QLoRA: 4-bit NormalFloat, blocks of 64, double quantization) or `"bf16"`.
        skip: module-name suffixes (whole dotted segments, as `target_modules`) to leave as they are.
        include_head: quantize the output head too (with `scheme`, not in bf16).
        tables: store the input embeddings and the output head in bf16 (a plain `nn.Embedding` and
            `nn.Linear` in a wider dtype; a tied head only along with its embeddings).

    Returns:
        The same model object.

    Raises:
        ConfigError: an unknown scheme, a model already quantized or carrying adapters, a skip
            entry that names no linear layer, or layers whose size NF4 cannot block (listed).
        MissingExtraError: NF4 without torchao (`pip install 'lorakit[quantize]'`).
    """
    chosen = linears_to_quantize(model, scheme, skip, include_head=include_head)
    plan = tables_to_store(model, chosen, skip) if tables else TablesToStore()
    replacements = {path: QuantizedLinear.from_linear(m, scheme) for path, m in chosen.items()}
    for path, new in replacements.items():
        model.set_submodule(path, new)
    store_tables(model, plan)
    _own_memory(model)
    return model


@dataclass(frozen=True)
class TablesToStore:
    """What `quantize` stores in bf16 beside the linear layers: the input embeddings' and the output
    head's module paths (None: left as they are). Whether the head shares the embeddings' table is
    read from the model when they are stored (`store_tables`)."""

    embeddings: str | None = None
    head: str | None = None


def tables_to_store(model: nn.Module, chosen: dict[str, nn.Linear], skip: Sequence[str] = ()) -> TablesToStore:
    """The tables `quantize` (and the streaming load) store in bf16, given the linear layers `chosen`.

    The input embeddings when they are a plain `nn.Embedding` whose table is wider than 16 bits; the
    output head when it is a plain `nn.Linear` as wide, not among `chosen` (`include_head`), and,
    when tied to the embeddings, only along with them. `skip` names either to leave it. Changes
    nothing; works on the meta device.
    """
    paths = {id(m): p for p, m in model.named_modules() if p}
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embeddings = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None

    def storable(module: nn.Module | None, kind: type) -> str | None:
        if module is None or type(module) is not kind or id(module) not in paths:
            return None
        path = paths[id(module)]
        weight = module.weight
        if not weight.dtype.is_floating_point or weight.element_size() <= 2:
            return None
        return None if any(names_module(path, s) for s in skip) else path

    embeddings_path = storable(embeddings, nn.Embedding)
    head_path = storable(head, nn.Linear)
    tied = head_path is not None and embeddings is not None and head.weight is embeddings.weight
    if head_path in chosen or (tied and embeddings_path is None):
        head_path = None
    return TablesToStore(embeddings_path, head_path)


def storage_summary(model: nn.Module) -> str:
    """How a quantized model's weights are stored, for a user: "linear weights stored as nf4,
    embeddings and head as bf16: 112 MB in all" ("" for a model `quantize` did not touch)."""
    scheme = quantization_of(model)
    if scheme is None:
        return ""
    linear = any(isinstance(m, QuantizedLinear) and not m.stores_table for m in model.modules())
    embeddings = any(isinstance(m, QuantizedEmbedding) for m in model.modules())
    head = any(isinstance(m, QuantizedLinear) and m.stores_table for m in model.modules())
    tables = " and ".join(n for n, on in (("embeddings", embeddings), ("head", head)) if on)
    if linear and tables:
        stored = f"linear weights stored as {scheme}, {tables} as bf16"
    else:
        stored = f"linear weights stored as {scheme}" if linear else f"{tables} stored as bf16"
    return f"{stored}: {quantized_bytes(model) / 1e6:,.0f} MB in all"


def store_tables(model: nn.Module, plan: TablesToStore, original_dtype: torch.dtype | None = None) -> None:
    """Replace the modules `plan` names by their bf16-stored forms, in place (a head tied to the
    embeddings shares their new table). `original_dtype`: the dtype they compute in (default: their
    tables' own dtype)."""
    table = tied = None
    if plan.embeddings is not None:
        old = model.get_submodule(plan.embeddings)
        # Tied as the model is now (a checkpoint holding two different tables unties them on loading).
        tied = plan.head is not None and model.get_submodule(plan.head).weight is old.weight
        embedding = QuantizedEmbedding.from_embedding(old, original_dtype)
        model.set_submodule(plan.embeddings, embedding)
        table = embedding.weight
    if plan.head is not None:
        head = model.get_submodule(plan.head)
        new = QuantizedLinear.from_linear(
            head, "bf16", original_dtype=original_dtype, head=True, table=table if tied else None
        )
        model.set_submodule(plan.head, new)


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
    embeddings = [p for p, m in model.named_modules() if isinstance(m, nn.Embedding) and p]
    unused = [s for s in skip if not any(names_module(p, s) for p in (*linears, *embeddings))]
    if unused:
        raise ConfigError(f"skip entries {unused} name no linear layer or embedding of this model")
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
    quantized = {id(m.weight) for m in model.modules() if is_quantized(m)}
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if id(tensor) not in quantized:
                tensor.data = tensor.data.clone()


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn every `QuantizedLinear` and `QuantizedEmbedding` of `model` back into a plain
    `nn.Linear` / `nn.Embedding`, in place; a head that shared the embeddings' table shares the
    plain one.

    The weights are the dequantized ones (what the model computed with), in `dtype` (default: the
    dtype they had before `quantize`). Not the original full-precision values: those are gone.

    Returns:
        The same model object.
    """
    plain_tables: dict[int, nn.Parameter] = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, QuantizedEmbedding):
            plain = plain_embedding(module, dtype)
            plain_tables[id(module.weight)] = plain.weight
            model.set_submodule(path, plain)
    for path, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            plain = plain_linear(module, dtype)
            if id(module.weight) in plain_tables:
                plain.weight = plain_tables[id(module.weight)]
            model.set_submodule(path, plain)
    return model
