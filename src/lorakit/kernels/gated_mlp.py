"""Speed path `gated_mlp`: a gated MLP whose projections carry LoRA, as one autograd node.

LLaMA-family MLPs compute `down_proj(act_fn(gate_proj(x)) * up_proj(x))`. The frozen MLP keeps
act(e), e and u = up(x) for its backward, and with LoRA on down_proj plain autograd also keeps
h = act(e)·u (or its dropped-out copy) as the branch input: four (N, hidden) tensors per layer.
`GatedMlpFunction` keeps e and u only, recomputes act(e) and h in the backward, and keeps for the
branches x itself, the masks (positions or bits; one when gate and up share it) and the (N, r)
products — less than the frozen model alone keeps (about 0.2 GB less at SmolLM2-135M, batch 4×128,
LoRA on every linear layer). Masks are drawn in the order the three layers draw them, so a seed
gives the same training either way.

`install` (called by `lorakit.inject`) gives each such MLP a forward that takes the node while
training when `plan` says it computes exactly the module's own forward; otherwise the module's own
forward runs. This module works on modules that contain LoRA layers, so it sits above
`lorakit.layers` (the other kernels sit below it).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels import recompute
from lorakit.kernels.dropout import KeepMask, draw_mask, dropout_active
from lorakit.kernels.guards import autocast_on, compiling, computes, hooked
from lorakit.kernels.linear import branch_backward, branch_forward
from lorakit.kernels.switch import enabled
from lorakit.layers import LoraLinear

__all__ = ["Branch", "GatedMlpFunction", "gated_mlp", "install", "is_gated_mlp", "plan", "uninstall"]

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Branch:
    """One LoRA branch of a projection inside `gated_mlp`: s·B·A·dropout(x).

    Args:
        A: (r, in).
        B: (out, r).
        s: scaling (α/r or α/√r), without the dropout rescaling.
        dropout: probability on the branch input (0 when not training).
        share_mask: with the gate and up branches both sharing, one mask serves both (as the
            layers' `MaskSharing` does for layers reading the same tensor).
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
    """The branch's s with the dropout rescaling 1/(1 − p) folded in."""
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


def _rebuilt_input(x2: torch.Tensor, mask: KeepMask | None, A: torch.Tensor) -> torch.Tensor:
    """A branch's input x·keep (or x) in A's dtype, rebuilt in a backward from x and its mask."""
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
    """(x·Wᵀ + b + s·(xa·Aᵀ)·Bᵀ, xa·Aᵀ): a base projection with its branch added in place."""
    out = F.linear(x2, W, b)
    if A is None:
        return out, None
    return branch_forward(out, xa, A, B, s, in_place=True)


# The node's inputs, by name: its backward returns one gradient per name in this order.
_INPUTS = ("x", "Wg", "Wu", "Wd", "bg", "bu", "bd", "Ag", "Bg", "Au", "Bu", "Ad", "Bd", "act", "branches", "output")


class GatedMlpFunction(torch.autograd.Function):
    """down(act(gate(x)) · up(x)) with LoRA on any of the three projections, in one node.

    Inputs (see `_INPUTS`): x (..., in); the frozen weights Wg, Wu (hidden, in), Wd (out, hidden)
    and biases (or None); A and B of each branch (or None); the activation; the three `Branch`es
    (or None); `output`: False in a recomputation that throws the output away (`recompute`), which
    then skips the down projection's base product and returns an unfilled tensor of the output's
    shape. Only x and the A/B tensors get gradients (frozen weights and biases are required).
    """

    @staticmethod
    def forward(ctx, x, Wg, Wu, Wd, bg, bu, bd, Ag, Bg, Au, Bu, Ad, Bd, act, branches, output=True):
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
        if output:
            y, a_d = _project(h, Wd, bd, xd, Ad, Bd, sd)
        else:  # only what the backward keeps: the down branch's product, as `branch_forward` makes it
            a_d = torch.mm(xd, Ad.t()) if Ad is not None else None
            y = h.new_empty(h.shape[0], Wd.shape[0])
        # The down branch's input is recomputed from e and u in the backward, the gate and up
        # branches' inputs from x and the masks, kept as positions or bits (once when shared).
        ctx.shared = keep_u is not None and keep_u is keep_g
        saved_g, saved_d = (k.saved() if k is not None else None for k in (keep_g, keep_d))
        saved_u = None if ctx.shared or keep_u is None else keep_u.saved()
        del xg, xu
        ctx.save_for_backward(Wg, Wu, Wd, Ag, Bg, Au, Bu, Ad, Bd, x2, saved_g, saved_u, saved_d, a_g, a_u, a_d, e, u)
        ctx.act, ctx.s, ctx.p, ctx.x_shape, ctx.x_dtype = act, (sg, su, sd), (pg, pu, pd), x.shape, x.dtype
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
        need = dict(zip(_INPUTS, ctx.needs_input_grad, strict=True))
        grads: dict[str, torch.Tensor | None] = {}
        gy2 = gy.reshape(-1, gy.shape[-1])
        silu = _is_silu(ctx.act)
        if silu:  # SwiGLU: its derivative directly, without an autograd graph of the activation
            act_e = F.silu(e)
        else:
            with torch.enable_grad():
                e_ = e.detach().requires_grad_(True)
                act_e = ctx.act(e_)

        # down: y = h·Wdᵀ + s·(hm·Adᵀ)·Bdᵀ. Tensors made here are updated in place: on CPU a
        # fresh (N, hidden) buffer costs as much again as the pass that fills it (page faults).
        gh = gy2.mm(Wd)
        if Ad is not None:
            hd = (act_e.detach() * u).to(Ad.dtype)
            if keep_d is not None:
                keep_d.apply_(hd)
            ga_d, grads["Ad"], grads["Bd"] = branch_backward(
                gy2, a_d, Ad, Bd, sd, lambda: hd, (True, need["Ad"], need["Bd"])
            )
            _add_input_grad(gh, ((ga_d, Ad),), keep_d, buffer=hd)  # hd is spent: its memory is reused
            hd = None
        # h = act(e)·u
        gu = gh * act_e.detach()
        if silu:
            ge = torch.ops.aten.silu_backward(gh.mul_(u), e)
        else:
            (ge,) = torch.autograd.grad(act_e, e_, gh.mul_(u))
        del gh
        # gate and up: their branch inputs x·keep rebuilt from x (once when the mask is shared)
        ga_g = ga_u = None
        xg = _rebuilt_input(x2, keep_g, Ag) if Ag is not None and need["Ag"] else None
        if Ag is not None:
            ga_g, grads["Ag"], grads["Bg"] = branch_backward(
                ge, a_g, Ag, Bg, sg, lambda: xg, (need["x"], need["Ag"], need["Bg"])
            )
        if Au is not None:
            xu = xg if ctx.shared and xg is not None else None
            if xu is None and need["Au"]:
                xu = _rebuilt_input(x2, keep_u, Au)
            ga_u, grads["Au"], grads["Bu"] = branch_backward(
                gu, a_u, Au, Bu, su, lambda: xu, (need["x"], need["Au"], need["Bu"])
            )
            xu = None
        xg = None  # freed before the input gradient is built
        if need["x"]:
            gx = ge.mm(Wg).addmm_(gu, Wu)
            if ctx.shared:
                _add_input_grad(gx, ((ga_g, Ag), (ga_u, Au)), keep_g)
            else:
                for ga, A, keep in ((ga_g, Ag, keep_g), (ga_u, Au, keep_u)):
                    if ga is not None:
                        _add_input_grad(gx, ((ga, A),), keep)
            grads["x"] = gx.view(ctx.x_shape).to(ctx.x_dtype)
        return tuple(grads.get(name) for name in _INPUTS)


def gated_mlp(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    branches: tuple[Branch | None, Branch | None, Branch | None],
    act,
    *,
    output: bool = True,
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
        output: False when the result will not be read (a checkpointed block's recomputation,
            `recompute`): the down projection's base product is skipped and the values returned
            are unspecified; what the backward keeps is computed all the same.

    Returns:
        (..., out).
    """
    tensors = [t for br in branches for t in ((br.A, br.B) if br is not None else (None, None))]
    return GatedMlpFunction.apply(x, *weights, *biases, *tensors, act, branches, output)


# ---------------------------------------------------------------------------- on a model
def _reference_forward(self, x):  # the forward of transformers' LlamaMLP (and its copies)
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def is_gated_mlp(module: nn.Module) -> bool:
    """True when `module`'s forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)).

    Checked on the bytecode of the class's `forward` (LlamaMLP's and the MLPs transformers copies
    from it: Mistral, Qwen2/3, Gemma, OLMo, ...), so an MLP that computes anything else is left alone.
    """
    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    ref = _reference_forward.__code__
    return (
        code is not None
        and code.co_code == ref.co_code
        and code.co_names == ref.co_names
        and code.co_argcount == ref.co_argcount
        and all(hasattr(module, name) for name in (*_PROJECTIONS, "act_fn"))
    )


def install(model: nn.Module) -> int:
    """Give every gated MLP of `model` with a LoRA projection the fused training forward.

    Idempotent. Returns:
        The number of MLPs that have it now.
    """
    n = 0
    for module in model.modules():
        if not is_gated_mlp(module):
            continue
        if not any(isinstance(getattr(module, p), LoraLinear) for p in _PROJECTIONS):
            continue
        if "forward" not in module.__dict__:
            # A partial of a module-level function, so the model still deep-copies and pickles.
            module.forward = functools.partial(_fused_forward, module)
        n += 1
    return n


def uninstall(model: nn.Module) -> None:
    """Restore the class's own forward on every MLP `install` touched."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is _fused_forward:
            del module.forward


def _fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    steps = plan(self, x)
    if steps is None:
        return type(self).forward(self, x)
    weights, biases, branches = steps
    y = gated_mlp(x, weights, biases, branches, self.act_fn, output=not recompute.skips_output(self))
    recompute.note_output(self, y)
    return y


def plan(mlp: nn.Module, x: torch.Tensor):
    """Eligibility: (weights, biases, branches) when the node computes exactly this forward, else None.

    Applies while training (grad mode on and something needing a gradient), outside torch.compile
    and autocast, when each projection is a plain `nn.Linear` of x's dtype (frozen weight and
    bias, no hooks) or a `LoraLinear` over one, with at most one unmerged adapter (plain: no fused
    slices, no variant: `guards.computes`), no per-row adapters, and at least one branch.
    """
    if not enabled("gated_mlp") or not torch.is_grad_enabled() or compiling():
        return None
    if autocast_on(x):
        return None
    weights, biases, branches = [], [], []
    for name in _PROJECTIONS:
        layer = getattr(mlp, name)
        branch = None
        if isinstance(layer, LoraLinear):
            if layer.rows is not None or hooked(layer):
                return None
            records = layer.pending()
            if len(records) > 1:
                return None
            if records:
                rec = records[0]
                if rec.slices is not None or not computes(rec):
                    return None
                p = rec.dropout_p if rec.dropout_in_effect else 0.0
                branch = Branch(rec.lora_A, rec.lora_B, rec.scaling, p, rec.share_dropout_mask)
            layer = layer.base_layer
        if type(layer) is not nn.Linear or hooked(layer) or layer.weight.dtype != x.dtype:
            return None
        if layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad):
            return None
        weights.append(layer.weight)
        biases.append(layer.bias)
        branches.append(branch)
    if all(b is None for b in branches):
        return None
    if not (x.requires_grad or any(t.requires_grad for b in branches if b is not None for t in (b.A, b.B))):
        return None
    return tuple(weights), tuple(biases), tuple(branches)
