"""The training loss, summed over target tokens so the caller can normalise by a global count."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorakit.data import IGNORE_INDEX
from lorakit.errors import TrainingError

__all__ = ["count_targets", "logits_of", "loss_sum"]


def count_targets(labels: torch.Tensor) -> int:
    """Number of positions that carry a target in one batch.

    Args:
        labels: (batch, seq) token labels of a causal LM (the first position never is a target,
            because the model predicts token t+1 from tokens ≤ t), or (batch,) class labels.

    Returns:
        Positions whose label is not -100 (after the shift for a causal LM).
    """
    if labels.ndim == 1:
        return int((labels != IGNORE_INDEX).sum())
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model's output: `outputs.logits`, the first item of a tuple, or the tensor."""
    logits = getattr(outputs, "logits", None)
    if logits is not None:
        return logits
    if isinstance(outputs, tuple | list):
        return outputs[0]
    if isinstance(outputs, torch.Tensor):
        return outputs
    raise TrainingError(f"cannot find logits in the model's output of type {type(outputs).__name__}")


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross entropy summed (not averaged) over the target positions of one batch, in float32.

    Causal LM (labels (batch, seq), logits (batch, seq, vocab)): position t's logits predict
    label t+1, i.e. logits[:, :-1] against labels[:, 1:], as transformers' `ForCausalLMLoss`.
    Classification (labels (batch,), logits (batch, classes)): one target per row. Labels equal to
    -100 are ignored. Dividing the result by `count_targets` summed over every micro-batch (and
    rank) of an optimizer step gives the token-normalised loss of the whole step.

    Args:
        logits: the model's logits.
        labels: token or class labels (int64).
        label_smoothing: in [0, 1).

    Returns:
        A scalar tensor (0 if nothing is a target).

    Raises:
        TrainingError: labels of a dtype or shape that fits neither task.
    """
    if labels.dtype.is_floating_point:
        raise TrainingError(
            f"labels must be integer token or class ids, got dtype {labels.dtype} (regression is not supported)"
        )
    if labels.ndim == 1:
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise TrainingError(
                f"classification labels {list(labels.shape)} need logits (batch, classes), got {list(logits.shape)}"
            )
        flat_logits, flat_labels = logits, labels
    elif labels.ndim == 2:
        if logits.ndim != 3 or logits.shape[:2] != labels.shape:
            raise TrainingError(
                f"token labels {list(labels.shape)} need logits (batch, seq, vocab), got {list(logits.shape)}"
            )
        # (B, T, V) -> (B·(T-1), V) against (B·(T-1),): position t predicts token t+1.
        flat_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
        flat_labels = labels[:, 1:].reshape(-1)
    else:
        raise TrainingError(f"labels must have 1 (classes) or 2 (tokens) dimensions, got {list(labels.shape)}")
    return F.cross_entropy(
        flat_logits.float(),
        flat_labels.to(flat_logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
