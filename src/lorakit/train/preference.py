"""Preference losses as pure functions of sequence log-probabilities: DPO, IPO and ORPO.

Each takes, per pair, the summed log-probability of the chosen and of the rejected answer's tokens
under the policy (and, for DPO and IPO, under the reference), and returns a `PreferenceLoss`: the
mean loss over the pairs, the per-pair losses and the implicit rewards that `metrics` turns into
what a run logs (rewards of chosen and rejected, their margin, the fraction of pairs ranked right).
No model, tokenizer or data here, so every formula can be checked by hand
(`tests/unit/test_preference_losses.py`).

- **DPO** (Rafailov et al., 2023), the sigmoid loss on the difference of log-ratios
  Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)):
  −log σ(β·Δ). With label smoothing ε (conservative DPO, Mitchell 2023: the label is wrong with
  probability ε) it is −(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ), the form TRL's `sigmoid` loss had
  with `label_smoothing` until TRL 1.x moved smoothing to its `robust` and `exo_pair` losses.
- **IPO** (Azar et al., 2023): (Δ̄ − 1/(2β))², where Δ̄ is Δ with each answer's log-ratio divided
  by its number of tokens (TRL's length-normalised form, which the IPO authors confirmed).
- **ORPO** (Hong et al., 2024), no reference: NLL(y_w) − λ·log σ(log odds(y_w) − log odds(y_l)),
  with log odds(y) = log p − log(1 − p) on the answer's mean per-token log-probability p. The NLL is
  passed in (the trainer computes it over the chosen answer's tokens).

The rewards are TRL's: β·(log π − log π_ref) for DPO and IPO (summed log-probabilities), λ times the
mean per-token log-probability for ORPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorakit.errors import ConfigError

__all__ = [
    "METHODS",
    "PreferenceLoss",
    "check_preference_options",
    "dpo_loss",
    "ipo_loss",
    "log1mexp",
    "metrics",
    "orpo_loss",
]

METHODS = ("dpo", "ipo", "orpo")
"""The preference losses lorakit computes; DPO and IPO need a reference, ORPO does not."""


@dataclass(frozen=True)
class PreferenceLoss:
    """The result of one preference loss over a batch of pairs.

    Attributes:
        loss: the scalar to minimise (mean over pairs; ORPO adds the NLL).
        losses: the preference term per pair (without ORPO's NLL).
        chosen_rewards: the implicit reward of each chosen answer (detached).
        rejected_rewards: the implicit reward of each rejected answer (detached).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _f(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (float64 stays float64, for gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def check_preference_options(method: str, beta: float, label_smoothing: float = 0.0) -> None:
    """Refuse an unknown method, β ≤ 0 (or not finite) and label smoothing outside [0, 0.5).

    Raises:
        ConfigError: naming the option, its value and what is allowed.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown preference method {method!r}; choose from {', '.join(METHODS)}")
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        what = "λ (the odds-ratio weight)" if method == "orpo" else "β"
        raise ConfigError(f"--beta must be a finite number > 0 ({what} of {method}), got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and method != "dpo":
        raise ConfigError(f"--label-smoothing applies to dpo only, not {method}")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO's sigmoid loss (conservative with `label_smoothing` > 0).

    Args:
        policy_chosen, policy_rejected: summed log-probabilities of each pair's answers under the
            policy, shape (pairs,).
        ref_chosen, ref_rejected: the same under the reference (no gradient needed).
        beta: β, the strength of the pull towards the reference.
        label_smoothing: ε, the assumed probability that a pair's preference is flipped.

    Returns:
        The loss, per-pair losses and rewards β·(policy − reference).
    """
    check_preference_options("dpo", beta, label_smoothing)
    chosen_ratio = _f(policy_chosen) - _f(ref_chosen)
    rejected_ratio = _f(policy_rejected) - _f(ref_rejected)
    z = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return PreferenceLoss(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
) -> PreferenceLoss:
    """IPO's squared loss on the length-normalised difference of log-ratios.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: as for `dpo_loss` (sums).
        chosen_tokens, rejected_tokens: each answer's number of scored tokens (at least 1 is used).
        beta: τ of the IPO paper (β in TRL).

    Returns:
        The loss, per-pair losses and rewards β·(policy − reference) of the summed log-probabilities.
    """
    check_preference_options("ipo", beta)
    chosen_ratio = _f(policy_chosen) - _f(ref_chosen)
    rejected_ratio = _f(policy_rejected) - _f(ref_rejected)
    delta = chosen_ratio / _f(chosen_tokens).clamp(min=1) - rejected_ratio / _f(rejected_tokens).clamp(min=1)
    losses = (delta - 1 / (2 * beta)) ** 2
    return PreferenceLoss(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, without cancellation (log1p branch below −ln 2, expm1 above)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    nll: torch.Tensor,
    *,
    beta: float,
) -> PreferenceLoss:
    """ORPO: the chosen answers' NLL minus λ times the log-sigmoid of the log odds ratio.

    Args:
        policy_chosen, policy_rejected: summed log-probabilities under the policy (no reference).
        chosen_tokens, rejected_tokens: each answer's number of scored tokens (the odds are taken
            on the mean per-token log-probability).
        nll: the supervised term, a scalar (mean NLL per chosen token).
        beta: λ, the weight of the odds-ratio term.

    Returns:
        The loss (nll − mean of λ·log σ(log odds)), the per-pair odds-ratio losses −λ·log σ(·),
        and rewards λ·(mean per-token log-probability).
    """
    check_preference_options("orpo", beta)
    chosen = _f(policy_chosen) / _f(chosen_tokens).clamp(min=1)
    rejected = _f(policy_rejected) / _f(rejected_tokens).clamp(min=1)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = -beta * F.logsigmoid(log_odds)
    return PreferenceLoss(
        loss=nll + losses.mean(),
        losses=losses,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
    )


def metrics(result: PreferenceLoss) -> dict[str, float]:
    """What a run logs of one batch: loss, the mean rewards, margin and accuracy.

    Returns:
        `loss`, `rewards_chosen`, `rewards_rejected`, `margin` (their mean difference) and
        `accuracy` (the fraction of pairs whose chosen reward is higher).
    """
    margins = result.chosen_rewards - result.rejected_rewards
    return {
        "loss": float(result.loss.detach()),
        "rewards_chosen": float(result.chosen_rewards.mean()),
        "rewards_rejected": float(result.rejected_rewards.mean()),
        "margin": float(margins.mean()),
        "accuracy": float((margins > 0).float().mean()),
    }
