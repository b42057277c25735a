"""Conditions the speed paths' eligibility checks share: the adapter's kind, hooks, grad mode, compile."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["autocast_on", "compiling", "computes", "grad_needed", "hooked", "output_seen"]


def hooked(module: nn.Module) -> bool:
    """Whether forward (pre-)hooks, the module's own or global ones, would see a call of `module`:
    a path that computes its output another way must then let the module run."""
    hooks = nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
    )


def output_seen(module: nn.Module) -> bool:
    """Whether a forward hook (the module's or a global one) saw the module's output, which then
    must not be updated in place."""
    return bool(module._forward_hooks or nn.modules.module._global_forward_hooks)


def grad_needed(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an operation on these tensors (grad mode on, one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autocast_on(x: torch.Tensor) -> bool:
    """Whether `torch.autocast` is on for x's device: products then change dtype as autocast
    decides, which a node's hand-written backward does not follow."""
    return torch.is_autocast_enabled(x.device.type)


def compiling() -> bool:
    """Whether torch.compile (Dynamo) is tracing the current code."""
    return torch.compiler.is_compiling()


def computes(record: Any, *, rescaled: bool = False) -> bool:
    """Whether a speed path may compute this adapter record: the one check of an adapter's kind
    every path makes.

    Paths compute plain LoRA. A record with a variant (`lorakit.variants`) takes the reference,
    unless the path declares the form it handles: `rescaled=True` (the fused node) also takes a
    variant whose output is a rescaling of the plain LoRA output (`Variant.rescales_sum`), and then
    applies the variant's own `rescale`. A variant no path knows is never computed as plain LoRA.
    """
    variant = record.variant
    return variant is None or (rescaled and variant.rescales_sum)
