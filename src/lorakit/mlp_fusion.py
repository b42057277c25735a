"""Run a gated MLP whose projections carry LoRA as one autograd node (`functional.gated_mlp`).

LLaMA-family MLPs compute `down_proj(act_fn(gate_proj(x)) * up_proj(x))`. When LoRA adapts
their projections, `install` gives each such MLP a forward that, while training, computes the
block with `functional.gated_mlp`: same values and gradients, same dropout masks, but the
backward keeps two (N, hidden) tensors instead of the frozen model's three plus the down_proj
branch input (about 0.2 GB less at SmolLM2-135M, batch 4×128, LoRA on every linear layer).

The fused forward is used only where it is exactly the module's own computation; otherwise (in
inference, under `torch.compile` or autocast, with per-row adapters, several unmerged adapters on one
projection, fused slices, trainable base weights or biases, non-`nn.Linear` bases such as
quantized ones, or forward hooks on the projections) the module's own forward runs. Set
`lorakit.mlp_fusion.enabled = False` to always run the module's own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from lorakit import functional as LF
from lorakit.layers import LoraLinear, hooked

__all__ = ["enabled", "install", "is_gated_mlp", "uninstall"]

enabled = True
"""Use the fused gated-MLP node while training (read at every forward)."""

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


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
            module.forward = types.MethodType(_fused_forward, module)
        n += 1
    return n


def uninstall(model: nn.Module) -> None:
    """Restore the class's own forward on every MLP `install` touched."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ is _fused_forward:
            del module.forward


def _fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    plan = _plan(self, x) if enabled else None
    if plan is None:
        return type(self).forward(self, x)
    weights, biases, branches = plan
    return LF.gated_mlp(x, weights, biases, branches, self.act_fn)


def _plan(mlp: nn.Module, x: torch.Tensor):
    """(weights, biases, branches) when the fused node computes exactly this forward, else None."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return None
    weights, biases, branches = [], [], []
    for name in _PROJECTIONS:
        layer = getattr(mlp, name)
        branch = None
        if isinstance(layer, LoraLinear):
            if layer.row_groups is not None or hooked(layer):
                return None
            pending = layer.unmerged_active()
            if len(pending) > 1:
                return None
            if pending:
                rec = layer.adapters[pending[0]]
                if rec.slices is not None:
                    return None
                p = rec.dropout_p if rec.training else 0.0
                branch = LF.Branch(rec.lora_A, rec.lora_B, rec.scaling, p, rec.share_dropout_mask)
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
