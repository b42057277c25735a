"""Speed path `stacked_rows`: a batch whose rows use different adapters in one batched product.

Inside `lorakit.adapter_per_row`, the reference gathers the rows of each adapter, runs its branch
and scatters the result back: one low-rank product per distinct adapter. Without gradients, this
path instead stacks every row's (A, s·B) — zeros for base rows — and runs one `bmm` pair over all
rows, so a batch of 16 different adapters costs what one does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lorakit import functional as LF
from lorakit.kernels.switch import enabled

if TYPE_CHECKING:
    from lorakit.layers import LoraLinear

__all__ = ["forward", "stacks"]


def stacks(layer: LoraLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's (A, s·B), (batch, r, in) and (batch, out, r), when the path applies (else None).

    Applies without gradients, to x with one leading row per name of the routing, when the layer
    is not disabled and every adapter of the batch is a plain one (no fused slices, no DoRA) of one
    dtype.
    All adapters of the batch are stacked once (ranks zero-padded, a zero slot last for base rows)
    and kept in the layer's `kernel_cache` while they are unchanged; the per-row gather is kept for
    the routing block.
    """
    routing = layer.rows
    names = routing.names
    if not enabled("stacked_rows") or layer.disabled or torch.is_grad_enabled():
        return None
    if x.dim() < 2 or x.shape[0] != len(names):
        return None
    present = [n for n in dict.fromkeys(names) if n in layer.adapters]
    records = [layer.adapters[n] for n in present]
    if not records or any(rec.slices is not None or rec.use_dora for rec in records):
        return None
    dtype = records[0].lora_A.dtype
    if any(rec.lora_A.dtype != dtype for rec in records):
        return None
    key = tuple(
        (n, id(rec.lora_A), rec.lora_A._version, id(rec.lora_B), rec.lora_B._version, rec.scaling)
        for n, rec in zip(present, records, strict=True)
    )
    gathered = routing.derived.get(layer)
    if gathered is not None and gathered[0] == key:
        return gathered[1]
    stacked = layer.kernel_cache.get("stacked_rows")
    if stacked is None or stacked[0] != key:
        r = max(rec.r for rec in records)
        A = torch.zeros(len(records) + 1, r, layer.in_features, dtype=dtype, device=x.device)
        B = torch.zeros(len(records) + 1, layer.out_features, r, dtype=dtype, device=x.device)
        for i, rec in enumerate(records):
            A[i, : rec.r] = rec.lora_A
            B[i, :, : rec.r] = rec.lora_B * rec.scaling
        stacked = (key, A, B)
        layer.kernel_cache["stacked_rows"] = stacked
    _, A, B = stacked
    slot = {n: i for i, n in enumerate(present)}
    index = torch.tensor([slot.get(n, len(records)) for n in names], device=x.device)
    result = (A[index], B[index])
    routing.derived[layer] = (key, result)
    return result


def forward(layer: LoraLinear, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """base(x) + each row's branch in one batched product, or None (the reference groups rows)."""
    rows = stacks(layer, x)
    if rows is None:
        return None
    A, B = rows
    result = layer.base_layer(x, *args, **kwargs)
    return result + LF.linear_delta(x.to(A.dtype), A, B).to(result.dtype)
