"""Speed path `merged_weight`: without gradients, x·(W0 + Σ s·B·A)ᵀ instead of the branches.

A branch reads x and reads and writes the (N, out) output once more; building W0 + s·B·A costs
one pass over the (out, in) weight. For prompts and batches of many tokens the layer then runs as
fast as a merged one (its values are a merged layer's, to float rounding); for a few tokens
(generation) the branches stay cheaper (`cheaper`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorakit import functional as LF
from lorakit.kernels.guards import computes, grad_needed, hooked
from lorakit.kernels.switch import enabled
from lorakit.records import AdapterRecord

__all__ = ["cheaper", "weight"]


def cheaper(n_rows: int, in_features: int, out_features: int) -> bool:
    """Whether x·(W0 + s·B·A)ᵀ moves less memory than x·W0ᵀ + s·(x·Aᵀ)·Bᵀ for n_rows rows.

    The branch reads x (n·in) and reads and writes the output (2·n·out); building W0 + s·B·A
    reads W0 and writes the sum (2·out·in). The base product is the same either way.
    """
    return 2 * in_features * out_features < n_rows * (in_features + 2 * out_features)


def weight(base: nn.Module, x: torch.Tensor, records: Sequence[AdapterRecord]) -> torch.Tensor | None:
    """W0 + Σ s·B·A for this forward alone, when the path applies (else None).

    Applies to a plain `nn.Linear` base without hooks, plain adapters (`guards.computes`, no fused
    slices) without dropout in effect, one dtype throughout, nothing that needs a gradient, and
    enough rows that it is `cheaper`. `records` are the adapters the forward adds (per-row
    routing never comes here).
    """
    if not enabled("merged_weight") or type(base) is not nn.Linear or hooked(base):
        return None
    W = base.weight
    if not records or x.dtype != W.dtype or x.shape[-1] != base.in_features:
        return None
    if grad_needed(W, x, base.bias, *(t for rec in records for t in (rec.lora_A, rec.lora_B))):
        return None
    if any(rec.slices is not None or not computes(rec) or rec.dropout_in_effect for rec in records):
        return None
    if any(rec.lora_A.dtype != W.dtype for rec in records):
        return None
    if not cheaper(x.numel() // base.in_features, base.in_features, base.out_features):
        return None
    first, *rest = records
    merged = LF.add_delta(W, first.lora_A, first.lora_B, first.scaling)
    for rec in rest:
        LF.add_delta_(merged, rec.lora_A, rec.lora_B, rec.scaling)
    return merged
