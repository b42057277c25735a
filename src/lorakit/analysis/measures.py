"""The LoRA paper's measures of a learned update (Hu et al., 2022, Section 7).

- `subspace_similarity`: φ(A₁, A₂, i, j) = ‖U_iᵀ U_j‖²_F / min(i, j) ∈ [0, 1], U_i the top-i
  right-singular vectors of A₁ and U_j the top-j of A₂ (Figure 3, Figure 4).
- `amplification`: how much ΔW amplifies directions W already has, ‖ΔW‖_F / ‖Uᵀ W V‖_F with U, V
  ΔW's singular vectors, beside ‖Uᵀ W V‖_F for W's own top-r directions and for random ones
  (Table 7).
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.analysis.factors import DeltaSVD

__all__ = ["amplification", "right_singular_vectors", "subspace_similarity"]


def right_singular_vectors(matrix: torch.Tensor) -> torch.Tensor:
    """The right-singular vectors of an (r, k) matrix as the columns of a (k, r) matrix, by σ descending."""
    _, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return vh.T


def subspace_similarity(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for every i ≤ r₁, j ≤ r₂, from two sets of orthonormal columns (k, r₁) and (k, r₂).

    Returns:
        An (r₁, r₂) float64 matrix; entry [i-1, j-1] is ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j).
    """
    if first.shape[0] != second.shape[0]:
        raise ValueError(f"the subspaces live in spaces of {first.shape[0]} and {second.shape[0]} dimensions")
    overlap = (first.double().T @ second.double()).square()
    cumulative = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, first.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, second.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator))
    return q


def amplification(weight: torch.Tensor, delta: DeltaSVD, *, seed: int = 0) -> dict[str, Any]:
    """Table 7's numbers for one module.

    Args:
        weight: W, (d, k) in ΔW's orientation.
        delta: ΔW's SVD (its r columns are the directions).
        seed: for the random directions.

    Returns:
        `{"rank": r, "delta_frobenius": ‖ΔW‖_F, "w_on_delta": ‖Uᵀ W V‖_F, "w_on_w": ‖U_Wᵀ W V_W‖_F,
        "w_on_random": ‖Uᵀ W V‖_F for random orthonormal U, V, "w_frobenius": ‖W‖_F,
        "factor": ‖ΔW‖_F / ‖Uᵀ W V‖_F}` (factor None when W has nothing along ΔW's directions).
    """
    W = weight.double()
    r = delta.S.numel()
    on_delta = float(torch.linalg.matrix_norm(delta.U.T @ W @ delta.V))
    w_singular = torch.linalg.svdvals(W)
    on_w = float(w_singular[:r].square().sum().sqrt())
    generator = torch.Generator().manual_seed(seed)
    u, v = _orthonormal(W.shape[0], r, generator), _orthonormal(W.shape[1], r, generator)
    on_random = float(torch.linalg.matrix_norm(u.T @ W @ v))
    return {
        "rank": r,
        "delta_frobenius": delta.frobenius,
        "w_on_delta": on_delta,
        "w_on_w": on_w,
        "w_on_random": on_random,
        "w_frobenius": float(torch.linalg.matrix_norm(W)),
        "factor": delta.frobenius / on_delta if on_delta > 0 else None,
    }
