"""Model-level bookkeeping: which adapters a model carries, their configs, which are active.

Kept as one attribute on the model (`model._lorakit`), so lorakit never subclasses the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.kernels.dropout import MaskSharing
from lorakit.layers import BASE, AdapterHost, LoraLayer

__all__ = [
    "LorakitState",
    "adapter_owner",
    "check_adapter_name",
    "clear_state",
    "find_state",
    "hosts",
    "lora_layers",
    "require_adapter",
    "state_of",
    "walk",
]

_ATTR = "_lorakit"


@dataclass
class LorakitState:
    """Adapters on one model: name -> config (insertion-ordered), the active names, and the
    dropout-mask sharing its LoRA layers use (`lorakit.kernels.dropout.MaskSharing`)."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    masks: MaskSharing = field(default_factory=MaskSharing)


def find_state(model: nn.Module) -> LorakitState | None:
    """The model's adapter state, or None when it carries no lorakit adapter."""
    return model.__dict__.get(_ATTR)


def adapter_owner(model: nn.Module) -> nn.Module | None:
    """The module that carries lorakit's adapter state: `model` itself, or the first submodule
    that does (a model injected and then wrapped); None when there is none."""
    return next((m for m in model.modules() if find_state(m) is not None), None)


def state_of(model: nn.Module, *, create: bool = False) -> LorakitState:
    """The model's adapter state.

    Raises:
        LorakitError: if the model carries no lorakit adapter and `create` is False.
    """
    state = find_state(model)
    if state is None:
        if not create:
            raise LorakitError("this model has no LoRA adapter; call lorakit.inject or lorakit.load_adapter first")
        state = LorakitState()
        model.__dict__[_ATTR] = state
    return state


def clear_state(model: nn.Module) -> None:
    """Forget the model's adapter state (after every wrapper was removed)."""
    model.__dict__.pop(_ATTR, None)


def require_adapter(model: nn.Module, name: str) -> LorakitState:
    """The state, after checking that adapter `name` exists.

    Raises:
        LorakitError: naming the adapters the model has.
    """
    state = state_of(model)
    if name not in state.configs:
        raise LorakitError(f"no adapter named {name!r}; this model has {sorted(state.configs) or 'none'}")
    return state


def check_adapter_name(model: nn.Module, name: str) -> None:
    """Check that `name` can name a new adapter on `model`.

    Raises:
        ConfigError: not a non-empty string without dots, `"__base__"`, or already in use.
    """
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ConfigError(f"adapter_name must be a non-empty string without dots, not {BASE!r}; got {name!r}")
    state = find_state(model)
    if state is not None and name in state.configs:
        raise ConfigError(
            f"this model already has an adapter named {name!r}; pick another name or delete_adapter it first"
        )


def walk(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every submodule, not descending into lorakit wrappers."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not isinstance(child, AdapterHost):
            yield from walk(child, path)


def hosts(model: nn.Module) -> Iterator[tuple[str, AdapterHost]]:
    """(path, wrapper) for every lorakit wrapper: LoRA layers and modules_to_save copies."""
    for path, module in walk(model):
        if isinstance(module, AdapterHost):
            yield path, module


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(path, layer) for every LoRA layer."""
    for path, module in hosts(model):
        if isinstance(module, LoraLayer):
            yield path, module
