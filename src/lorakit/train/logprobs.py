"""Summed log-probabilities of sequences under a causal LM, without the N×V logits.

Preference losses (`lorakit.train.preference`) read one number per sequence: Σ log p(y_t | y_<t) over
the sequence's scored tokens (its labels other than -100). `sequence_logprobs` runs the model once on
a batch — padded rows, one sequence each, or packed rows tagged with a `sequence_index` — and
returns these sums and the token counts.

As the chunked loss (`lorakit.train.chunked_loss`), it runs the model with its output head bypassed,
keeps the hidden states of the positions that predict a scored token, and puts them through head +
log-softmax `chunk_tokens` rows at a time:

- a plain head (`nn.Linear`, a tied embedding, a `QuantizedLinear`, a `modules_to_save` copy, a
  `LoraLinear` over one) whose parameters take no gradient is one autograd node,
  `_LinearLogProbs`: each chunk's gradient with respect to the hidden states, (onehot − softmax)·W,
  is computed in the forward, so the chunk's logits are never recomputed and never kept; the
  backward scales each row by the gradient its log-probability receives;
- a head whose parameters train (a LoRA adapter on the head, a `modules_to_save` copy, full
  fine-tuning) needs each row's gradient weighted before it sums into the parameters', so each
  chunk's logits are computed inside a non-reentrant checkpoint and recomputed in the backward;
  its LoRA dropout mask is still drawn over the whole input, as the head's own forward draws it;
- a head `chunked_loss` calls per chunk (DoRA, per-row routing) is called on each chunk inside a
  non-reentrant checkpoint (its dropout masks drawn chunk by chunk).

`loss="full"` takes the model's logits instead: the reference, equal up to float rounding
(`tests/unit/test_logprobs.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.data import IGNORE_INDEX
from lorakit.errors import TrainingError

# The chunked loss's head bypass and eligibility rules, shared so both paths accept the same heads.
from lorakit.train.chunked_loss import (
    _bypassed,
    _check_targets,
    _fast_plan,
    _vocab,
    _whole,
    check_loss_options,
    chunk_tokens_for,
    chunked_head,
    head_input_grad,
    head_logits,
    head_weight,
    stored_table,
)
from lorakit.train.loss import logits_of

__all__ = ["SequenceLogprobs", "linear_token_logprobs", "sequence_logprobs", "token_logprobs"]


@dataclass(frozen=True)
class SequenceLogprobs:
    """What `sequence_logprobs` returns.

    Attributes:
        sums: (sequences,) float32, Σ log p over each sequence's scored tokens (differentiable when
            grad mode is on).
        counts: (sequences,) int64, each sequence's scored tokens.
    """

    sums: torch.Tensor
    counts: torch.Tensor


def sequence_logprobs(
    model: nn.Module,
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    *,
    sequence_index: torch.Tensor | None = None,
    sequences: int | None = None,
    loss: str = "chunked",
    chunk_tokens: int | None = None,
) -> SequenceLogprobs:
    """Run `model(**inputs)` once and sum the log-probability of each sequence's scored tokens.

    Position t's logits score label t+1 (labels -100 are not scored), as the training loss reads them.

    Args:
        model: a causal LM (or its DDP wrapper, or FSDP-sharded).
        inputs: its keyword inputs, on its device.
        labels: (rows, seq) token labels.
        sequence_index: (rows, seq) the sequence each token belongs to (packed rows; -1 on padding);
            None: row i is sequence i.
        sequences: how many sequences (default: the rows, or the largest index + 1).
        loss: `"chunked"` (without the logits, where `chunked_loss.chunked_head` finds the head) or
            `"full"` (from the model's logits).
        chunk_tokens: rows per chunk (default: `chunked_loss.chunk_tokens_for(vocab)`).

    Returns:
        The per-sequence sums and token counts.

    Raises:
        ConfigError: a bad `loss` or `chunk_tokens`.
        TrainingError: labels that are not (rows, seq) or a label outside the vocabulary; a model
            that transforms its head's output (use `loss="full"`).
    """
    check_loss_options(loss, chunk_tokens)
    if labels.ndim != 2:
        raise TrainingError(f"sequence log-probabilities need (rows, seq) token labels, got shape {list(labels.shape)}")
    if sequence_index is None:
        sequence_index = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
        count = labels.shape[0] if sequences is None else sequences
    else:
        count = int(sequence_index.max()) + 1 if sequences is None else sequences
    head = chunked_head(model) if loss == "chunked" else None
    with _denormals_flushed():
        if head is None:
            per_token = token_logprobs(logits_of(model(**inputs)), labels)
        else:
            with _bypassed(head) as seen:
                outputs = model(**inputs)
            if not seen:  # the forward never called the head: its outputs are real logits
                per_token = token_logprobs(logits_of(outputs), labels)
            else:
                hidden = seen[-1]
                if len(seen) != 1 or logits_of(outputs) is not hidden:
                    raise TrainingError(
                        f"{type(model).__name__} does not return its output head's result as its logits, so its "
                        "log-probabilities cannot be computed without them; train with loss='full'"
                    )
                per_token = linear_token_logprobs(hidden, head, labels, chunk_tokens=chunk_tokens)
    keep = labels[:, 1:] != IGNORE_INDEX
    owner = sequence_index[:, 1:].to(keep.device)[keep].to(per_token.device)  # (N,): the sequence of each scored token
    sums = torch.zeros(count, dtype=torch.float32, device=per_token.device).index_add(0, owner, per_token)
    counts = torch.zeros(count, dtype=torch.long, device=per_token.device)
    counts.index_add_(0, owner, torch.ones_like(owner))
    return SequenceLogprobs(sums=sums, counts=counts)


@contextlib.contextmanager
def _denormals_flushed() -> Iterator[None]:
    """Subnormal floats flushed to zero inside, the previous mode after.

    A softmax over tens of thousands of logits is mostly numbers below float32's smallest normal
    (1.2e-38), which x86 CPUs compute many times slower; zero in their place changes no sum above
    that. `fit` flushes for its whole run; this covers the evaluations and the precomputed reference
    that run outside it. The mode is process-wide, so it is put back.
    """
    was = float(torch.tensor([1e-40]) * 1.0) == 0.0  # a float32 subnormal survives unless flushed
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p of each scored label from full logits, in float32: the reference path.

    Args:
        logits: (rows, seq, vocab).
        labels: (rows, seq); position t's logits score label t+1.

    Returns:
        (N,) the scored labels' log-probabilities, row by row, in order.
    """
    if logits.ndim != 3 or logits.shape[:2] != labels.shape:
        raise TrainingError(
            f"token labels {list(labels.shape)} need logits (rows, seq, vocab), got {list(logits.shape)}"
        )
    labels = labels.to(logits.device)
    keep = labels[:, 1:] != IGNORE_INDEX
    rows = logits[:, :-1][keep].float()  # (N, V)
    targets = labels[:, 1:][keep]
    _check_targets(targets, rows.shape[-1])
    return rows.log_softmax(dim=-1).gather(1, targets[:, None])[:, 0]


def linear_token_logprobs(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, *, chunk_tokens: int | None = None
) -> torch.Tensor:
    """log p of each scored label from the head's input, without the (N, V) logits.

    Equals `token_logprobs(head(hidden), labels)`; only the positions that score a label go through
    the head, `chunk_tokens` at a time.

    Args:
        hidden: (rows, seq, hidden) the head's input.
        head: the output head (see `chunked_loss.chunked_head`).
        labels: (rows, seq) token labels.
        chunk_tokens: rows per chunk.

    Returns:
        (N,) float32 log-probabilities, differentiable with respect to `hidden` and whatever of the
        head trains.
    """
    if hidden.ndim != 3 or labels.ndim != 2 or hidden.shape[:2] != labels.shape:
        raise TrainingError(
            f"token labels {list(labels.shape)} need hidden states (rows, seq, hidden), got {list(hidden.shape)}"
        )
    labels = labels.to(hidden.device)
    keep = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep]

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t[:, :-1][keep]

    plan = _fast_plan(head)
    if plan is None:  # a head lorakit computes by calling it (DoRA, per-row routing, unknown)
        vocab = _vocab(head, hidden)
        _check_targets(targets, vocab)
        return _checkpointed_chunks(head, rows(hidden), targets, chunk_tokens or chunk_tokens_for(vocab))
    weight, bias = head_weight(plan.linear, hidden.dtype), _whole(plan.linear.bias)
    vocab = weight.shape[0]
    _check_targets(targets, vocab)
    low_rank: list[torch.Tensor] = []
    scalings: list[float] = []
    for record in plan.records:
        # The branch as LoraLinear computes it, s·((dropout(x)·Aᵀ)·Bᵀ): the first product here on the
        # kept rows, with the mask drawn over the whole input where the head's own forward draws it.
        A = record.lora_A
        low_rank += [F.linear(rows(plan.lora.dropout(record, hidden)).to(A.dtype), A), record.lora_B]
        scalings.append(record.scaling)
    h = rows(hidden)
    autocast = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else None
    spec = (chunk_tokens or chunk_tokens_for(vocab), autocast, tuple(scalings))
    head_trains = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (weight, bias, *low_rank[1::2])
    )
    if head_trains:  # per-row gradients of the head's own parameters: each chunk recomputed in the backward
        return _checkpointed_linear_chunks(h, targets, weight, bias, spec, low_rank)
    return _LinearLogProbs.apply(h, targets, weight, bias, spec, *low_rank)


