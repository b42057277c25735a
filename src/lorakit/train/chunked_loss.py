"""The causal-LM loss without the N×V logits: the output head and the cross entropy in chunks of tokens.

The full path (`loss.loss_sum`) takes the model's (batch, seq, vocab) logits, and the cross entropy
makes their float32 copy and, in the backward, a gradient of the same size: for SmolLM2
(V = 49,152) at 8×512 tokens, 0.8 GB each. Here the model runs with its output head bypassed (the
head's `forward` is an identity for that one call, so it returns the head's input, the last hidden
states), the positions whose label is ignored (-100) are dropped, and the rest go through
head + log-softmax + NLL `chunk_tokens` rows at a time, accumulated in float32:

- a plain head (`nn.Linear`, a tied embedding, a `QuantizedLinear`, a `modules_to_save` copy, a
  `LoraLinear` over one of those with plain LoRA adapters) is one autograd node,
  `_LinearCrossEntropy`, which also computes each chunk's gradient in the forward (Liger-Kernel's
  fused linear cross entropy): the chunk's logits are never recomputed, so a step costs the same
  products as the full path, and only the gradients of the inputs (N × hidden, the head's weight
  if it trains, LoRA's N × r and vocab × r) wait for the backward;
- any other head (a DoRA adapter, per-row routing, a head lorakit does not know) is called on
  each chunk inside a non-reentrant `torch.utils.checkpoint`, so its chunk's logits are
  recomputed in the backward instead of kept.

`model_loss_sum` is what `train_step` and `evaluate.loss_on` call: the chunked path where
`chunked_head` finds one, else the full path. Both give the same loss and gradients up to float
rounding (`tests/unit/test_chunked_loss.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from lorakit.data import IGNORE_INDEX
from lorakit.errors import ConfigError, TrainingError
from lorakit.kernels.guards import compiling, hooked
from lorakit.layers import LoraLinear, SavedModule
from lorakit.quantized import dequantized_weight, is_quantized
from lorakit.train.config import LOSSES
from lorakit.train.loss import logits_of, loss_sum
from lorakit.train.sharding import is_sharded

__all__ = [
    "CHUNK_ELEMENTS",
    "check_loss_options",
    "chunk_tokens_for",
    "chunked_head",
    "linear_cross_entropy",
    "model_loss_sum",
]

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk by default: 16M float32 values (64 MiB; their log-softmax, which becomes their
gradient in place, as much again): 341 tokens of SmolLM2's vocabulary (49,152), 524 of LLaMA-2's
(32,000). Measured on 2 CPU threads (2×512 tokens, hidden 576, vocabulary 49,152, loss forward and
backward): chunks of 170 tokens took about the full path's time, 341 and 512 less."""

# Config fields of transformers models that transform the logits after the head (Gemma's soft
# capping, Cohere's and Granite's scaling, a padded vocabulary cut back): the head's input alone
# does not give those logits, so such a model takes the full path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "unpadded_vocab_size")


