"""Gradient checkpointing per decoder block: keep each block's input, recompute the rest in the backward.

`enable_grad_checkpointing(model)` gives every decoder block (`blocks.decoder_blocks`: the modules
FSDP shards too) a forward that runs its own forward under non-reentrant
`torch.utils.checkpoint` whenever gradients are being recorded. The forward keeps only the block's
inputs; the backward of each block runs the block again to rebuild what its nodes saved, then
uses it. So training keeps about one hidden state per block instead of all of a block's
activations, for about one more forward per step. What makes it safe for LoRA:

- *Frozen inputs.* Non-reentrant checkpointing gives the adapters inside a block their gradients
  even when nothing the block receives requires grad (the first block reads the frozen embedding's
  output): it is the autograd graph of the forward that runs backward, fed the recomputed tensors.
  The reentrant kind gives them no gradient there, silently.
- *The same dropout.* The RNG state at the start of each block is kept and restored for its
  recomputation (`preserve_rng_state`), so every mask `kernels.dropout.draw_mask` draws again is the
  mask of the forward. Layers sharing a mask (`LoraConfig.share_dropout_mask`) find it through the
  model's `MaskSharing`, whose one entry is keyed by the input tensor; each checkpointed run of a
  block starts with that entry dropped, so the forward and the recomputation draw and share alike
  and the recomputation is never handed a mask of the forward (whose tensors are new objects then)
  or of another block. A mask is therefore shared within a block, never across a block boundary
  (no transformers model has a LoRA layer outside a block reading a block's input).
- *The kernels.* The fused LoRA node, the gated-MLP node and `QuantizedLinear`'s `FrozenLinear` keep
  plain tensors (x, masks as positions or bits, an NF4 weight) and Python state that is the same
  in the recomputation; their backward runs on the recomputed tensors unchanged.
- *Hooks outside.* The block's own hooks (FSDP2's all-gather and reshard among them) run once, around
  the checkpointed forward, not again in the recomputation: FSDP2's pre-backward hook gathers the
  block's parameters before its backward, and so before the recomputation. Enabling before or after
  `sharding.shard` is therefore the same; `fit` enables it first, as torchtune applies activation
  checkpointing before `fully_shard`.
- *Less to recompute.* The recomputation only rebuilds what the block's nodes saved; its output is
  thrown away. Where the block ends in a residual add of the gated-MLP node's output (LLaMA-family
  decoder layers with LoRA in the MLP), that node skips the down projection's base product in the
  recomputation (`kernels.recompute`: decided per run from the forward's autograd graph, so a block
  that does anything else with the MLP's output recomputes it all).
- *No KV cache.* Under gradients a checkpointed block runs without a cache (`use_cache=False`, any
  cache argument None), as transformers' own checkpointing does: the recomputation would write it
  a second time. Without gradients (generation, `loss_on`, fit's evaluations under
  `torch.no_grad`) the block's forward runs as it is, cache included, with no checkpointing cost.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from lorakit.errors import ConfigError
from lorakit.kernels import recompute
from lorakit.layers import LoraLayer
from lorakit.train.blocks import decoder_blocks

__all__ = [
    "checkpointable_blocks",
    "disable_grad_checkpointing",
    "enable_grad_checkpointing",
    "is_grad_checkpointing",
]

# Arguments through which a transformers block reads and writes a KV cache (the names have changed
# over transformers versions and differ between models).
_CACHE_ARGS = frozenset({"cache", "past_key_values", "past_key_value", "layer_past"})


def checkpointable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks `enable_grad_checkpointing` would checkpoint: `model`'s decoder blocks.

    Changes nothing, so a caller can check before it writes or loads anything.

    Raises:
        ConfigError: the model has no decoder block lorakit can find (named with its class).
    """
    blocks = decoder_blocks(model)
    if not blocks:
        cls = type(model).__name__
        raise ConfigError(
            f"grad_checkpointing found no decoder blocks in {cls}: lorakit checkpoints each block a "
            f"transformers model names in `_no_split_modules`, or else each module of the longest "
            f"nn.ModuleList, and {cls} has neither. Train without grad_checkpointing, or hold the "
            "model's repeated blocks in an nn.ModuleList"
        )
    return blocks


