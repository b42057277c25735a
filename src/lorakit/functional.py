"""The LoRA maths, written once (Hu et al., 2022, eq. 3 and section 4.1).

h = W0·x + s·B·A·x, with A ∈ R^{r×in}, B ∈ R^{out×r} and s = α/r (or α/√r with rsLoRA,
Kalajdzievski 2023). Layers, merging and file conversion call these functions; nothing else
spells the formula out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lorakit.dropout import (
    DROPOUT_RESOLUTION,
    KeepMask,
    draw_mask,
    dropout_active,
    dropout_input,
    dropout_keep_mask,
    keep_factor,
    masked_input,
    pack_mask,
    shared_mask,
    unpack_factor,
    unpack_mask,
)

# The dropout names are re-exported: they were defined here before `lorakit.dropout` existed.

__all__ = [
    "DROPOUT_RESOLUTION",
    "Branch",
    "GatedMlpFunction",
    "LoraLinearFunction",
    "accumulate_dtype",
    "conv2d_delta",
    "conv2d_delta_weight",
    "delta_weight",
    "dropout_input",
    "dropout_keep_mask",
    "embedding_delta",
    "expand_fused",
    "fused_linear_delta",
    "gated_mlp",
    "keep_factor",
    "linear_delta",
    "lora_linear",
    "masked_input",
    "pack_mask",
    "scaling",
    "unpack_factor",
    "unpack_mask",
    "weight_path_is_cheaper",
]


def scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The factor s that multiplies B·A.

    Args:
        r: rank of the update.
        lora_alpha: the α hyper-parameter.
        use_rslora: use α/√r (rank-stabilised LoRA) instead of α/r (the paper's choice).

    Returns:
        s as a Python float.
    """
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any input is float64: never accumulate ΔW in half precision."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def delta_weight(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """ΔW = s·B·A in float32 (float64 for float64 inputs), whatever the parameters' dtype.

    The caller casts the merged weight once (PEFT issue #1388: half-precision ΔW drifts).

    Args:
        A: (r, in).
        B: (out, r).
        s: scaling.

    Returns:
        (out, in) tensor in `accumulate_dtype(A.dtype, B.dtype)`.
    """
    dtype = accumulate_dtype(A.dtype, B.dtype)
    return (B.to(dtype) @ A.to(dtype)) * s


def linear_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """The LoRA branch of a linear layer: s·(x·Aᵀ)·Bᵀ.

    Args:
        x: (..., in), dropout already applied.
        A: (r, in).
        B: (out, r).
        s: scaling.

    Returns:
        (..., out) in x's dtype.
    """
    return F.linear(F.linear(x, A), B) * s


def fused_linear_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, enabled: Sequence[int], n_slices: int
) -> torch.Tensor:
    """The LoRA branch of a fused projection where only some output slices are adapted.

    This is loralib's `MergedLinear(enable_lora=[...])`: each enabled slice j has its own rank-r
    pair (A_j, B_j); slices not enabled get no update.

    Args:
        x: (..., in), dropout already applied.
        A: (e·r, in), the e enabled slices' A_j stacked.
        B: (e·o, r) with o = out / n_slices, the B_j stacked.
        s: scaling.
        enabled: indices of the e adapted slices, ascending.
        n_slices: how many equal slices the layer's output has.

    Returns:
        (..., out) with zeros in slices that are not enabled.
    """
    e = len(enabled)
    r = A.shape[0] // e
    o = B.shape[0] // e
    a = F.linear(x, A).unflatten(-1, (e, r))  # (..., e, r)
    y = torch.einsum("...er,eor->...eo", a, B.view(e, o, r)) * s  # (..., e, o)
    if e == n_slices:
        return y.flatten(-2)
    out = y.new_zeros((*y.shape[:-2], n_slices, o))
    out[..., list(enabled), :] = y
    return out.flatten(-2)


def expand_fused(
    A: torch.Tensor, B: torch.Tensor, enabled: Sequence[int], n_slices: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a sliced fused adapter as one ordinary adapter of the whole layer.

    The result (A_full, B_full) gives B_full·A_full = the block-structured update: A_full is A
    itself (e·r, in) and B_full is (out, e·r) with B_j in rows of slice enabled[j] and columns
    j·r:(j+1)·r, zeros elsewhere. PEFT loads this as a rank-e·r adapter of the fused layer.

    Args:
        A: (e·r, in).
        B: (e·o, r).
        enabled: adapted slice indices.
        n_slices: number of slices in the output.

    Returns:
        (A_full, B_full).
    """
    e = len(enabled)
    r = A.shape[0] // e
    o = B.shape[0] // e
    B_full = B.new_zeros((n_slices * o, e * r))
    for j, slot in enumerate(enabled):
        B_full[slot * o : (slot + 1) * o, j * r : (j + 1) * r] = B[j * o : (j + 1) * o]
    return A.clone(), B_full


def embedding_delta(
    ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, base: torch.nn.Embedding
) -> torch.Tensor:
    """The LoRA branch of an embedding: s·B·A[:, ids], computed as a lookup into Aᵀ.

    Args:
        ids: integer token ids, any shape.
        A: (r, num_embeddings) (PEFT's `lora_embedding_A`).
        B: (embedding_dim, r) (PEFT's `lora_embedding_B`).
        s: scaling.
        base: the wrapped embedding, whose padding/max-norm options the lookup follows.

    Returns:
        (*ids.shape, embedding_dim).
    """
    after_A = F.embedding(
        ids, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
    )
    return (after_A @ B.T) * s


def conv2d_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, base: torch.nn.Conv2d) -> torch.Tensor:
    """The LoRA branch of a 2-D convolution: a (r ← in, k×k) conv, then a 1×1 conv (r → out).

    Args:
        x: (N, in, H, W), dropout already applied.
        A: (r, in, kh, kw).
        B: (out, r, 1, 1).
        s: scaling.
        base: the wrapped convolution (stride, padding and dilation are taken from it).

    Returns:
        (N, out, H', W').
    """
    a = F.conv2d(x, A, None, base.stride, base.padding, base.dilation)
    return F.conv2d(a, B) * s


