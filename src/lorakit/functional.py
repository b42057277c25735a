"""The LoRA maths, written once (Hu et al., 2022, eq. 3 and section 4.1).

h = W0·x + s·B·A·x, with A ∈ R^{r×in}, B ∈ R^{out×r} and s = α/r (or α/√r with rsLoRA,
Kalajdzievski 2023). Layers, merging, file conversion and the reference twins of the kernels call
these functions; nothing else spells the formula out. Plain tensor operations under autograd: the
memory- and speed-saving versions live in `lorakit.kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "accumulate_dtype",
    "add_delta",
    "add_delta_",
    "conv2d_delta",
    "conv2d_delta_weight",
    "delta_weight",
    "dropout",
    "dropout_active",
    "embedding_delta",
    "expand_fused",
    "fused_linear_delta",
    "linear_delta",
    "scaling",
]


def scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The factor s that multiplies B·A.

    Args:
        r: rank of the update.
        lora_alpha: the α hyper-parameter.
        use_rslora: use α/√r (rank-stabilised LoRA) instead of α/r (the paper's choice).

    Returns:
        s as a Python float.
    """
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any input is float64: never accumulate ΔW in half precision."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def delta_weight(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """ΔW = s·B·A in float32 (float64 for float64 inputs), whatever the parameters' dtype.

    The caller casts the merged weight once (PEFT issue #1388: half-precision ΔW drifts).

    Args:
        A: (r, in).
        B: (out, r).
        s: scaling.

    Returns:
        (out, in) tensor in `accumulate_dtype(A.dtype, B.dtype)`.
    """
    dtype = accumulate_dtype(A.dtype, B.dtype)
    return (B.to(dtype) @ A.to(dtype)) * s


def add_delta(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """W + s·B·A as a new tensor in one pass over W (W (out, in), A and B of W's dtype)."""
    return torch.addmm(W, B, A, alpha=s)


def add_delta_(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, *, transposed: bool = False
) -> torch.Tensor:
    """W += s·B·A in place, for W of A's dtype (no (out, in) temporary); returns W.

    Args:
        W: (out, in), or (in, out) with `transposed` (transformers' `Conv1D` layout).
        A: (r, in).
        B: (out, r).
        s: scaling (negative to subtract).
        transposed: W is stored (in, out): then W += s·Aᵀ·Bᵀ.
    """
    return W.addmm_(A.t(), B.t(), alpha=s) if transposed else W.addmm_(B, A, alpha=s)


def linear_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """The LoRA branch of a linear layer: s·(x·Aᵀ)·Bᵀ.

    Args:
        x: (..., in), dropout already applied.
        A: (r, in), or (batch, r, in) with x (batch, ..., in): one adapter per row.
        B: (out, r), or (batch, out, r).
        s: scaling.

    Returns:
        (..., out) in x's dtype.
    """
    if A.dim() == 2:
        return F.linear(F.linear(x, A), B) * s
    rows = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, in)
    y = torch.bmm(torch.bmm(rows, A.transpose(1, 2)), B.transpose(1, 2))  # (batch, tokens, out)
    y = y.view(*x.shape[:-1], B.shape[1])
    return y if s == 1 else y * s


DROPOUT_RESOLUTION = 1 << 16
"""Dropout masks realise p in steps of 1/65536 (`lorakit.kernels.dropout`); probabilities below
1/131072 act as no dropout."""


def dropout_active(p: float) -> bool:
    """Whether a dropout probability drops anything (p ≥ 1/131072)."""
    return round(p * DROPOUT_RESOLUTION) > 0


def dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a given mask: x·keep/(1 − p).

    Args:
        x: the input.
        keep: 1 where an element is kept, 0 where dropped (bool or a 0/1 float factor), x's shape.
        p: the probability the mask realises (exactly: see `lorakit.kernels.dropout`).
    """
    return x * keep.to(x.dtype) * (1 / (1 - p))


def fused_linear_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, enabled: Sequence[int], n_slices: int
) -> torch.Tensor:
    """The LoRA branch of a fused projection where only some output slices are adapted.

    This is loralib's `MergedLinear(enable_lora=[...])`: each enabled slice j has its own rank-r
    pair (A_j, B_j); slices not enabled get no update.

    Args:
        x: (..., in), dropout already applied.
        A: (e·r, in), the e enabled slices' A_j stacked.
        B: (e·o, r) with o = out / n_slices, the B_j stacked.
        s: scaling.
        enabled: indices of the e adapted slices, ascending.
        n_slices: how many equal slices the layer's output has.

    Returns:
        (..., out) with zeros in slices that are not enabled.
    """
    e = len(enabled)
    r = A.shape[0] // e
    o = B.shape[0] // e
    a = F.linear(x, A).unflatten(-1, (e, r))  # (..., e, r)
    y = torch.einsum("...er,eor->...eo", a, B.view(e, o, r)) * s  # (..., e, o)
    if e == n_slices:
        return y.flatten(-2)
    out = y.new_zeros((*y.shape[:-2], n_slices, o))
    out[..., list(enabled), :] = y
    return out.flatten(-2)


def expand_fused(
    A: torch.Tensor, B: torch.Tensor, enabled: Sequence[int], n_slices: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a sliced fused adapter as one ordinary adapter of the whole layer.

    The result (A_full, B_full) gives B_full·A_full = the block-structured update: A_full is A
    itself (e·r, in) and B_full is (out, e·r) with B_j in rows of slice enabled[j] and columns
    j·r:(j+1)·r, zeros elsewhere. PEFT loads this as a rank-e·r adapter of the fused layer.

    Args:
        A: (e·r, in).
        B: (e·o, r).
        enabled: adapted slice indices.
        n_slices: number of slices in the output.

    Returns:
        (A_full, B_full).
    """
    e = len(enabled)
    r = A.shape[0] // e
    o = B.shape[0] // e
    B_full = B.new_zeros((n_slices * o, e * r))
    for j, slot in enumerate(enabled):
        B_full[slot * o : (slot + 1) * o, j * r : (j + 1) * r] = B[j * o : (j + 1) * o]
    return A.clone(), B_full


def embedding_delta(
    ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, base: torch.nn.Embedding
) -> torch.Tensor:
    """The LoRA branch of an embedding: s·B·A[:, ids], computed as a lookup into Aᵀ.

    Args:
        ids: integer token ids, any shape.
        A: (r, num_embeddings) (PEFT's `lora_embedding_A`).
        B: (embedding_dim, r) (PEFT's `lora_embedding_B`).
        s: scaling.
        base: the wrapped embedding, whose padding/max-norm options the lookup follows.

    Returns:
        (*ids.shape, embedding_dim).
    """
    after_A = F.embedding(
        ids, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
    )
    return (after_A @ B.T) * s


def conv2d_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, base: torch.nn.Conv2d) -> torch.Tensor:
    """The LoRA branch of a 2-D convolution: a (r ← in, k×k) conv, then a 1×1 conv (r → out).

    Args:
        x: (N, in, H, W), dropout already applied.
        A: (r, in, kh, kw).
        B: (out, r, 1, 1).
        s: scaling.
        base: the wrapped convolution (stride, padding and dilation are taken from it).

    Returns:
        (N, out, H', W').
    """
    a = F.conv2d(x, A, None, base.stride, base.padding, base.dilation)
    return F.conv2d(a, B) * s


def conv2d_delta_weight(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """ΔW of a LoRA conv in float32: (out, r)·(r, in·kh·kw) reshaped to (out, in, kh, kw)."""
    out_ch, r = B.shape[:2]
    return delta_weight(A.flatten(1), B.reshape(out_ch, r), s).view(out_ch, *A.shape[1:])
