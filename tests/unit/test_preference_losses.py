"""The preference losses (`lorakit.train.preference`) against hand computations from given log-probabilities.

Each expected value is written out with the `math` module from the papers' formulas, pair by pair;
gradients are checked with `torch.autograd.gradcheck` in float64; ORPO's odds-ratio term is also
compared with TRL's own `ORPOTrainer.odds_ratio_loss` (a test-only dependency).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.train import preference as P

# Three pairs: summed log-probabilities of chosen / rejected answers under the policy and the
# reference, and the answers' token counts.
PC = [-12.0, -30.5, -7.25]
PR = [-14.0, -29.0, -9.5]
RC = [-12.5, -31.0, -8.0]
RR = [-13.0, -29.5, -9.0]
NC = [6, 15, 4]
NR = [8, 12, 5]


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_dpo_matches_the_formula_pair_by_pair() -> None:
    beta = 0.1
    out = P.dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta)
    expected = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True):
        delta = (pc - rc) - (pr - rr)
        expected.append(-log_sigmoid(beta * delta))
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(out.loss) == pytest.approx(sum(expected) / 3, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * (pc - rc) for pc, rc in zip(PC, RC, strict=True)])
    assert out.rejected_rewards.tolist() == pytest.approx([beta * (pr - rr) for pr, rr in zip(PR, RR, strict=True)])


def test_dpo_label_smoothing_is_conservative_dpo() -> None:
    beta, eps = 0.5, 0.2
    out = P.dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=eps)
    expected = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True):
        z = beta * ((pc - rc) - (pr - rr))
        expected.append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_dpo_at_the_reference_is_log_two_and_ranks_nothing() -> None:
    """A policy equal to its reference: every Δ is 0, the loss log 2, rewards 0, accuracy 0."""
    out = P.dpo_loss(t(PC), t(PR), t(PC), t(PR), beta=0.1)
    assert float(out.loss) == pytest.approx(math.log(2))
    m = P.metrics(out)
    assert m["margin"] == 0.0 and m["accuracy"] == 0.0


def test_ipo_matches_the_length_normalised_formula() -> None:
    beta = 0.25
    out = P.ipo_loss(t(PC), t(PR), t(RC), t(RR), t(NC), t(NR), beta=beta)
    expected = []
    for pc, pr, rc, rr, nc, nr in zip(PC, PR, RC, RR, NC, NR, strict=True):
        delta = (pc - rc) / nc - (pr - rr) / nr
        expected.append((delta - 1 / (2 * beta)) ** 2)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(out.loss) == pytest.approx(sum(expected) / 3, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * (pc - rc) for pc, rc in zip(PC, RC, strict=True)])


def test_orpo_matches_the_odds_ratio_formula() -> None:
    lam, nll = 0.1, 1.75
    out = P.orpo_loss(t(PC), t(PR), t(NC), t(NR), torch.tensor(nll, dtype=torch.float64), beta=lam)
    expected = []
    for pc, pr, nc, nr in zip(PC, PR, NC, NR, strict=True):
        a, b = pc / nc, pr / nr  # mean per-token log-probabilities
        log_odds = (a - math.log(1 - math.exp(a))) - (b - math.log(1 - math.exp(b)))
        expected.append(-lam * log_sigmoid(log_odds))
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(out.loss) == pytest.approx(nll + sum(expected) / 3, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([lam * pc / nc for pc, nc in zip(PC, NC, strict=True)])


def test_orpo_odds_ratio_equals_trls() -> None:
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # TRL: a test dependency (pyproject's test extra)

    lam = 0.2
    chosen, rejected = t(PC) / t(NC), t(PR) / t(NR)  # TRL takes the mean per-token log-probabilities
    fake = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    out = P.orpo_loss(t(PC), t(PR), t(NC), t(NR), torch.tensor(0.0, dtype=torch.float64), beta=lam)
    # TRL returns λ·log σ(log odds) (the trainer subtracts its mean); lorakit the loss, its negative.
    assert out.losses.tolist() == pytest.approx((-trl_losses).tolist(), rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx(trl_chosen.tolist(), rel=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx(trl_rejected.tolist(), rel=1e-6)


def test_log1mexp_is_accurate_on_both_branches() -> None:
    for x in (-1e-8, -1e-3, -0.5, -math.log(2), -0.9, -5.0, -40.0):
        got = float(P.log1mexp(torch.tensor(x, dtype=torch.float64)))
        assert got == pytest.approx(math.log(-math.expm1(x)), rel=1e-12)


@pytest.mark.parametrize("method", P.METHODS)
def test_gradients_match_finite_differences(method: str) -> None:
    def loss(pc, pr, rc, rr):
        if method == "dpo":
            return P.dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.1).loss
        if method == "ipo":
            return P.ipo_loss(pc, pr, rc, rr, t(NC), t(NR), beta=0.3).loss
        return P.orpo_loss(pc, pr, t(NC), t(NR), (rc.sum() + rr.sum()) * 0.01, beta=0.3).loss

    inputs = tuple(t(v).requires_grad_() for v in (PC, PR, RC, RR))
    assert torch.autograd.gradcheck(loss, inputs)


def test_dpo_gradient_by_hand() -> None:
    """d loss / d policy_chosen = −β·σ(−βΔ)/n for DPO without smoothing (n pairs)."""
    beta = 0.1
    pc = t(PC).requires_grad_()
    P.dpo_loss(pc, t(PR), t(RC), t(RR), beta=beta).loss.backward()
    for i, (c, r, rc, rr) in enumerate(zip(PC, PR, RC, RR, strict=True)):
        z = beta * ((c - rc) - (r - rr))
        assert float(pc.grad[i]) == pytest.approx(-beta / (1 + math.exp(z)) / 3, rel=1e-12)


def test_metrics_are_the_rewards_margin_and_accuracy() -> None:
    out = P.dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=1.0)
    chosen = [pc - rc for pc, rc in zip(PC, RC, strict=True)]
    rejected = [pr - rr for pr, rr in zip(PR, RR, strict=True)]
    m = P.metrics(out)
    assert m["rewards_chosen"] == pytest.approx(sum(chosen) / 3)
    assert m["rewards_rejected"] == pytest.approx(sum(rejected) / 3)
    assert m["margin"] == pytest.approx((sum(chosen) - sum(rejected)) / 3)
    assert m["accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected, strict=True)) / 3)


@pytest.mark.parametrize(
    ("method", "beta", "smoothing", "message"),
    [
        ("kto", 0.1, 0.0, "unknown preference method 'kto'"),
        ("dpo", 0.0, 0.0, "--beta must be a finite number > 0"),
        ("dpo", -1.0, 0.0, "--beta must be a finite number > 0"),
        ("dpo", math.nan, 0.0, "--beta must be a finite number > 0"),
        ("orpo", 0.0, 0.0, "λ (the odds-ratio weight) of orpo"),
        ("dpo", 0.1, 0.5, "--label-smoothing must be in [0, 0.5)"),
        ("ipo", 0.1, 0.1, "--label-smoothing applies to dpo only"),
    ],
)
def test_bad_options_are_refused(method: str, beta: float, smoothing: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        P.check_preference_options(method, beta, smoothing)