def _checkpointed_chunks(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each chunk's head call and log-softmax in a non-reentrant checkpoint (its logits recomputed in
    the backward); at least one chunk runs, so the head's parameters are in the graph. A dropout
    inside the head draws its masks chunk by chunk."""
    parts = []
    for start in range(0, max(h.shape[0], 1), chunk):
        h_c, t_c = h[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, head, h_c, t_c, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(head, h_c, t_c))
    return torch.cat(parts)


def _chunk_logprobs(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (C, V)
    return logits.log_softmax(dim=-1).gather(1, targets[:, None])[:, 0]


def _checkpointed_linear_chunks(
    h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: tuple, low_rank: list
) -> torch.Tensor:
    """z = h·Wᵀ + b + Σ s·u·Bᵀ and its log-softmax per chunk, each in a non-reentrant checkpoint, so
    the head's trained parameters (W, b, a LoRA B, and A through u) get autograd's gradients while a
    chunk's logits live only inside it."""
    chunk, autocast, scalings = spec
    parts = []
    for start in range(0, max(h.shape[0], 1), chunk):
        end = start + chunk
        pieces = [t[start:end] if k % 2 == 0 else t for k, t in enumerate(low_rank)]  # u rows, whole B
        args = (h[start:end], targets[start:end], weight, bias, autocast, scalings, *pieces)
        parts.append(checkpoint(_linear_chunk_logprobs, *args, use_reentrant=False))
    return torch.cat(parts)