def chunk_tokens_for(vocab_size: int, budget: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that a chunk's logits hold about `budget` values: max(1, budget // vocab)."""
    return max(1, budget // max(1, vocab_size))


# ------------------------------------------------------------------------------- eligibility
def chunked_head(model: nn.Module) -> nn.Module | None:
    """The output head whose logits the chunked loss computes itself, or None for the full path.

    What it saves: the (batch, seq, vocab) logits, their float32 copy and their gradient (about
    3·N·V values), leaving chunks of `chunk_tokens` × V. It steps aside (None) for a model whose
    head it cannot bypass safely:

    - no `get_output_embeddings()` head (not a transformers causal LM);
    - a compiled model (`torch.compile`, `module.compile()`) or head, or a call inside
      torch.compile: the compiled graph would not see the bypass;
    - a head with forward hooks (they would see hidden states instead of logits) or whose
      `forward` was already replaced on the instance (accelerate's hooks, another bypass);
    - a model whose config transforms the logits after the head (`_LOGIT_TRANSFORMS`);
    - an FSDP-sharded model whose head has a parameter that trains: `shard` reshards the root
      after its forward, so the head's weight is this rank's rows (a DTensor) by the time the loss
      runs, and its gradient would have to reach FSDP's reduce-scatter outside the root's
      forward. A frozen head's weight is gathered whole (`full_tensor`) for the loss.

    A DDP wrapper is looked through (`model.module`): its forward still runs as usual.
    """
    if compiling():
        return None
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    if _compiled(model) or _compiled(inner):
        return None
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or _compiled(head) or hooked(head) or "forward" in vars(head):
        return None
    config = getattr(inner, "config", None)
    configs = [config, getattr(config, "text_config", None)] if config is not None else []
    if any(getattr(c, name, None) is not None for c in configs if c is not None for name in _LOGIT_TRANSFORMS):
        return None
    if is_sharded(inner) and any(p.requires_grad for p in head.parameters()):
        return None
    return head


def _compiled(module: nn.Module) -> bool:
    # torch.compile(model) returns an OptimizedModule (it keeps the original as `_orig_mod`);
    # module.compile() sets `_compiled_call_impl`, which nn.Module calls instead of forward.
    return hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None


# ------------------------------------------------------------------------------------ entry
def model_loss_sum(
    model: nn.Module,
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    *,
    loss: str = "chunked",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Run `model(**inputs)` and return its cross entropy summed over the target tokens, in float32.

    The same value as `loss_sum(logits_of(model(**inputs)), labels, label_smoothing)` (the full
    path, which `loss="full"` runs). With `loss="chunked"` and (batch, seq) token labels, a model
    whose head `chunked_head` accepts runs with the head bypassed and its loss goes through
    `linear_cross_entropy`; classification labels (batch,) and every other model take the full path.

    Args:
        model: the model, or its DDP wrapper, or the model sharded by FSDP.
        inputs: the model's keyword inputs (without `labels`), on its device.
        labels: (batch, seq) token labels (-100: no target) or (batch,) class labels.
        label_smoothing: as `F.cross_entropy`'s, in [0, 1).
        loss: `"chunked"` or `"full"`.
        chunk_tokens: tokens per chunk (default: `chunk_tokens_for(vocab)`).

    Returns:
        A float32 scalar (0 when nothing is a target), differentiable when grad mode is on.

    Raises:
        ConfigError: `loss` not one of `LOSSES`, a `chunk_tokens` that is not a positive integer.
        TrainingError: labels that fit neither task; a model that changed the output of its head
            after calling it in a way `chunked_head` could not see (use `loss="full"`).
    """
    check_loss_options(loss, chunk_tokens)
    head = chunked_head(model) if loss == "chunked" and labels.ndim == 2 else None
    if head is None:
        return loss_sum(logits_of(model(**inputs)), labels, label_smoothing)
    with _bypassed(head) as seen:
        outputs = model(**inputs)
    if not seen:  # the forward never called the head: what it returned are real logits
        return loss_sum(logits_of(outputs), labels, label_smoothing)
    hidden = seen[-1]
    if len(seen) != 1 or logits_of(outputs) is not hidden:
        raise TrainingError(
            f"{type(model).__name__} does not return its output head's result as its logits (it calls the head "
            f"{len(seen)} time(s) or transforms what the head returns), so the chunked loss cannot stand in for "
            "its logits; train with loss='full'"
        )
    return linear_cross_entropy(hidden, head, labels, label_smoothing, chunk_tokens=chunk_tokens)


def check_loss_options(loss: str, chunk_tokens: int | None) -> None:
    """Check `model_loss_sum`'s options (callers check before their slow part).

    Raises:
        ConfigError: `loss` not one of `LOSSES` (the message lists them), a `chunk_tokens` that is
            not a positive integer; every problem at once.
    """
    problems = []
    if loss not in LOSSES:
        problems.append(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
    if chunk_tokens is not None and (
        isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1
    ):
        problems.append(f"chunk_tokens must be an integer >= 1 or None, got {chunk_tokens!r}")
    if problems:
        raise ConfigError("; ".join(problems))


@contextlib.contextmanager
def _bypassed(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside, calling `head` returns its input unchanged, and the list yielded collects those inputs.

    The identity is the head's `forward`, set on the instance (it shadows the class's), so the
    model's own forward — and a DDP or FSDP wrapper's around it — runs as usual; it is removed on
    leaving, whatever happened.
    """
    seen: list[torch.Tensor] = []

    def identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(x)
        return x

    head.forward = identity
    try:
        yield seen
    finally:
        del head.forward


# ------------------------------------------------------------------------------------ the loss
def linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    *,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Σ over target positions of cross_entropy(head(hidden), labels shifted), without the N×V logits.

    Equals `loss_sum(head(hidden), labels, label_smoothing)`: position t's logits predict label
    t+1, labels -100 are no target, `label_smoothing` as `F.cross_entropy` defines it. The positions
    without a target are dropped first (only their hidden states are); the N that remain go through
    the head in chunks of `chunk_tokens` rows, each chunk's log-softmax and NLL in float32.

    Args:
        hidden: (batch, seq, hidden) the head's input (the model's last hidden states).
        head: the output head (see `chunked_head`); under FSDP a frozen head's sharded weight is
            gathered whole here, on every rank.
        labels: (batch, seq) token labels.
        label_smoothing: in [0, 1).
        chunk_tokens: rows per chunk (default: `chunk_tokens_for(vocab)`).

    Returns:
        A float32 scalar; its gradient reaches `hidden` and whatever of the head trains (the
        weight, tied to the input embedding or not, a bias, LoRA's A and B).

    Raises:
        TrainingError: hidden states and labels whose shapes do not match; a label outside the
            vocabulary.
    """
    if hidden.ndim != 3 or labels.ndim != 2 or hidden.shape[:2] != labels.shape:
        raise TrainingError(
            f"token labels {list(labels.shape)} need hidden states (batch, seq, hidden), got {list(hidden.shape)}"
        )
    # (B, T) -> the N kept positions: position t predicts label t+1, so the last has no target.
    labels = labels.to(hidden.device)
    keep = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    targets = labels[:, 1:][keep]  # (N,)

    def rows(t: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (N, d): the positions that predict a target."""
        return t[:, :-1][keep]

    plan = _fast_plan(head)
    if plan is None:
        vocab = _vocab(head, hidden)
        _check_targets(targets, vocab)
        chunk = chunk_tokens or chunk_tokens_for(vocab)
        return _checkpointed_chunks(head, rows(hidden), targets, label_smoothing, chunk)
    weight, bias = head_weight(plan.linear, hidden.dtype), _whole(plan.linear.bias)
    vocab = weight.shape[0]
    _check_targets(targets, vocab)
    low_rank: list[torch.Tensor] = []
    scalings: list[float] = []
    for record in plan.records:
        # The branch as LoraLinear computes it, s·((dropout(x)·Aᵀ)·Bᵀ); the first product here on the
        # kept rows, the second in the node. The mask is drawn over the whole (B, T, hidden) input,
        # exactly where the head's own forward would draw it, so both paths drop the same elements.
        A = record.lora_A
        u = F.linear(rows(plan.lora.dropout(record, hidden)).to(A.dtype), A)  # (N, r)
        low_rank += [u, record.lora_B]
        scalings.append(record.scaling)
    h = rows(hidden)  # (N, hidden)
    grads = torch.is_grad_enabled()
    spec = _Spec(
        smoothing=float(label_smoothing),
        chunk=chunk_tokens or chunk_tokens_for(vocab),
        autocast=torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else None,
        scalings=tuple(scalings),
        needs=tuple(grads and t is not None and t.requires_grad for t in (h, weight, bias, *low_rank)),
    )
    return _LinearCrossEntropy.apply(h, targets, weight, bias, spec, *low_rank)


@dataclass(frozen=True)
class _Plan:
    """A head the fused node computes: `linear` (its weight and bias), plus, when it is a
    `LoraLinear` (`lora`), the plain LoRA adapters its forward adds (`records`)."""

    linear: nn.Linear
    lora: LoraLinear | None = None
    records: tuple = ()


def _fast_plan(head: nn.Module) -> _Plan | None:
    """How the fused node computes `head`, or None for the per-chunk checkpoint of the head's call.

    The node takes an `nn.Linear` (or `QuantizedLinear`) as it is, a `modules_to_save` copy
    (`SavedModule`, without per-row routing) as the copy its forward runs, and a `LoraLinear` over
    such a linear whose active unmerged adapters are plain LoRA (no variant, no fused slices, no
    per-row routing); anything else, or anything hooked, is called as it is.
    """
    if hooked(head):
        return None
    if isinstance(head, SavedModule):
        return _fast_plan(head.current()) if head.rows is None or head.disabled else None
    if isinstance(head, LoraLinear):
        base = head.base_layer
        if (head.rows is not None and not head.disabled) or not _plain_linear(base) or hooked(base):
            return None
        records = head.pending()
        if any(r.variant is not None or r.slices is not None for r in records):
            return None
        return _Plan(linear=base, lora=head, records=tuple(records))
    return _Plan(linear=head) if _plain_linear(head) else None


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or is_quantized(module)


def _whole(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor as a whole: an FSDP shard (DTensor, frozen: see `chunked_head`) gathered on every rank."""
    if tensor is not None and hasattr(tensor, "full_tensor"):
        return tensor.detach().full_tensor()
    return tensor


def _vocab(head: nn.Module, hidden: torch.Tensor) -> int:
    """The head's output size: its `out_features`, else what one row gives (with the RNG forked, so
    a dropout inside draws nothing the training run would see)."""
    if isinstance(head, SavedModule):
        head = head.original_module
    out = getattr(head, "out_features", None)
    if isinstance(out, int):
        return out
    devices = [hidden.device] if hidden.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        return int(head(hidden[:1, :1]).shape[-1])


def _check_targets(targets: torch.Tensor, vocab: int) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        bad = targets[(targets < 0) | (targets >= vocab)][0]
        raise TrainingError(f"label {int(bad)} is outside the vocabulary of the output head (0 to {vocab - 1})")


def _checkpointed_chunks(
    head: nn.Module, h: torch.Tensor, targets: torch.Tensor, smoothing: float, chunk: int
) -> torch.Tensor:
    """Σ CE(head(h_chunk)), each chunk's head call and CE in a non-reentrant checkpoint: the chunk's
    logits are recomputed in the backward (with the RNG state of the forward) instead of kept.

    At least one (possibly empty) chunk runs, so the head's parameters are in the graph even when
    nothing is a target (DDP expects a gradient, zero, for each).
    """
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, max(h.shape[0], 1), chunk):
        h_c, t_c = h[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_loss, head, h_c, t_c, smoothing, use_reentrant=False)
        else:
            part = _chunk_loss(head, h_c, t_c, smoothing)
        total = total + part
    return total


def _chunk_loss(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    logits = head(h)  # (C, V)
    return F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=smoothing)


@dataclass(frozen=True)
class _Spec:
    """What `_LinearCrossEntropy` needs besides tensors.

    Attributes:
        smoothing: label smoothing ε.
        chunk: rows per chunk.
        autocast: the dtype the head's products take under `torch.autocast` (None: off).
        scalings: each LoRA adapter's s.
        needs: whether each tensor input (h, weight, bias, then each u and B) needs a gradient.
    """

    smoothing: float
    chunk: int
    autocast: torch.dtype | None
    scalings: tuple[float, ...]
    needs: tuple[bool, ...]


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ_i CE(z_i, y_i) with z = h·Wᵀ + b + Σ_k s_k·u_k·B_kᵀ, chunk by chunk, gradients computed in the forward.

    Shapes: h (N, hidden), W (V, hidden), b (V,), each u_k (N, r) = dropout(h)·A_kᵀ (computed by
    autograd outside), B_k (V, r). For a chunk of C rows, in float32:

        z = h_c·Wᵀ + b (in the head's dtype, as its forward, then float32) + Σ s_k·(u_c·B_kᵀ)
        loss_c = Σ_rows (1 − ε)·(lse(z) − z_y) + ε·(lse(z) − mean(z))        (F.cross_entropy's ε)
        g = ∂loss_c/∂z = softmax(z) − (1 − ε)·onehot(y) − ε/V                (C, V)
        ∂h_c = g·W,  ∂W += gᵀ·h_c,  ∂b += Σ_rows g,  ∂u_c = s·g·B,  ∂B += s·gᵀ·u_c

    Only the input gradients asked for are computed, and kept (∂W, ∂b, ∂B summed in float32) until
    the backward scales them by the incoming gradient: a chunk's (C, V) logits never outlive it.
    """

    @staticmethod
    def forward(ctx, h, targets, weight, bias, spec: _Spec, *low_rank):
        n, vocab = h.shape[0], weight.shape[0]
        need_h, need_w, need_b, *need_lr = spec.needs
        dtype = spec.autocast or h.dtype  # the dtype of the head's products (autocast casts its inputs)
        eps = spec.smoothing
        with torch.autocast(h.device.type, enabled=False):
            W = weight.detach() if stored_table(weight, dtype) else weight.detach().to(dtype)
            b = bias.detach().to(dtype) if bias is not None else None
            pairs = [(u.detach(), B.detach()) for u, B in zip(low_rank[::2], low_rank[1::2], strict=True)]
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=h.device) if need_b else None
            grad_u = [torch.empty_like(u) if need_lr[2 * k] else None for k, (u, _) in enumerate(pairs)]
            grad_B = [
                torch.zeros(B.shape, dtype=torch.float32, device=h.device) if need_lr[2 * k + 1] else None
                for k, (_, B) in enumerate(pairs)
            ]
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, n, spec.chunk):
                end = min(start + spec.chunk, n)
                h_c, y = h[start:end].detach().to(dtype), targets[start:end]
                z = head_logits(h_c, W, b)  # (C, V) float32
                branch_inputs = []
                for (u, B), s in zip(pairs, spec.scalings, strict=True):
                    lora_dtype = spec.autocast or u.dtype
                    u_c = u[start:end].to(lora_dtype)
                    z += (F.linear(u_c, B.to(lora_dtype)) * s).float()
                    branch_inputs.append(u_c)
                logp = torch.log_softmax(z, dim=-1)  # (C, V); one fused pass, as F.cross_entropy's
                del z
                nll = logp.gather(1, y[:, None]).sum().neg()
                total += (nll * (1 - eps) - logp.mean(dim=-1).sum() * eps) if eps else nll
                if not any(spec.needs):
                    continue
                g = logp.exp_()  # softmax(z), in place: (C, V)
                g.scatter_add_(1, y[:, None], torch.full((end - start, 1), eps - 1.0, device=g.device))
                if eps:
                    g.sub_(eps / vocab)
                g_head = g.to(dtype)
                if need_h:
                    grad_h[start:end] = head_input_grad(g_head, W).to(h.dtype)
                if need_w:
                    _accumulate(grad_w, g_head.T, h_c)
                if need_b:
                    grad_b += g.sum(dim=0)
                for k, ((u, B), s, u_c) in enumerate(zip(pairs, spec.scalings, branch_inputs, strict=True)):
                    g_lora = g.to(u_c.dtype)
                    if grad_u[k] is not None:
                        grad_u[k][start:end] = ((g_lora @ B.to(u_c.dtype)) * s).to(u.dtype)
                    if grad_B[k] is not None:
                        _accumulate(grad_B[k], g_lora.T, u_c, alpha=s)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.low_rank_dtypes = [t.dtype for t in low_rank]
        ctx.grads = (grad_h, grad_w, grad_b, grad_u, grad_B)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b, grad_u, grad_B = ctx.grads
        del ctx.grads  # the gradients are handed on once

        def scaled(g: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
            return None if g is None else (g * grad_loss).to(dtype)

        low_rank = []
        for k in range(len(grad_u)):
            low_rank += [
                scaled(grad_u[k], ctx.low_rank_dtypes[2 * k]),
                scaled(grad_B[k], ctx.low_rank_dtypes[2 * k + 1]),
            ]
        return (
            scaled(grad_h, grad_h.dtype if grad_h is not None else None),
            None,
            scaled(grad_w, ctx.weight_dtype),
            scaled(grad_b, ctx.bias_dtype),
            None,
            *low_rank,
        )


TABLE_SLICE_ROWS = 8192
"""Vocabulary rows of a bf16-stored head converted at a time (`head_logits`, `head_input_grad`)."""


def head_weight(linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """The head's weight as the fused nodes take it: whole (gathered under FSDP); a quantized head's
    detached, an NF4 one dequantized to `dtype`, a bf16-stored one (`QuantizedLinear`, bf16) as it
    is, for the nodes to convert a slice at a time (`stored_table`)."""
    weight = _whole(linear.weight)
    if is_quantized(linear):
        weight = weight.detach()
        if linear.scheme == "nf4":
            weight = dequantized_weight(weight, dtype)
    return weight


def stored_table(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a frozen head weight is narrower than the products' `dtype` (a bf16-stored table under
    float32 compute): then it is converted `TABLE_SLICE_ROWS` rows at a time, never whole."""
    narrower = weight.element_size() < torch.empty((), dtype=dtype).element_size()
    return not weight.requires_grad and weight.dtype != dtype and narrower


def head_logits(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """(C, V) float32 logits h·Wᵀ + b in h's dtype; a narrower W converted a slice of rows at a time."""
    if W.dtype == h.dtype:
        return F.linear(h, W, b).float()
    z = torch.empty(h.shape[0], W.shape[0], dtype=torch.float32, device=h.device)
    for start in range(0, W.shape[0], TABLE_SLICE_ROWS):
        end = min(start + TABLE_SLICE_ROWS, W.shape[0])
        z[:, start:end] = F.linear(h, W[start:end].to(h.dtype), None if b is None else b[start:end])
    return z


def head_input_grad(g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """g·W for g (C, V) in the products' dtype; a narrower W converted a slice of rows at a time."""
    if W.dtype == g.dtype:
        return g @ W
    out = None
    for start in range(0, W.shape[0], TABLE_SLICE_ROWS):
        end = min(start + TABLE_SLICE_ROWS, W.shape[0])
        part, rows = g[:, start:end], W[start:end].to(g.dtype)
        out = part @ rows if out is None else out.addmm_(part, rows)
    return out


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """out (float32) += alpha·a·b, the product taken in a's dtype (as the full path's backward)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b.to(a.dtype), alpha=alpha)
    else:
        out.add_((a @ b.to(a.dtype)).float(), alpha=alpha)
