"""The LoRA branch of a linear layer as one autograd node, and the dispatch of `LoraLinear`'s speed paths.

`branch_forward` / `branch_backward` are s·(x·Aᵀ)·Bᵀ and its gradients as the nodes compute them
(`LoraLinearFunction` here, `GatedMlpFunction` in `gated_mlp`); `functional.linear_delta` is the
same formula under plain autograd, the reference both are tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import functional as LF
from lorakit.kernels import merged_weight, rows
from lorakit.kernels.dropout import Draw, KeepMask, MaskSharing, draw_for, masked_applies, masked_branches
from lorakit.kernels.guards import autocast_on, computes, grad_needed, output_seen
from lorakit.kernels.switch import enabled
from lorakit.records import AdapterRecord, RowRouting

__all__ = [
    "LoraLinearFunction",
    "branch_backward",
    "branch_forward",
    "forward",
    "forward_rows",
    "fused_applies",
    "lora_linear",
]


def branch_forward(out: torch.Tensor, xa: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, *, in_place: bool):
    """(out + s·(xa·Aᵀ)·Bᵀ, a = xa·Aᵀ) for 2-D out (N, out) and xa (N, in) in A's dtype.

    In place (`addmm_` into `out`) when `in_place`; the product is cast to out's dtype when it
    differs from A's (fp32 adapters over a bf16 base).
    """
    a = torch.mm(xa, A.t())  # (N, r)
    if out.dtype == A.dtype:
        return (out.addmm_(a, B.t(), alpha=s) if in_place else torch.addmm(out, a, B.t(), alpha=s)), a
    delta = torch.mm(a, B.t()).mul_(s).to(out.dtype)
    return (out.add_(delta) if in_place else out + delta), a


def branch_backward(
    g: torch.Tensor,
    a: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    s: float,
    branch_input: Callable[[], torch.Tensor],
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of y = s·(xa·Aᵀ)·Bᵀ given g = ∂L/∂y (N, out): (ga = s·g·B, ∂L/∂A, ∂L/∂B).

    Args:
        g: the output's gradient, 2-D.
        a: xa·Aᵀ from the forward (N, r).
        A: (r, in).
        B: (out, r).
        s: scaling.
        branch_input: returns xa (N, in) in A's dtype; called only when A's gradient is needed
            (a rebuild from x and its mask, so it need not be kept).
        need: which of (ga, ∂L/∂A, ∂L/∂B) are wanted; ga (for the input gradient, ga·A) is
            computed whenever ∂L/∂A is.

    Returns:
        The three, None where not wanted.
    """
    need_ga, need_A, need_B = need
    g = g.to(A.dtype)
    grad_B = torch.mm(g.t(), a).mul_(s) if need_B else None
    ga = torch.mm(g, B).mul_(s) if (need_ga or need_A) else None  # (N, r)
    grad_A = torch.mm(ga.t(), branch_input()) if need_A else None
    return ga, grad_A, grad_B


def _in_place_ok(result: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a base layer's output can take its branch in place (a fresh, dense tensor of `dtype`)."""
    return (
        result.dtype == dtype
        and result.is_contiguous()
        and result._base is None
        and not (result.is_leaf and result.requires_grad)
    )


class LoraLinearFunction(torch.autograd.Function):
    """result + s·B·A·dropout(x) in one autograd node that saves only what its backward needs.

    Plain autograd keeps, per adapted layer, the dropped-out input as its own float copy next to
    its mask and the product x·Aᵀ. This node keeps the layer input x itself (the tensor the
    projections reading it share), the mask as positions or bits (one per shared input) and the
    small (N, r) product; its backward rebuilds x·keep for A's gradient (once for all the nodes
    sharing the mask, through the draw's `Rebuild`) and masks its share of x's gradient. The
    scaling (with 1/(1 − p) folded in) goes into one `addmm_` that adds the branch into the base
    output in place (marked dirty), without an (N, out) copy, unless told the output is shared.

    Inputs: result (..., out) the base layer's output; x (..., in) the layer input (any float
    dtype; cast to A's dtype inside); A (r, in); B (out, r); s the scaling; in_place whether
    result may be updated in place; with dropout, xm = x·keep in A's dtype (outside autograd), its
    `KeepMask` and the `Rebuild` of a shared mask (or None).
    """

    @staticmethod
    def forward(ctx, result, x, A, B, s, in_place=True, xm=None, mask=None, rebuild=None):
        in_place = in_place and _in_place_ok(result, A.dtype)
        xa = (x if xm is None else xm).reshape(-1, x.shape[-1]).to(A.dtype)
        out, a = branch_forward(result.reshape(-1, result.shape[-1]), xa, A, B, s, in_place=in_place)
        ctx.save_for_backward(x, a, A, B, None if mask is None else mask.saved())
        ctx.s, ctx.p, ctx.rebuild = s, None if mask is None else mask.p, rebuild
        if rebuild is not None and ctx.needs_input_grad[2]:
            rebuild.claim()
        if in_place:
            ctx.mark_dirty(result)
            return result
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad):
        x, a, A, B, saved_mask = ctx.saved_tensors
        mask = None if saved_mask is None else KeepMask.from_saved(saved_mask, x.shape, ctx.p)
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]

        def branch_input() -> torch.Tensor:  # x·keep (or x) again: once for the nodes sharing a mask
            if mask is None:
                return x.reshape(-1, x.shape[-1]).to(A.dtype)
            xm = ctx.rebuild.take(x, mask, A.dtype) if ctx.rebuild is not None else mask.apply(x, A.dtype)
            return xm.reshape(-1, x.shape[-1])

        g = grad.reshape(-1, grad.shape[-1])
        ga, grad_A, grad_B = branch_backward(g, a, A, B, ctx.s, branch_input, (need_x, need_A, need_B))
        grad_x = None
        if need_x:
            gx = torch.mm(ga, A).view(x.shape)
            if mask is not None:
                mask.apply_(gx)
            grad_x = gx.to(x.dtype)
        return grad, grad_x, grad_A, grad_B, None, None, None, None, None


