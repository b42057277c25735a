"""One optimizer step of preference tuning (DPO, IPO, ORPO), its reference, and its evaluation.

A preference batch (`lorakit.data.preference`) holds P pairs as 2P rows, chosen first. The policy —
the model with its trained adapter — scores both answers of every pair in one forward
(`logprobs.sequence_logprobs`: one summed log-probability per answer, without the N×V logits). DPO
and IPO also need the reference's: the same network with the adapters switched off when the adapter
is fresh, or with the frozen adapter named `"ref"` active when the run starts from an SFT adapter
(TRL's convention), computed in eval mode without gradients (`reference`), or read from the batch
when they were computed once for the whole dataset (`precompute_reference`). The loss is one of
`lorakit.train.preference`'s pure functions of these sums.

The step's loss is the mean over every pair of the step (all micro-batches, all ranks) — plus, for
ORPO, the NLL of the chosen answers per chosen token — so accumulation and data parallelism give the
update of one big batch, as `train_step` does for SFT. Under DDP each rank keeps pairs
`rank::world_size` (both rows of a pair: `shard_pairs`), and packs its sequences afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lorakit.adapters import active_adapters, disable_adapters, list_adapters, set_adapter
from lorakit.data import IGNORE_INDEX
from lorakit.data.preference import PreferenceDataset, pack_sequences
from lorakit.errors import TrainingError
from lorakit.modes import evaluating
from lorakit.state import adapter_owner
from lorakit.train.distributed import DistInfo, all_reduce_sum, select_rows
from lorakit.train.logprobs import SequenceLogprobs, sequence_logprobs
from lorakit.train.packed import is_packed, model_inputs, uses_flash_attention
from lorakit.train.preference import PreferenceLoss, dpo_loss, ipo_loss, orpo_loss
from lorakit.train.step import StepResult, apply_update, no_sync

__all__ = [
    "REFERENCE_ADAPTER",
    "evaluate_pairs",
    "needs_reference",
    "precompute_reference",
    "preference_losses",
    "preference_step",
    "reference",
    "shard_pairs",
]

REFERENCE_ADAPTER = "ref"
"""The name of a frozen adapter that is the reference when the model carries one (TRL's name);
otherwise the reference is the model with its adapters switched off."""


def needs_reference(method: str) -> bool:
    """DPO and IPO compare with a reference; ORPO does not."""
    return method in ("dpo", "ipo")


@contextlib.contextmanager
def reference(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, `model` computes the reference: eval mode, no gradients, and the adapter named
    `REFERENCE_ADAPTER` active if the model has one, else every adapter switched off. Each module's
    mode and the active adapters are restored after.

    Yields:
        The model to call (a DDP wrapper's module: the reference needs no gradient sync).

    Raises:
        TrainingError: the model carries no lorakit adapter, so there is no reference to switch to.
    """
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    owner = adapter_owner(inner)
    if owner is None:
        raise TrainingError(
            "dpo and ipo need a reference: a model with a lorakit adapter (the reference is the model with it "
            f"switched off, or a frozen adapter named {REFERENCE_ADAPTER!r}), or precomputed reference "
            "log-probabilities in every batch ('ref_logps')"
        )
    with evaluating(inner), torch.no_grad():
        if REFERENCE_ADAPTER in list_adapters(owner):
            previous = active_adapters(owner)
            set_adapter(owner, REFERENCE_ADAPTER)
            try:
                yield inner
            finally:
                set_adapter(owner, previous)
        else:
            with disable_adapters(owner):
                yield inner


def shard_pairs(batch: dict[str, Any], info: DistInfo) -> tuple[dict[str, Any], bool]:
    """Pairs `rank::world_size` of a concatenated batch (rows i and P + i together).

    A rank whose share is empty gets the first pair and `False`: it still runs forward and backward
    (DDP needs every rank to) but gives the pair no weight.

    Returns:
        (this rank's batch, whether its pairs count).
    """
    if not info.enabled:
        return batch, True
    rows = batch["labels"].shape[0]
    pairs = rows // 2
    mine = torch.arange(info.rank, pairs, info.world_size)
    counts = mine.numel() > 0
    if not counts:
        mine = torch.zeros(1, dtype=torch.long)
    return select_rows(batch, rows, torch.cat([mine, mine + pairs])), counts


def preference_losses(
    method: str,
    beta: float,
    policy: SequenceLogprobs,
    ref: torch.Tensor | None,
    *,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """The method's loss of a concatenated batch from its sequences' summed log-probabilities.

    Args:
        method: `dpo`, `ipo` or `orpo`.
        beta: β (λ for ORPO).
        policy: the policy's sums and token counts, chosen sequences first.
        ref: the reference's sums in the same order (DPO, IPO).
        label_smoothing: DPO's ε.

    Returns:
        The `PreferenceLoss` (for ORPO without its NLL term: `loss` is the mean odds-ratio term;
        the step adds the NLL with its own normalisation).
    """
    pairs = policy.sums.shape[0] // 2
    pc, pr = policy.sums[:pairs], policy.sums[pairs:]
    nc, nr = policy.counts[:pairs], policy.counts[pairs:]
    if method == "orpo":
        return orpo_loss(pc, pr, nc, nr, torch.zeros((), device=pc.device), beta=beta)
    if ref is None:
        raise TrainingError(f"{method} needs the reference's log-probabilities")
    ref = ref.to(pc.device)
    rc, rr = ref[:pairs], ref[pairs:]
    if method == "dpo":
        return dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    return ipo_loss(pc, pr, rc, rr, nc, nr, beta=beta)


@dataclass
class _Sums:
    """Numbers a step adds up over micro-batches, then over ranks."""

    loss: float = 0.0
    chosen: float = 0.0
    rejected: float = 0.0
    right: float = 0.0
    nll: float = 0.0

    def add(self, result: PreferenceLoss, loss: torch.Tensor, nll: torch.Tensor | None) -> None:
        self.loss += float(loss.detach())
        self.chosen += float(result.chosen_rewards.sum())
        self.rejected += float(result.rejected_rewards.sum())
        self.right += float((result.chosen_rewards > result.rejected_rewards).sum())
        if nll is not None:
            self.nll += float(nll.detach())

    def tensor(self) -> torch.Tensor:
        return torch.tensor([self.loss, self.chosen, self.rejected, self.right, self.nll], dtype=torch.float64)


def _prepared(
    model: nn.Module, batch: dict[str, Any], device: torch.device
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor | None, int, torch.Tensor | None]:
    """(model inputs, labels, sequence index, sequences, precomputed reference) of a concatenated
    batch, packed first when it asks to be (`pack_to`), on `device`."""
    batch = dict(batch)
    pack_to = int(batch.pop("pack_to", 0) or 0)
    ref = batch.pop("ref_logps", None)
    sequences = batch["labels"].shape[0]
    index = None
    if pack_to:
        batch = pack_sequences(batch, pack_to)
        index = batch.pop("sequence_index")
        if is_packed(batch) and uses_flash_attention(model):  # flash's one padding-free row
            index = index[batch["attention_mask"].bool()][None]
    batch = model_inputs(model, batch)
    tensors = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    labels = tensors.pop("labels")
    return tensors, labels, (index.to(device) if index is not None else None), sequences, ref


def preference_step(
    model: nn.Module,
    micro_batches: Sequence[dict[str, Any]],
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    method: str,
    beta: float,
    label_smoothing: float = 0.0,
    max_grad_norm: float | None = None,
    autocast: torch.dtype | None = None,
    info: DistInfo | None = None,
    stop: bool = False,
    loss: str = "chunked",
    chunk_tokens: int | None = None,
) -> StepResult:
    """Forward and backward every micro-batch of pairs, then clip, step the optimizer and the schedule.

    Args:
        model: the policy (or its DDP wrapper, or FSDP-sharded): a model with its trained adapter
            active; the reference is `reference(model)` unless the batches carry `ref_logps`.
        micro_batches: concatenated batches (`PreferenceDataset.collate`).
        optimizer: updates the parameters; None: forward and backward only.
        scheduler: stepped after the optimizer.
        method: `dpo`, `ipo` or `orpo`.
        beta: β of DPO and IPO, λ of ORPO.
        label_smoothing: DPO's ε (conservative DPO).
        max_grad_norm: clip the global gradient norm; None: no clipping.
        autocast: run the forwards under `torch.autocast` in this dtype.
        info: this rank (default: one process).
        stop: this rank wants to stop after the step.
        loss: `chunked` or `full` (how the log-probabilities are computed; `TrainConfig.loss`).
        chunk_tokens: rows per chunk of the chunked path.

    Returns:
        The step's loss, gradient norm, learning rate, tokens, stop flag, and in `metrics` the mean
        rewards of chosen and rejected answers, their margin, the accuracy (pairs whose chosen
        reward is higher) and, for ORPO, the NLL.

    Raises:
        TrainingError: a NaN/inf loss or gradient norm (nothing is updated); no reference.
    """
    info = info or DistInfo()
    device = next(model.parameters()).device
    shards = [shard_pairs(batch, info) for batch in micro_batches]
    pairs = sum(b["labels"].shape[0] // 2 for b, counts in shards if counts)
    chosen_tokens = sum(_chosen_targets(b["labels"]) for b, counts in shards if counts)
    inputs = sum(int(b["attention_mask"].sum()) for b, counts in shards if counts)
    totals = all_reduce_sum(torch.tensor([pairs, chosen_tokens, inputs], dtype=torch.float64), info)
    global_pairs, global_chosen = max(float(totals[0]), 1.0), max(float(totals[1]), 1.0)
    sums = _Sums()
    for number, (batch, counts) in enumerate(shards):
        tensors, labels, index, sequences, ref = _prepared(model, batch, device)
        cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        if needs_reference(method) and ref is None:
            with reference(model) as ref_model, cast:
                ref = sequence_logprobs(
                    ref_model,
                    tensors,
                    labels,
                    sequence_index=index,
                    sequences=sequences,
                    loss=loss,
                    chunk_tokens=chunk_tokens,
                ).sums
        last = number == len(shards) - 1
        sync = no_sync(model) if info.enabled and not last else contextlib.nullcontext()
        with sync:
            with cast:
                policy = sequence_logprobs(
                    model,
                    tensors,
                    labels,
                    sequence_index=index,
                    sequences=sequences,
                    loss=loss,
                    chunk_tokens=chunk_tokens,
                )
            result = preference_losses(method, beta, policy, ref, label_smoothing=label_smoothing)
            part = result.losses.sum() / global_pairs
            nll = None
            if method == "orpo":
                nll = -policy.sums[: sequences // 2].sum() / global_chosen
                part = part + nll
            if not counts:
                part = part * 0.0
            # DDP and FSDP average gradients over ranks; the world size makes that the sum over all pairs.
            (part * info.world_size).backward()
        if counts:
            sums.add(result, part, nll)
    reduced = all_reduce_sum(torch.cat([sums.tensor(), torch.tensor([float(stop)], dtype=torch.float64)]), info)
    step_loss = float(reduced[0])
    grad_norm, lr = apply_update(optimizer, scheduler, loss=step_loss, max_grad_norm=max_grad_norm)
    metrics = _metrics(reduced[1:4].tolist(), global_pairs)
    if method == "orpo":
        metrics["nll"] = float(reduced[4])
    return StepResult(
        loss=step_loss,
        grad_norm=grad_norm,
        lr=lr,
        input_tokens=int(totals[2]),
        stop=float(reduced[5]) > 0,
        metrics=metrics,
    )


def _chosen_targets(labels: torch.Tensor) -> int:
    pairs = labels.shape[0] // 2
    return int((labels[:pairs, 1:] != IGNORE_INDEX).sum())


def _metrics(values: list[float], pairs: float) -> dict[str, float]:
    chosen, rejected, right = values
    return {
        "rewards_chosen": chosen / pairs,
        "rewards_rejected": rejected / pairs,
        "margin": (chosen - rejected) / pairs,
        "accuracy": right / pairs,
    }


def _batches(dataset: PreferenceDataset, batch_size: int) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """Every pair once, in batches of `batch_size` pairs of similar length (sorted by their longer
    sequence, ties in dataset order) with their indices: little padding for the passes whose order
    does not matter (evaluation, the precomputed reference)."""
    lengths = dataset.lengths()
    order = sorted(range(len(dataset)), key=lambda i: (lengths[i], i))
    for start in range(0, len(dataset), batch_size):
        indices = order[start : start + batch_size]
        yield indices, dataset.collate(indices)


def precompute_reference(
    model: nn.Module,
    dataset: PreferenceDataset,
    batch_size: int,
    *,
    loss: str = "chunked",
    autocast: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "reference",
) -> torch.Tensor:
    """The reference's summed log-probabilities of every pair's two answers, once, in dataset order.

    The same forward the step would run (`reference`, eval mode, no gradients), over batches of
    `batch_size` pairs of similar length (`_batches`); assign the result to `dataset.reference`
    and its batches carry it.

    Returns:
        (pairs, 2) float64: the chosen and the rejected answer's sums.
    """
    device = next(model.parameters()).device
    out = torch.empty(len(dataset), 2, dtype=torch.float64)
    cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    saved, dataset.reference = dataset.reference, None
    try:
        bar = tqdm(total=len(dataset), desc=desc, unit="pair", disable=not progress, dynamic_ncols=True)
        with bar, reference(model) as ref_model:
            for indices, batch in _batches(dataset, batch_size):
                batch.pop("pack_to")
                tensors = {k: v.to(device) for k, v in batch.items()}
                labels = tensors.pop("labels")
                with cast:
                    sums = sequence_logprobs(ref_model, tensors, labels, loss=loss).sums.double().cpu()
                picked = torch.tensor(indices, dtype=torch.long)
                out[picked, 0] = sums[: len(indices)]
                out[picked, 1] = sums[len(indices) :]
                bar.update(len(indices))
    finally:
        dataset.reference = saved
    return out


def evaluate_pairs(
    model: nn.Module,
    dataset: PreferenceDataset,
    batch_size: int,
    *,
    method: str,
    beta: float,
    label_smoothing: float = 0.0,
    loss: str = "chunked",
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """The preference loss and metrics of `dataset` under `model` (eval mode, no gradients).

    Returns:
        `loss` (the mean over pairs; ORPO adds the chosen answers' NLL per token), `rewards_chosen`,
        `rewards_rejected`, `margin`, `accuracy` (and `nll` for ORPO).
    """
    device = next(model.parameters()).device
    sums = _Sums()
    pairs = 0
    chosen_tokens = 0
    nll_sum = 0.0
    bar = tqdm(total=len(dataset), desc=desc, unit="pair", disable=not progress, dynamic_ncols=True)
    with bar, evaluating(model), torch.no_grad():
        for _, batch in _batches(dataset, batch_size):
            tensors, labels, index, sequences, ref = _prepared(model, batch, device)
            options = {"sequence_index": index, "sequences": sequences, "loss": loss}
            if needs_reference(method) and ref is None:
                with reference(model) as ref_model:
                    ref = sequence_logprobs(ref_model, tensors, labels, **options).sums
            policy = sequence_logprobs(model, tensors, labels, **options)
            result = preference_losses(method, beta, policy, ref, label_smoothing=label_smoothing)
            sums.add(result, result.losses.sum(), None)
            pairs += sequences // 2
            chosen_tokens += int(policy.counts[: sequences // 2].sum())
            nll_sum -= float(policy.sums[: sequences // 2].sum())
            bar.update(sequences // 2)
    out = {"loss": sums.loss / max(pairs, 1)}
    if method == "orpo":
        out["nll"] = nll_sum / max(chosen_tokens, 1)
        out["loss"] += out["nll"]
    out.update(_metrics([sums.chosen, sums.rejected, sums.right], max(pairs, 1)))
    return out