def conv2d_delta_weight(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """ΔW of a LoRA conv in float32: (out, r)·(r, in·kh·kw) reshaped to (out, in, kh, kw)."""
    out_ch, r = B.shape[:2]
    return delta_weight(A.flatten(1), B.reshape(out_ch, r), s).view(out_ch, *A.shape[1:])


def weight_path_is_cheaper(n_rows: int, in_features: int, out_features: int) -> bool:
    """Whether, without gradients, x·(W0 + s·B·A)ᵀ moves less memory than x·W0ᵀ + s·(x·Aᵀ)·Bᵀ.

    The branch reads x (n·in) and reads and writes the output (2·n·out); building W0 + s·B·A
    reads W0 and writes the sum (2·out·in). The base product is the same either way.
    """
    return 2 * in_features * out_features < n_rows * (in_features + 2 * out_features)


# ---------------------------------------------------------------------------- fused LoRA linear
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
    projections reading it share), the mask as positions or bits (one per shared input, see
    `shared_mask`) and the small (N, r) product; its backward rebuilds x·keep for A's gradient
    and masks its share of x's gradient. The scaling (with 1/(1 − p) folded in) goes into one
    `addmm_` that adds the branch into the base output in place (marked dirty), without an
    (N, out) copy, unless told the output is shared.

    Inputs: result (..., out) the base layer's output; x (..., in) the layer input (any float
    dtype; cast to A's dtype inside); A (r, in); B (out, r); s the scaling; in_place whether
    result may be updated in place (nobody else holds it: no forward hook saw it); with dropout,
    xm = x·keep in A's dtype (a tensor outside autograd), its `KeepMask` and the
    `SharedRebuild` through which the nodes sharing the mask rebuild x·keep once.
    """

    @staticmethod
    def forward(ctx, result, x, A, B, s, in_place=True, xm=None, mask=None, rebuild=None):
        x2 = (x if xm is None else xm).reshape(-1, x.shape[-1]).to(A.dtype)
        a = torch.mm(x2, A.t())
        ctx.save_for_backward(x, a, A, B, None if mask is None else mask.saved())
        ctx.s = s
        ctx.p = None if mask is None else mask.p
        ctx.rebuild = rebuild
        if rebuild is not None and ctx.needs_input_grad[2]:
            rebuild.expect()
        if in_place and _in_place_ok(result, A.dtype):
            result.view(-1, result.shape[-1]).addmm_(a, B.t(), alpha=s)
            ctx.mark_dirty(result)
            return result
        r2 = result.reshape(-1, result.shape[-1])
        if r2.dtype == A.dtype:
            out = torch.addmm(r2, a, B.t(), alpha=s)
        else:
            out = r2 + torch.mm(a, B.t()).mul_(s).to(r2.dtype)
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad):
        x, a, A, B, saved_mask = ctx.saved_tensors
        mask = None if saved_mask is None else KeepMask.from_saved(saved_mask, x.shape, ctx.p)
        s = ctx.s
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        g = grad.reshape(-1, grad.shape[-1]).to(A.dtype)
        grad_x = grad_A = grad_B = None
        if need_B:
            grad_B = torch.mm(g.t(), a).mul_(s)
        if need_x or need_A:
            ga = torch.mm(g, B).mul_(s)  # (N, r)
            if need_A:
                # x·keep (or x) again: once for all the nodes sharing a mask, through their rebuild
                xm = ctx.rebuild.get(x, mask, A.dtype) if ctx.rebuild is not None else _rebuilt_input(x, mask, A)
                grad_A = torch.mm(ga.t(), xm.reshape(-1, x.shape[-1]))
                del xm
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
    dropout: float = 0.0,
    training: bool = False,
    share_mask: bool = True,
    in_place: bool = True,
) -> torch.Tensor:
    """A linear layer's output with one LoRA branch added: result + s·B·A·dropout(x).

    Equal to `result + linear_delta(dropout(x), A, B, s)` (same gradients to float rounding),
    computed by `LoraLinearFunction`.

    Args:
        result: (..., out), the base layer's output.
        x: (..., in), the layer's input (before dropout).
        A: (r, in).
        B: (out, r).
        s: scaling.
        dropout: dropout probability on the branch input.
        training: dropout applies only in training.
        share_mask: reuse the mask drawn for this same input tensor by another layer.
        in_place: add the branch into `result` itself when it is a fresh dense tensor of A's
            dtype (pass False when something else may hold `result`, e.g. a forward hook).

    Returns:
        (..., out) in result's dtype.
    """
    if training and dropout_active(dropout):
        xm, mask, rebuild = shared_mask(x, dropout, share_mask, A.dtype)
        return LoraLinearFunction.apply(result, x, A, B, s / (1 - mask.p), in_place, xm, mask, rebuild)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (result, x, A, B))):
        # Inference: no node, and the branch is accumulated into the base output in place.
        a = torch.mm(x.reshape(-1, x.shape[-1]).to(A.dtype), A.t())
        if in_place and _in_place_ok(result, A.dtype):
            result.view(-1, result.shape[-1]).addmm_(a, B.t(), alpha=s)
            return result
        return result + torch.mm(a, B.t()).mul_(s).view(result.shape).to(result.dtype)
    return LoraLinearFunction.apply(result, x, A, B, s, in_place)


# ---------------------------------------------------------------------------- gated MLP with LoRA
@dataclasses.dataclass(frozen=True)
class Branch:
    """One LoRA branch of a projection inside `gated_mlp`: s·B·A·dropout(x).

    Args:
        A: (r, in).
        B: (out, r).
        s: scaling (α/r or α/√r), without the dropout rescaling.
        dropout: probability on the branch input (0 when not training).
        share_mask: with the gate and up branches both sharing, one mask serves both (as
            `masked_input` does for layers reading the same tensor).
    """

    A: torch.Tensor
    B: torch.Tensor
    s: float
    dropout: float = 0.0
    share_mask: bool = True


def _branch_input(x2: torch.Tensor, br: Branch | None, shared: tuple | None = None) -> tuple:
    """(branch input in A's dtype: x or x·keep; the `KeepMask` or None; the exact p).

    `shared` is the same triple drawn for another branch that reads the same x.
    """
    if br is None:
        return None, None, 0.0
    if not dropout_active(br.dropout):
        return x2.to(br.A.dtype), None, 0.0
    if shared is not None:
        return shared
    mask = draw_mask(x2.shape, br.dropout, x2.device)
    return mask.apply(x2, br.A.dtype), mask, mask.p


def _scaled(br: Branch | None, p_exact: float) -> float:
    """The branch's s with the dropout rescaling 1/(1 − p) folded in (as `lora_linear`)."""
    if br is None:
        return 0.0
    return br.s / (1 - p_exact) if p_exact else br.s


def _is_silu(act) -> bool:
    """Whether `act` is SiLU (torch's module or function, or transformers' `SiLUActivation`)."""
    if act is F.silu or isinstance(act, torch.nn.SiLU):
        return True
    cls = type(act)
    return cls.__module__ == "transformers.activations" and cls.__name__ == "SiLUActivation"


def _add_input_grad(out: torch.Tensor, terms, mask: KeepMask | None, buffer: torch.Tensor | None = None) -> None:
    """out += (Σ ga·A over `terms`)·keep, in place; the branches' share of an input's gradient.

    Without dropout (and in out's dtype) the products go straight into `out` (`addmm_`); with it
    they are summed in `buffer` (a spent tensor of the right shape and dtype) or a new one, masked
    there in place and added into `out`.
    """
    A0 = terms[0][1]
    if mask is None and A0.dtype == out.dtype:
        for ga, A in terms:
            out.addmm_(ga, A)
        return
    t = torch.mm(terms[0][0], A0, out=buffer) if buffer is not None else torch.mm(terms[0][0], A0)
    for ga, A in terms[1:]:
        t.addmm_(ga, A)
    if mask is not None:
        mask.apply_(t)
    out.add_(t)


def _rebuilt_input(x2: torch.Tensor, mask: KeepMask | None, A: torch.Tensor | None) -> torch.Tensor | None:
    """A branch's input x·keep (or x) in A's dtype, rebuilt in a backward from x and its mask."""
    if A is None:
        return None
    return x2.to(A.dtype) if mask is None else mask.apply(x2, A.dtype)


def _shares_mask(a: Branch | None, b: Branch | None) -> bool:
    return (
        a is not None
        and b is not None
        and a.share_mask
        and b.share_mask
        and a.dropout == b.dropout
        and dropout_active(a.dropout)
        and a.A.dtype == b.A.dtype
    )


def _project(x2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, xa, A, B, s):
    """(x·Wᵀ + b + s·(xa·Aᵀ)·Bᵀ, xa·Aᵀ): a base projection with its branch, as `lora_linear` adds it."""
    out = F.linear(x2, W, b)
    if A is None:
        return out, None
    a = torch.mm(xa, A.t())
    if out.dtype == A.dtype:
        return out.addmm_(a, B.t(), alpha=s), a
    return out.add_(torch.mm(a, B.t()).mul_(s).to(out.dtype)), a


class GatedMlpFunction(torch.autograd.Function):
    """down(act(gate(x)) · up(x)) with LoRA on any of the three projections, in one node.

    The frozen gated MLP (LLaMA's SwiGLU, Gemma's GeGLU) keeps act(e), e and u = up(x) for its
    backward, and with LoRA on down_proj plain autograd also keeps h = act(e)·u (or its dropped-
    out copy) as the branch input: four (N, hidden) tensors per layer. This node keeps e and u
    only, recomputes act(e) and h in the backward (one activation and one product, elementwise),
    and keeps for the branches x itself, the masks (positions or bits; one when gate and up share
    it) and the (N, r) products — less than the frozen model alone keeps; the branch inputs x·keep
    are rebuilt in the backward. Masks are drawn in the same order as the unfused layers draw
    them, so a seed gives the same training either way.

    Inputs: x (..., in); the frozen weights Wg, Wu (hidden, in), Wd (out, hidden) and biases (or
    None); A and B of each branch (or None); the activation; the three `Branch`es (or None).
    Only x and the A/B tensors get gradients (frozen weights and biases are required).
    """

    @staticmethod
    def forward(ctx, x, Wg, Wu, Wd, bg, bu, bd, Ag, Bg, Au, Bu, Ad, Bd, act, branches):
        bg_, bu_, bd_ = branches
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        in_g = _branch_input(x2, bg_)
        in_u = _branch_input(x2, bu_, in_g if _shares_mask(bg_, bu_) else None)
        (xg, keep_g, pg), (xu, keep_u, pu) = in_g, in_u
        sg, su = _scaled(bg_, pg), _scaled(bu_, pu)
        e, a_g = _project(x2, Wg, bg, xg, Ag, Bg, sg)  # (N, hidden)
        u, a_u = _project(x2, Wu, bu, xu, Au, Bu, su)
        h = act(e) * u
        xd, keep_d, pd = _branch_input(h, bd_)
        sd = _scaled(bd_, pd)
        y, a_d = _project(h, Wd, bd, xd, Ad, Bd, sd)
        # The down branch's input is recomputed from e and u in the backward.
        # Masks are kept as positions or bits; a mask shared by gate and up is kept once.
        ctx.shared = keep_u is not None and keep_u is keep_g
        saved_g, saved_d = (k.saved() if k is not None else None for k in (keep_g, keep_d))
        saved_u = None if ctx.shared or keep_u is None else keep_u.saved()
        del xg, xu  # the backward rebuilds them from x and the masks
        ctx.save_for_backward(Wg, Wu, Wd, Ag, Bg, Au, Bu, Ad, Bd, x2, saved_g, saved_u, saved_d, a_g, a_u, a_d, e, u)
        ctx.act, ctx.s, ctx.x_shape, ctx.x_dtype = act, (sg, su, sd), x.shape, x.dtype
        ctx.p = (pg, pu, pd)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        (Wg, Wu, Wd, Ag, Bg, Au, Bu, Ad, Bd, x2, saved_g, saved_u, saved_d, a_g, a_u, a_d, e, u) = ctx.saved_tensors
        in_shape = (e.shape[0], ctx.x_shape[-1])  # (N, in)
        keep_g, keep_u, keep_d = (
            KeepMask.from_saved(saved, shape, p) if saved is not None else None
            for saved, shape, p in zip((saved_g, saved_u, saved_d), (in_shape, in_shape, e.shape), ctx.p, strict=True)
        )
        if ctx.shared:
            keep_u = keep_g
        sg, su, sd = ctx.s
        need = ctx.needs_input_grad
        gy2 = gy.reshape(-1, gy.shape[-1])
        silu = _is_silu(ctx.act)
        if silu:  # SwiGLU: its derivative directly, without an autograd graph of the activation
            act_e = F.silu(e)
        else:
            with torch.enable_grad():
                e_ = e.detach().requires_grad_(True)
                act_e = ctx.act(e_)
        grads: dict[int, torch.Tensor] = {}  # input index -> gradient

        def branch_grads(g2, xa, a, A, B, s, iA):
            """Set the grads of A (input iA) and B (iA + 1) as needed; return ga = s·g·B (N, r), or None."""
            if A is None:
                return None
            g = g2.to(A.dtype)
            if need[iA + 1]:
                grads[iA + 1] = torch.mm(g.t(), a).mul_(s)
            ga = torch.mm(g, B).mul_(s)  # (N, r)
            if need[iA]:
                grads[iA] = torch.mm(ga.t(), xa)
            return ga

        # down: y = h·Wdᵀ + s·(hm·Adᵀ)·Bdᵀ. Tensors made here are updated in place: on CPU a
        # fresh (N, hidden) buffer costs as much again as the pass that fills it (page faults).
        gh = gy2.mm(Wd)
        if Ad is not None:
            hd = (act_e.detach() * u).to(Ad.dtype)
            if keep_d is not None:
                keep_d.apply_(hd)
            ga_d = branch_grads(gy2, hd, a_d, Ad, Bd, sd, 11)
            _add_input_grad(gh, ((ga_d, Ad),), keep_d, buffer=hd)  # hd is spent: its memory is reused
            del hd
        # h = act(e)·u
        gu = gh * act_e.detach()
        if silu:
            ge = torch.ops.aten.silu_backward(gh.mul_(u), e)
        else:
            (ge,) = torch.autograd.grad(act_e, e_, gh.mul_(u))
        del gh
        # gate and up: their branch inputs x·keep rebuilt from x (once when the mask is shared)
        xg = _rebuilt_input(x2, keep_g, Ag)
        ga_g = branch_grads(ge, xg, a_g, Ag, Bg, sg, 7)
        xu = xg if ctx.shared else _rebuilt_input(x2, keep_u, Au)
        del xg
        ga_u = branch_grads(gu, xu, a_u, Au, Bu, su, 9)
        del xu
        gx = None
        if need[0]:
            gx = ge.mm(Wg).addmm_(gu, Wu)
            if ctx.shared:
                _add_input_grad(gx, ((ga_g, Ag), (ga_u, Au)), keep_g)
            else:
                for ga, A, keep in ((ga_g, Ag, keep_g), (ga_u, Au, keep_u)):
                    if ga is not None:
                        _add_input_grad(gx, ((ga, A),), keep)
            gx = gx.view(ctx.x_shape).to(ctx.x_dtype)
        return (gx, None, None, None, None, None, None, *(grads.get(i) for i in range(7, 13)), None, None)


def gated_mlp(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    branches: tuple[Branch | None, Branch | None, Branch | None],
    act,
) -> torch.Tensor:
    """down(act(gate(x)) · up(x)) where each projection may carry one LoRA branch.

    Equal (to float rounding, with the same dropout masks for the same RNG state) to running the
    three `LoraLinear` layers and the activation one after another; computed by
    `GatedMlpFunction`, which keeps less for the backward.

    Args:
        x: (..., in).
        weights: frozen (Wg, Wu, Wd), nn.Linear layout.
        biases: frozen biases or None.
        branches: a `Branch` per projection (gate, up, down) or None.
        act: the activation (a module or function of one tensor).

    Returns:
        (..., out).
    """
    tensors = [t for br in branches for t in ((br.A, br.B) if br is not None else (None, None))]
    return GatedMlpFunction.apply(x, *weights, *biases, *tensors, act, branches)
