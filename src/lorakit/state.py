"""Model-level bookkeeping: which adapters a model carries, their configs, which are active.

Kept as one attribute on the model (`model._lorakit`), so lorakit never subclasses the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.layers import AdapterHost, LoraLayer

__all__ = ["LorakitState", "hosts", "lora_layers", "require_adapter", "state_of"]

_ATTR = "_lorakit"


@dataclass
class LorakitState:
    """Adapters on one model: name -> config (insertion-ordered), the active names, trainable flags."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: tuple[str, ...] = ()


def state_of(model: nn.Module, *, create: bool = False) -> LorakitState:
    """The model's adapter state.

    Raises:
        LorakitError: if the model carries no lorakit adapter and `create` is False.
    """
    state = model.__dict__.get(_ATTR)
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
