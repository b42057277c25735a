"""Conditions the speed paths' eligibility checks share: hooks, grad mode, compile."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["autocast_on", "compiling", "grad_needed", "hooked", "output_seen"]


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