def enable_grad_checkpointing(model: nn.Module) -> list[nn.Module]:
    """Checkpoint each decoder block of `model` in training: its activations are recomputed in the backward.

    In place and idempotent. Nothing else about the model changes: module names, state dict and
    outputs are the same, and so are the gradients (the recomputation sees the same dropout masks;
    see the module docstring). Only calls that record gradients are checkpointed.

    Args:
        model: a model with decoder blocks (a transformers model, or one holding its blocks in an
            `nn.ModuleList`), before or after `lorakit.inject`, `lorakit.quantize` and `shard`.

    Returns:
        The checkpointed blocks, outermost first.

    Raises:
        ConfigError: the model has no decoder block lorakit can find (nothing is changed).
    """
    blocks = checkpointable_blocks(model)
    for block in blocks:
        if not _is_checkpointed(block):
            previous = block.__dict__.get("forward")  # a forward set on the instance, kept inside
            # A partial of a module-level function, so the model still deep-copies and pickles.
            block.forward = functools.partial(_checkpointed_forward, block, previous)
    return blocks


def disable_grad_checkpointing(model: nn.Module) -> int:
    """Give every block `enable_grad_checkpointing` changed its previous forward back.

    Returns:
        The number of blocks that were checkpointed.
    """
    n = 0
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if _is_checkpointed(module):
            previous = forward.args[1]
            if previous is None:
                del module.forward
            else:
                module.forward = previous
            n += 1
    return n


def is_grad_checkpointing(model: nn.Module) -> bool:
    """Whether some block of `model` is checkpointed by `enable_grad_checkpointing`."""
    return any(_is_checkpointed(m) for m in model.modules())


def _is_checkpointed(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _checkpointed_forward


def _checkpointed_forward(block: nn.Module, previous: Callable | None, *args: Any, **kwargs: Any) -> Any:
    """The block's forward, under non-reentrant checkpointing when gradients are being recorded."""
    forward = previous if previous is not None else functools.partial(type(block).forward, block)
    if not torch.is_grad_enabled():  # no backward to recompute for: no cost at all
        return forward(*args, **kwargs)
    args, kwargs = _without_cache(forward, args, kwargs)
    # The keyword arguments travel as one positional dict so that checkpoint sees their tensors
    # when it picks the devices whose RNG state it keeps (it looks at positional arguments only).
    return torch.utils.checkpoint.checkpoint(
        _run, block, forward, kwargs, _Run(), *args, use_reentrant=False, preserve_rng_state=True
    )


class _Run:
    """One checkpointed call's state, shared by its forward and its recomputation (checkpoint hands
    the recomputation the forward's arguments): which it is, and the module whose output the
    recomputation may skip (`kernels.recompute`)."""

    recomputing: bool = False
    tail: nn.Module | None = None


def _run(block: nn.Module, forward: Callable, kwargs: dict[str, Any], run: _Run, *args: Any) -> Any:
    """One run of a checkpointed block — the forward, then its recomputation — from the same start:
    the RNG state (restored by checkpoint) and no shared dropout mask left from elsewhere."""
    sharings = {id(layer.masks): layer.masks for layer in block.modules() if isinstance(layer, LoraLayer)}
    for masks in sharings.values():
        masks.forget()
    if run.recomputing:
        with recompute.skipping(run.tail):
            return forward(*args, **kwargs)
    with recompute.watching() as seen:
        out = forward(*args, **kwargs)
    run.tail, run.recomputing = recompute.skippable_tail(out, seen), True
    return out


@functools.lru_cache(maxsize=64)
def _signature(function: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to rewrite
        return None


def _without_cache(forward: Callable, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) with any KV cache argument None and `use_cache` False, wherever they are passed."""
    function = forward.func if isinstance(forward, functools.partial) else forward
    signature = _signature(function)
    if signature is None:
        return args, kwargs
    try:
        bound = signature.bind(*(forward.args if isinstance(forward, functools.partial) else ()), *args, **kwargs)
    except TypeError:  # the forward will raise its own, clearer error
        return args, kwargs
    changed = False
    for name, parameter in signature.parameters.items():
        if name not in bound.arguments:
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            extra = bound.arguments[name]
            cleared = {k: _cleared(k, v) for k, v in extra.items()}
            if any(cleared[k] is not extra[k] for k in extra):
                bound.arguments[name], changed = cleared, True
        else:
            value = _cleared(name, bound.arguments[name])
            if value is not bound.arguments[name]:
                bound.arguments[name], changed = value, True
    if not changed:
        return args, kwargs
    skip = len(forward.args) if isinstance(forward, functools.partial) else 0  # `self`, bound by the partial
    return bound.args[skip:], bound.kwargs


def _cleared(name: str, value: Any) -> Any:
    if name in _CACHE_ARGS and value is not None:
        return None
    if name == "use_cache" and value:
        return False
    return value
