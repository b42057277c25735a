"""Initial values of a new adapter's A and B, for every layer type, written once.

| `init_lora_weights` | A | B | a fresh adapter is |
|---|---|---|---|
| `True` (default) | Kaiming-uniform (a = √5, as `nn.Linear` and PEFT) | 0 | a no-op |
| `"gaussian"` | N(0, 1/r²) | 0 | a no-op |
| `"pissa"` | √(S_r/s)·V_rᵀ | U_r·√(S_r/s) | a no-op: W0 becomes W0 − s·B·A |
| `False` | Kaiming-uniform | Kaiming-uniform | not a no-op (for tests) |

Embeddings follow PEFT: A = 0 and B ~ N(0, 1) (`False`: A ~ N(0, 1) too), so the branch is zero
at the start with the roles of A and B swapped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.functional import accumulate_dtype

__all__ = ["embedding_pair", "lora_pair", "pissa"]

InitMode = bool | str


def lora_pair(
    A_shape: Sequence[int], B_shape: Sequence[int], r: int, init: InitMode, **factory
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a linear or convolutional adapter.

    Args:
        A_shape: (r, in) for linear layers, (e·r, in) for e fused slices, (r, in, kh, kw) for conv.
        B_shape: (out, r), (e·o, r) or (out, r, 1, 1).
        r: the rank (the Gaussian's standard deviation is 1/r).
        init: `True`, `"gaussian"` or `False` (see the module docstring).
        **factory: `device` and `dtype` of the new tensors.

    Returns:
        (A, B).
    """
    A = torch.empty(tuple(A_shape), **factory)
    B = torch.zeros(tuple(B_shape), **factory)
    if init == "gaussian":
        nn.init.normal_(A, std=1 / r)
    else:  # PEFT layer.py reset_lora_parameters; fan-in is in (·kh·kw for conv)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    return A, B


def embedding_pair(
    num_embeddings: int, dim: int, r: int, init: InitMode, **factory
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of an embedding adapter: A (r, num_embeddings) = 0, B (dim, r) ~ N(0, 1).

    Args:
        num_embeddings: the vocabulary size.
        dim: the embedding width.
        r: the rank.
        init: `False` also draws A from N(0, 1) (not a no-op); anything else keeps A = 0.
        **factory: `device` and `dtype`.
    """
    A = torch.zeros(r, num_embeddings, **factory)
    B = torch.randn(dim, r, **factory)
    if init is False:
        A.normal_()
    return A, B


def pissa(W: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA (Meng et al., 2024): A and B from the top-r singular vectors of W, and the residual.

    W = U·S·Vᵀ; A = √(S_r/s)·V_rᵀ, B = U_r·√(S_r/s), so s·B·A is W's best rank-r part and the
    residual W − s·B·A takes W's place: the layer's output is unchanged at the start.

    Args:
        W: the base weight, (out, in), any float dtype.
        r: the rank.
        s: the adapter's scaling.

    Returns:
        (A (r, in), B (out, r), residual (out, in)) in float32 (float64 for a float64 W); the caller
        casts the residual to the weight's dtype.
    """
    W = W.detach().to(accumulate_dtype(W.dtype))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = torch.sqrt(S[:r] / s)
    A = root[:, None] * Vh[:r]  # (r, in)
    B = U[:, :r] * root[None, :]  # (out, r)
    return A.contiguous(), B.contiguous(), W - s * (B @ A)
