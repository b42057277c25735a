"""One optimizer step over micro-batches: what `fit` runs each step, and what the benchmarks time."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.errors import TrainingError
from lorakit.train.chunked_loss import check_loss_options, model_loss_sum
from lorakit.train.distributed import DistInfo, all_reduce_sum, shard_batch
from lorakit.train.loss import count_targets
from lorakit.train.packed import model_inputs

__all__ = ["StepResult", "apply_update", "no_sync", "train_step"]


@dataclass
class StepResult:
    """What one `train_step` did.

    Attributes:
        loss: the cross entropy per target token of the whole step (every micro-batch, every rank).
        grad_norm: the global gradient norm before clipping (nan without an optimizer).
        lr: the learning rate of the first parameter group for this step (nan without one).
        input_tokens: tokens read (attention-mask ones) over all ranks.
        stop: some rank passed `stop=True` (fit's Ctrl-C, agreed on by every rank).
        metrics: more numbers for the step's `metrics.jsonl` line (a preference step's rewards,
            margin and accuracy).
    """

    loss: float
    grad_norm: float
    lr: float
    input_tokens: int
    stop: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


def train_step(
    model: nn.Module,
    micro_batches: Sequence[dict[str, Any]],
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    max_grad_norm: float | None = None,
    label_smoothing: float = 0.0,
    autocast: torch.dtype | None = None,
    info: DistInfo | None = None,
    stop: bool = False,
    loss: str = "chunked",
    chunk_tokens: int | None = None,
) -> StepResult:
    """Forward and backward every micro-batch, then clip, step the optimizer and the schedule.

    The loss is summed over the target tokens of all micro-batches (and ranks) and divided by
    their number, so accumulation, packing and data parallelism give the update of one big batch
    of the same examples. A batch of packed rows goes to the model as `packed.model_inputs` lays it
    out (attention within each example). Under
    DDP (`model` wrapped, `info.world_size > 1`) or FSDP (`model` sharded) each rank takes rows
    `rank::world_size` of every batch and gradients sync on the last micro-batch only.

    Args:
        model: the model (or its DDP wrapper, or the model sharded by FSDP); batches go to the
            device of its first parameter.
        micro_batches: dicts with `labels` ((batch, seq) token labels, -100 = no target, or (batch,)
            class labels) and the model's inputs; packed rows (`lorakit.data.packing`) also carry
            `position_ids`.
        optimizer: updates the parameters; None runs forward and backward only (the frozen
            model's floor, as the benchmarks time it).
        scheduler: stepped after the optimizer, if given.
        max_grad_norm: clip the global gradient norm of the optimizer's parameters; None: no clipping.
        label_smoothing: of the cross entropy.
        autocast: run each forward (and the loss) under `torch.autocast` in this dtype (bf16);
            the backward runs outside it, as PyTorch recommends.
        info: this rank in the job (default: a single process).
        stop: this rank wants to stop after the step; the result says whether any rank did.
        loss: `"chunked"`: a causal LM's loss without its (tokens × vocabulary) logits, where
            `chunked_loss.chunked_head` finds the head; `"full"`: from the logits (see `TrainConfig.loss`).
        chunk_tokens: tokens per chunk of the chunked loss (default: `chunked_loss.chunk_tokens_for`).

    Returns:
        The step's loss, gradient norm, learning rate, tokens and stop flag.

    Raises:
        ConfigError: `loss` not `"chunked"` or `"full"`, a bad `chunk_tokens` (before anything runs).
        TrainingError: a NaN/inf loss or gradient norm; the gradients are cleared and nothing is
            updated.
    """
    check_loss_options(loss, chunk_tokens)
    info = info or DistInfo()
    device = next(model.parameters()).device
    shards = [shard_batch(batch, info) for batch in micro_batches]
    targets = sum(count_targets(b["labels"]) for b, counts in shards if counts)
    inputs = sum(_count_inputs(b) for b, counts in shards if counts)
    totals = all_reduce_sum(torch.tensor([targets, inputs], dtype=torch.float64), info)
    global_targets = max(float(totals[0]), 1.0)
    # DDP and FSDP average gradients over ranks; multiplying by the world size makes that a sum, so the
    # step's gradient is d(Σ over all ranks' targets of the loss)/d(params) / global_targets.
    scale = info.world_size / global_targets
    local_sum = torch.zeros((), dtype=torch.float64)
    for index, (batch, counts) in enumerate(shards):
        batch = model_inputs(model, batch)  # packed rows: the form the model's attention keeps apart
        tensors = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        labels = tensors.pop("labels")
        last = index == len(shards) - 1
        sync = no_sync(model) if info.enabled and not last else contextlib.nullcontext()
        cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with sync:
            with cast:
                summed = model_loss_sum(model, tensors, labels, label_smoothing, loss=loss, chunk_tokens=chunk_tokens)
            if not counts:
                summed = summed * 0.0
            (summed * scale).backward()
        local_sum += summed.detach().double().cpu()
    reduced = all_reduce_sum(torch.stack([local_sum, torch.tensor(float(stop), dtype=torch.float64)]), info)
    loss, stopping, tokens = float(reduced[0]) / global_targets, float(reduced[1]) > 0, int(totals[1])
    grad_norm, lr = apply_update(optimizer, scheduler, loss=loss, max_grad_norm=max_grad_norm)
    return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, input_tokens=tokens, stop=stopping)


def apply_update(
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    loss: float,
    max_grad_norm: float | None,
) -> tuple[float, float]:
    """The end of a step once the gradients are in: check the loss, clip, step the optimizer and
    the schedule, clear the gradients (what every kind of step shares).

    Args:
        optimizer: updates the parameters; None: nothing is updated (nan, nan is returned).
        scheduler: stepped after the optimizer, if given.
        loss: the step's loss over every rank.
        max_grad_norm: clip the global gradient norm to this; None: no clipping.

    Returns:
        (the gradient norm before clipping, the learning rate of the first parameter group).

    Raises:
        TrainingError: a NaN/inf loss or gradient norm; the gradients are cleared, nothing updated.
    """
    if optimizer is None:
        return math.nan, math.nan
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"loss became {loss}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else math.inf)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"gradient norm became {grad_norm}")
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally: DDP's `no_sync`, FSDP2's gradient-sync switch."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def _count_inputs(batch: dict[str, Any]) -> int:
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
