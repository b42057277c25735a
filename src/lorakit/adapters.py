"""The multi-adapter API on a model: activate, disable, delete, and one adapter per batch row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.layers import BASE, LoraLayer, RowRouting
from lorakit.state import clear_state, find_state, hosts, require_adapter, state_of

__all__ = [
    "active_adapters",
    "adapter_per_row",
    "delete_adapter",
    "disable_adapters",
    "list_adapters",
    "set_adapter",
    "trainable_parameters",
]


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on `model`, in the order they were added."""
    state = find_state(model)
    return list(state.configs) if state else []


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the active adapters (their outputs add up in the forward)."""
    return state_of(model).active


def set_adapter(model: nn.Module, name_or_names: str | Sequence[str]) -> None:
    """Make one adapter, or several at once, the active ones.

    Active adapters' outputs add in the forward and their parameters train (unless loaded with
    `is_trainable=False`); inactive adapters are frozen and skipped.

    Args:
        model: a model with adapters.
        name_or_names: an adapter name or a list of names.

    Raises:
        LorakitError: an unknown name (the message lists the adapters that exist).
    """
    names = (name_or_names,) if isinstance(name_or_names, str) else tuple(name_or_names)
    if not names:
        raise LorakitError("set_adapter needs at least one adapter name")
    for name in names:
        require_adapter(model, name)
    state = state_of(model)
    state.active = names
    for _, host in hosts(model):
        host.set_active(names)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block the model computes its base outputs (merged adapters are unmerged first).

    Example:
        >>> with lorakit.disable_adapters(model):
        ...     base_logits = model(ids).logits

    Yields:
        The model.
    """
    state_of(model)
    merged: dict[LoraLayer, tuple[str, ...]] = {}
    layers = [host for _, host in hosts(model)]
    for host in layers:
        if isinstance(host, LoraLayer) and host.merged:
            merged[host] = host.merged
            host.unmerge()
        host.disabled = True
    try:
        yield model
    finally:
        for host in layers:
            host.disabled = False
        for layer, names in merged.items():
            layer.merge(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer (and its config); the next adapter becomes active if needed.

    Raises:
        LorakitError: unknown name, or the adapter is merged (unmerge first).
    """
    state = require_adapter(model, name)
    layers = [host for _, host in hosts(model) if name in host.adapters]
    for host in layers:
        if isinstance(host, LoraLayer) and name in host.merged:
            raise LorakitError(f"adapter {name!r} is merged into the weights; call lorakit.unmerge first")
    for host in layers:
        host.remove(name)
    del state.configs[name]
    state.active = tuple(n for n in state.active if n != name)
    if not state.active and state.configs:
        state.active = (next(iter(state.configs)),)
    for _, host in hosts(model):
        host.set_active(state.active)
    if not state.configs:
        # The empty wrappers stay and compute the base layer; `unload` removes them.
        clear_state(model)


@contextmanager
def adapter_per_row(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside this block, batch row i uses adapter `names[i]` in every wrapped layer.

    `"__base__"` (`lorakit.layers.BASE`) means no adapter for that row. At inference the
    branches of a linear layer are one batched product over all rows (each row's A and B are
    gathered once per block), so 16 different adapters cost what one does; in training, and for
    fused-slice, embedding and conv layers, rows sharing an adapter are computed together
    (gather, one low-rank product, scatter-add).

    Args:
        model: a model with adapters, none of them merged.
        names: one adapter name per row of every batch run inside the block.

    Yields:
        The model.

    Raises:
        LorakitError: an unknown name, or merged adapters (a merged adapter applies to all rows).
    """
    state = state_of(model)
    unknown = sorted({n for n in names if n != BASE and n not in state.configs})
    if unknown:
        raise LorakitError(f"adapter_per_row: unknown adapter(s) {unknown}; this model has {sorted(state.configs)}")
    all_hosts = [host for _, host in hosts(model)]
    merged = sorted({n for h in all_hosts if isinstance(h, LoraLayer) for n in h.merged})
    if merged:
        raise LorakitError(f"adapter_per_row needs unmerged adapters; {merged} are merged (call lorakit.unmerge)")
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    routing = RowRouting(
        names=tuple(names),
        groups=[(n, torch.tensor(rows, dtype=torch.long)) for n, rows in groups.items() if n != BASE],
    )
    for host in all_hosts:
        host.rows = routing
    try:
        yield model
    finally:
        for host in all_hosts:
            host.rows = None


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of parameters that require grad, number of all parameters) of `model`."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