def _linear_chunk_logprobs(h, targets, weight, bias, autocast, scalings, *low_rank) -> torch.Tensor:
    dtype = autocast or h.dtype
    z = F.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).float()
    for u, B, s in zip(low_rank[::2], low_rank[1::2], scalings, strict=True):
        lora_dtype = autocast or u.dtype
        z = z + (F.linear(u.to(lora_dtype), B.to(lora_dtype)) * s).float()
    return z.log_softmax(dim=-1).gather(1, targets[:, None])[:, 0]


class _LinearLogProbs(torch.autograd.Function):
    """log p_i = z_i[y_i] − logsumexp(z_i) with z = h·Wᵀ + b (+ Σ_k s_k·u_k·B_kᵀ), chunk by chunk.

    Shapes: h (N, hidden), W (V, hidden), b (V,), targets (N,); frozen LoRA pairs u_k (N, r) =
    dropout(h)·A_kᵀ and B_k (V, r). For a chunk of C rows, in float32:

        ∂log p_i/∂z_i = onehot(y_i) − softmax(z_i)              (C, V), in place of the logits
        ∂log p_i/∂h_i = (onehot(y_i) − softmax(z_i))·W          (C, hidden), kept

    The backward multiplies row i of the kept (N, hidden) gradient by the gradient log p_i receives.
    Only h takes a gradient here (`linear_token_logprobs` sends a head that trains elsewhere).
    """

    @staticmethod
    def forward(ctx, h, targets, weight, bias, spec, *low_rank):
        chunk, autocast, scalings = spec
        n = h.shape[0]
        dtype = autocast or h.dtype
        need_h = h.requires_grad
        with torch.autocast(h.device.type, enabled=False):
            W = weight.detach() if stored_table(weight, dtype) else weight.detach().to(dtype)
            b = bias.detach().to(dtype) if bias is not None else None
            pairs = [(u.detach(), B.detach()) for u, B in zip(low_rank[::2], low_rank[1::2], strict=True)]
            out = torch.empty(n, dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                h_c, y = h[start:end].detach().to(dtype), targets[start:end]
                z = head_logits(h_c, W, b)  # (C, V) float32
                for (u, B), s in zip(pairs, scalings, strict=True):
                    lora_dtype = autocast or u.dtype
                    z += (F.linear(u[start:end].to(lora_dtype), B.to(lora_dtype)) * s).float()
                lse = torch.logsumexp(z, dim=-1)  # (C,)
                out[start:end] = z.gather(1, y[:, None])[:, 0] - lse
                if not need_h:
                    continue
                g = z.sub_(lse[:, None]).exp_().neg_()  # −softmax(z), in place: (C, V)
                g.scatter_add_(1, y[:, None], torch.ones((end - start, 1), device=g.device))
                grad_h[start:end] = head_input_grad(g.to(dtype), W).to(h.dtype)
        ctx.grad_h = grad_h
        ctx.inputs = 5 + len(low_rank)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_h = ctx.grad_h
        del ctx.grad_h  # handed on once
        rest = (None,) * (ctx.inputs - 1)
        if grad_h is None:
            return (None, *rest)
        return ((grad_h.float() * grad_out[:, None].float()).to(grad_h.dtype), *rest)
