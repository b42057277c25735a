"""Generic evaluation metrics: perplexity, and accuracy / F1 / Matthews correlation for classification heads.

The E2E NLG challenge scores (BLEU, NIST, METEOR, ROUGE-L, CIDEr) are in `lorakit.e2e`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from lorakit.errors import DataError

__all__ = ["accuracy", "f1_binary", "matthews_corrcoef", "perplexity"]


def perplexity(mean_loss: float) -> float:
    """Perplexity ``exp(mean_loss)`` from a mean token cross-entropy in nats.

    Args:
        mean_loss: Token-normalised cross-entropy (natural log), e.g. a training or validation loss.
            Anything ``float()`` accepts, such as a 0-d tensor.

    Returns:
        ``exp(mean_loss)``; ``inf`` where that overflows a float (loss above ~709.78) instead of
        raising ``OverflowError``; ``nan`` for a ``nan`` loss.

    Raises:
        TypeError: ``mean_loss`` is not a number ``float()`` can convert (ValueError for a string
            that is not one).
    """
    try:
        return math.exp(float(mean_loss))
    except OverflowError:
        return math.inf


def accuracy(preds: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Fraction of positions where the prediction equals the label.

    Args:
        preds: Predicted labels.
        labels: Gold labels, aligned with ``preds``.

    Returns:
        Accuracy in [0, 1].

    Raises:
        DataError: The sequences differ in length or are empty.
    """
    _check_aligned("accuracy", preds, labels)
    return sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)


def f1_binary(preds: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of the positive class (label 1): ``2·TP / (2·TP + FP + FN)``.

    As scikit-learn's ``f1_score`` with ``zero_division=0``: 0.0 when neither predictions nor labels
    contain a positive.

    Args:
        preds: Predicted labels, each 0 or 1 (bools work).
        labels: Gold labels, each 0 or 1, aligned with ``preds``.

    Returns:
        F1 in [0, 1].

    Raises:
        DataError: The sequences differ in length, are empty, or hold a value other than 0 or 1.
    """
    tp, fp, fn, _ = _confusion("f1_binary", preds, labels)
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient of binary labels (GLUE's CoLA metric).

    ``(TP·TN - FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``; 0.0 when a factor under the root is
    0 (a constant prediction or constant labels), as scikit-learn returns.

    Args:
        preds: Predicted labels, each 0 or 1 (bools work).
        labels: Gold labels, each 0 or 1, aligned with ``preds``.

    Returns:
        MCC in [-1, 1].

    Raises:
        DataError: The sequences differ in length, are empty, or hold a value other than 0 or 1.
    """
    tp, fp, fn, tn = _confusion("matthews_corrcoef", preds, labels)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def _check_aligned(name: str, preds: Sequence[Hashable], labels: Sequence[Hashable]) -> None:
    if len(preds) != len(labels):
        raise DataError(f"{name}: {len(preds)} predictions but {len(labels)} labels; they must align")
    if not labels:
        raise DataError(f"{name}: no predictions or labels to score")


def _confusion(name: str, preds: Sequence[int], labels: Sequence[int]) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) with 1 as the positive class, after checking both sides are 0/1."""
    _check_aligned(name, preds, labels)
    bad = sorted({repr(v) for v in (*preds, *labels) if v not in (0, 1)})
    if bad:
        raise DataError(f"{name}: labels must be 0 or 1 (binary), got {', '.join(bad[:10])}")
    tp = sum(1 for p, y in zip(preds, labels, strict=True) if p == 1 and y == 1)
    fp = sum(1 for p, y in zip(preds, labels, strict=True) if p == 1 and y == 0)
    fn = sum(1 for p, y in zip(preds, labels, strict=True) if p == 0 and y == 1)
    return tp, fp, fn, len(labels) - tp - fp - fn
