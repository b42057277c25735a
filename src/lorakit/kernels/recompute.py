"""What the recomputation of a checkpointed block may leave out: the output of its last node.

Gradient checkpointing (`lorakit.train.checkpointing`) runs a block's forward a second time in
the backward, only to rebuild the tensors its nodes saved. The block's output is thrown away
then, and so is the output of its last node when that output goes only into the block's final
residual add (which saves nothing): in a LLaMA-family decoder layer that is the gated MLP's down
projection, x·W_downᵀ, about a sixth of the block's forward. The gated-MLP node (`gated_mlp`)
skips that product in a recomputation when told to; everything its backward keeps (the products
with the LoRA factors, e and u, the masks) is computed as in the forward.

The checkpointing decides, per checkpointed run, from the forward's autograd graph: the block's
one output that needs a gradient comes from an `AddBackward0` whose inputs include the node the
gated MLP noted (`note_output`) during that run. Then nothing in the block reads the MLP's output
but the add, and the recomputation (`skipping(mlp)`) may return an unfilled tensor in its place.
State is per thread: a forward and its recomputation each run on one thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["note_output", "skippable_tail", "skipping", "skips_output", "watching"]

_local = threading.local()


@contextmanager
def watching() -> Iterator[list[tuple[Any, Any]]]:
    """Inside: the (module, autograd node) of each output `note_output` is given, in order."""
    before = getattr(_local, "seen", None)
    _local.seen = seen = []
    try:
        yield seen
    finally:
        _local.seen = before


def note_output(module: Any, output: torch.Tensor) -> None:
    """A node that may be a block's last records its output (only while `watching`)."""
    seen = getattr(_local, "seen", None)
    if seen is not None and output.grad_fn is not None:
        seen.append((module, output.grad_fn))


def skippable_tail(outputs: Any, seen: list[tuple[Any, Any]]) -> Any:
    """The module whose output a recomputation of the block may skip, or None.

    Args:
        outputs: what the block's forward returned (a tensor, or a tuple/list holding tensors).
        seen: what `watching` recorded during that forward.

    Returns:
        The last noted module when the block's only output that needs a gradient is computed by an
        `AddBackward0` (a residual add: it saves no tensor) that reads the module's output node
        directly; otherwise None.
    """
    if not seen:
        return None
    items = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    tensors = {id(t): t for t in items if isinstance(t, torch.Tensor) and t.requires_grad}
    if len(tensors) != 1:
        return None
    node = next(iter(tensors.values())).grad_fn
    if node is None or type(node).__name__ != "AddBackward0":
        return None
    module, tail = seen[-1]
    return module if any(next_node is tail for next_node, _ in node.next_functions) else None


@contextmanager
def skipping(module: Any) -> Iterator[None]:
    """Inside: `skips_output(module)` is True (a recomputation that throws `module`'s output away)."""
    before = getattr(_local, "skip", None)
    _local.skip = module
    try:
        yield
    finally:
        _local.skip = before


def skips_output(module: Any) -> bool:
    """Whether `module` runs inside `skipping(module)`: its output will not be read."""
    return module is not None and getattr(_local, "skip", None) is module