def lora_linear(
    result: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    s: float,
    *,
    draw: Draw | None = None,
    in_place: bool = True,
) -> torch.Tensor:
    """A linear layer's output with one LoRA branch added: result + s·B·A·dropout(x).

    Equal to `result + functional.linear_delta(functional.dropout(x, keep, p), A, B, s)` (same
    gradients to float rounding), computed by `LoraLinearFunction`; without gradients, no node: the
    branch is accumulated into the base output.

    Args:
        result: (..., out), the base layer's output.
        x: (..., in), the layer's input (before dropout).
        A: (r, in).
        B: (out, r).
        s: scaling.
        draw: the dropout mask over x (`MaskSharing.draw`), or None without dropout.
        in_place: add the branch into `result` itself when it is a fresh dense tensor of A's
            dtype (pass False when something else may hold `result`, e.g. a forward hook).

    Returns:
        (..., out) in result's dtype.
    """
    if draw is not None:
        mask = draw.mask
        xm = draw.plain(x, A.dtype)
        return LoraLinearFunction.apply(result, x, A, B, s / (1 - mask.p), in_place, xm, mask, draw.rebuild)
    if not grad_needed(result, x, A, B):
        in_place = in_place and _in_place_ok(result, A.dtype)
        xa = x.reshape(-1, x.shape[-1]).to(A.dtype)
        out, _ = branch_forward(result.reshape(-1, result.shape[-1]), xa, A, B, s, in_place=in_place)
        return result if in_place else out.view(result.shape)
    return LoraLinearFunction.apply(result, x, A, B, s, in_place)


def fused_applies(records: Sequence[AdapterRecord]) -> bool:
    """Eligibility of the fused node for a layer whose forward adds `records` (its `pending()`).

    Speed path `fused_linear`: every adapter the forward adds is unsliced plain LoRA or a variant
    whose output rescales the plain one (`guards.computes(rescaled=True)`: its `rescale` follows
    the node), and there is at least one. Any base layer, dtype, grad mode and torch.compile qualify.
    """
    return (
        enabled("fused_linear")
        and bool(records)
        and all(rec.slices is None and computes(rec, rescaled=True) for rec in records)
    )


def forward(
    base: nn.Module,
    x: torch.Tensor,
    records: Sequence[AdapterRecord],
    *,
    masks: MaskSharing,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
) -> torch.Tensor | None:
    """A LoRA linear layer's output by the first speed path that applies, or None for the reference.

    Args:
        base: the base layer (`nn.Linear`, `Conv1D`, a quantized linear).
        x: its input.
        records: the adapters the forward adds (the layer's `pending()`), in order.
        masks: the model's dropout mask sharing.
        args, kwargs: further arguments of the base layer's forward.

    In order: the on-the-fly merged weight (`merged_weight`), the fused node per adapter
    (`fused_applies`), fused-slice adapters with masked inputs (`dropout.masked_applies`). None of
    them runs under `torch.autocast`, which the reference's plain operations follow as they are.
    """
    if autocast_on(x) or not records:
        return None
    if not args and not kwargs:
        weight = merged_weight.weight(base, x, records)
        if weight is not None:
            return F.linear(x, weight, base.bias)
    if fused_applies(records):
        result = base(x, *args, **(kwargs or {}))
        in_place = not output_seen(base)
        for rec in records:
            draw = draw_for(masks, rec, x)
            result = lora_linear(result, x, rec.lora_A, rec.lora_B, rec.scaling, draw=draw, in_place=in_place)
            if rec.variant is not None:  # a rescaling variant (fused_applies): its own formula on the sum
                result = rec.variant.rescale(base, rec, result)
        return result
    if masked_applies(records):
        return masked_branches(base(x, *args, **(kwargs or {})), x, records, masks, _sliced_delta)
    return None


# The same signature as rows.forward on purpose: this is the layer's one entry to it, adding the
# autocast check that every path of this module makes.
def forward_rows(
    base: nn.Module,
    x: torch.Tensor,
    adapters: Mapping[str, AdapterRecord],
    routing: RowRouting,
    *,
    cache: dict[str, Any],
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
) -> torch.Tensor | None:
    """Inside `adapter_per_row`: every row's adapter in one batched product (`rows`), or None."""
    if autocast_on(x):
        return None
    return rows.forward(base, x, adapters, routing, cache=cache, args=args, kwargs=kwargs or {})


def _sliced_delta(rec: AdapterRecord, xd: torch.Tensor) -> torch.Tensor:
    """The branch of a fused-slice adapter on its dropped-out input."""
    return LF.fused_linear_delta(xd.to(rec.lora_A.dtype), rec.lora_A, rec.lora_B, rec.scaling, rec.slices, rec.n_slices)
