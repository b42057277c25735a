"""lorakit.metrics: perplexity and the classification scores (accuracy, F1, Matthews correlation).

The E2E NLG scores are tested in test_e2e_metrics.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorakit.errors import DataError
from lorakit.metrics import accuracy, f1_binary, matthews_corrcoef, perplexity


def test_perplexity_is_exp_of_mean_loss():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)


def test_perplexity_overflow_gives_inf_and_nan_propagates():
    assert perplexity(1e6) == math.inf
    assert math.isnan(perplexity(math.nan))


def test_perplexity_accepts_zero_dim_arrays():
    # A 0-d torch tensor converts through float() the same way; numpy avoids importing torch here.
    assert perplexity(np.array(math.log(3.0))) == pytest.approx(3.0)
    assert perplexity(np.float32(0.0)) == 1.0


PREDS = [1, 0, 1, 1, 0, 0, 1]
LABELS = [1, 0, 0, 1, 1, 0, 0]


def test_classification_scores_by_hand():
    # Position by position: TP at 0 and 3, TN at 1 and 5, FP at 2 and 6, FN at 4.
    tp, tn, fp, fn = 2, 2, 2, 1
    assert accuracy(PREDS, LABELS) == pytest.approx((tp + tn) / 7)
    assert f1_binary(PREDS, LABELS) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    expected_mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corrcoef(PREDS, LABELS) == pytest.approx(expected_mcc)


def test_classification_extremes():
    labels = [0, 1, 1, 0]
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - y for y in labels], labels) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1, 1], labels) == 0.0  # constant prediction
    assert f1_binary([0, 0], [0, 0]) == 0.0  # no positive anywhere
    assert f1_binary([True, False], [1, 0]) == 1.0
    assert accuracy(["x", "y"], ["x", "z"]) == 0.5


@pytest.mark.parametrize("score", [accuracy, f1_binary, matthews_corrcoef])
def test_classification_rejects_misaligned_or_empty(score):
    with pytest.raises(DataError, match="3 predictions but 2 labels"):
        score([0, 1, 1], [0, 1])
    with pytest.raises(DataError, match="no predictions"):
        score([], [])


@pytest.mark.parametrize("score", [f1_binary, matthews_corrcoef])
def test_binary_scores_reject_non_binary_labels(score):
    with pytest.raises(DataError, match="must be 0 or 1"):
        score([0, 2, 1], [0, 1, 1])
