"""Speed path `stacked_rows`: a batch whose rows use different adapters in one batched product.

Inside `lorakit.adapter_per_row`, the reference gathers the rows of each adapter, runs its branch
and scatters the result back: one low-rank product per distinct adapter. Without gradients, this
path instead stacks every row's (A, s·B) — zeros for base rows — and runs one `bmm` pair over all
rows, so a batch of 16 different adapters costs what one does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import functional as LF
from lorakit.kernels.guards import computes
from lorakit.kernels.switch import enabled
from lorakit.records import AdapterRecord, RowRouting

__all__ = ["DENSE_TOKENS", "forward", "stacks"]

DENSE_TOKENS = 64
"""At most this many tokens in the batch (a decode step), the branch is two dense products over
every adapter's stacked A and B with the other adapters' columns zeroed — no per-row gather of A
and B; more tokens gather each row's own A and B and run a `bmm` pair."""


def stacks(
    x: torch.Tensor, adapters: Mapping[str, AdapterRecord], routing: RowRouting, cache: dict[str, Any], owner: Any
) -> tuple | None:
    """How to compute each row's branch, when the path applies (else None).

    `("gathered", A, B)`: each row's A and s·B, (batch, r, in) and (batch, out, r); or, for at most
    `DENSE_TOKENS` tokens, `("dense", A_all, B_all, select)`: every adapter's A and s·B stacked,
    (adapters·r, in) and (out, adapters·r), and (batch, adapters·r) ones on each row's own columns.

    Args:
        x: the layer's input, one leading row per name of the routing.
        adapters: every adapter of the layer, by name.
        routing: the rows' adapters.
        cache: the layer's cache for this path (the stacked adapters, kept until one changes).
        owner: the key of this layer in `routing.derived`.

    Applies without gradients, to x with one leading row per name of the routing, when every
    adapter of the batch is plain LoRA (`guards.computes`, no fused slices) of one dtype.
    All plain adapters of the layer are stacked once (ranks zero-padded, a zero slot last for base
    rows) and kept in `cache` until one is added, removed or changed — not rebuilt when the set of
    adapters in the batch changes, as it does at every step of a serving engine; the rows' gather
    or selector is kept for the routing block.
    """
    names = routing.names
    if not enabled("stacked_rows") or torch.is_grad_enabled():
        return None
    if x.dim() < 2 or x.shape[0] != len(names):
        return None
    if not any(n in adapters for n in names):
        return None
    # Every plain adapter of the layer, in a stable order (the others take the reference).
    key = tuple(_signature(n, rec) for n, rec in adapters.items() if rec.slices is None and computes(rec))
    gathered = routing.derived.get(owner)
    if gathered is not None and gathered[0] == key:
        return gathered[1]
    present = [k[0] for k in key]
    if any(n in adapters and n not in present for n in names):
        return None
    dtypes = {k[-1] for k in key}
    if len(dtypes) != 1:
        return None
    in_features = x.shape[-1]
    stacked = cache.get("stacked_rows")
    if stacked is None or stacked[0] != key:  # rebuilt only when an adapter is added, removed or changed
        records = [adapters[n] for n in present]
        r = max(rec.r for rec in records)
        out_features = records[0].lora_B.shape[0]
        (dtype,) = dtypes
        A = torch.zeros(len(records) + 1, r, in_features, dtype=dtype, device=x.device)
        B = torch.zeros(len(records) + 1, out_features, r, dtype=dtype, device=x.device)
        for i, rec in enumerate(records):
            A[i, : rec.r] = rec.lora_A
            B[i, :, : rec.r] = rec.lora_B * rec.scaling
        # The dense form for few tokens: every adapter's A as rows of one matrix, B as columns.
        flat_A = A[:-1].reshape(-1, in_features)  # (adapters·r, in)
        flat_B = B[:-1].permute(1, 0, 2).reshape(out_features, -1)  # (out, adapters·r)
        stacked = (key, A, B, flat_A, flat_B)
        cache["stacked_rows"] = stacked
    _, A, B, flat_A, flat_B = stacked
    slot = {n: i for i, n in enumerate(present)}
    index = torch.tensor([slot.get(n, len(present)) for n in names], device=x.device)
    if x.numel() // x.shape[-1] <= DENSE_TOKENS:
        # (rows, adapters·r) selector: 1 on the r columns of each row's own adapter, 0 elsewhere
        r = A.shape[1]
        select = F.one_hot(index, len(present) + 1)[:, :-1].to(A.dtype).repeat_interleave(r, dim=1)
        result: tuple = ("dense", flat_A, flat_B, select)
    else:
        result = ("gathered", A[index], B[index])
    routing.derived[owner] = (key, result)
    return result


def _signature(name: str, record: AdapterRecord) -> tuple:
    """What the stacked copy of one adapter depends on: its tensors (identity and in-place version),
    scaling and dtype."""
    A, B = record.lora_A, record.lora_B
    return (name, id(A), A._version, id(B), B._version, record.scaling, A.dtype)


def forward(
    base: nn.Module,
    x: torch.Tensor,
    adapters: Mapping[str, AdapterRecord],
    routing: RowRouting,
    *,
    cache: dict[str, Any],
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
) -> torch.Tensor | None:
    """base(x) + each row's branch in one batched product, or None (the reference groups rows)."""
    rows = stacks(x, adapters, routing, cache, owner=base)
    if rows is None:
        return None
    result = base(x, *args, **(kwargs or {}))
    if rows[0] == "dense":
        _, flat_A, flat_B, select = rows
        h = x.to(flat_A.dtype).reshape(x.shape[0], -1, x.shape[-1]) @ flat_A.T  # (rows, tokens, adapters·r)
        delta = (h * select[:, None, :]) @ flat_B.T  # other adapters' columns are zero
        return result + delta.view(*x.shape[:-1], -1).to(result.dtype)
    _, A, B = rows
    return result + LF.linear_delta(x.to(A.dtype), A, B).to(result.dtype)
