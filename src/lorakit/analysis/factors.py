"""An adapter's low-rank factors, read from its PEFT files, and ΔW = s·B·A in factored SVD form.

ΔW is never formed: with B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ, so
the SVD of the r×r core R_B R_Aᵀ = U_c Σ V_cᵀ gives ΔW's singular values s·Σ and its singular
vectors U = Q_B U_c, V = Q_A V_c — O((d + k) r²) work instead of O(d k r).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFormatError
from lorakit.functional import scaling
from lorakit.io import WEIGHTS_NAME, read_lora_tensors
from lorakit.variants import variant_for

__all__ = ["DeltaSVD", "ModuleFactors", "delta_svd", "effective_rank", "read_factors"]


@dataclass
class ModuleFactors:
    """One adapted module of an adapter file.

    Attributes:
        path: the module's path in the base model (`model.layers.0.self_attn.q_proj`).
        A: (r, k) in float64 (an embedding's A is (r, num_embeddings); a conv's is flattened to 2-D).
        B: (d, r) in float64.
        scaling: s, from the config (alpha / r, or alpha / √r with rsLoRA; per-module patterns).
        kind: `linear` or `embedding`.
        variant: the adapter's LoRA variant (`lorakit.variants`), None for plain LoRA; its ΔW here
            is s·B·A alone (for DoRA, the direction part).
    """

    path: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    kind: str = "linear"
    variant: str | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def leaf(self) -> str:
        """The layer type: the last part of the path (`q_proj`)."""
        return self.path.rsplit(".", 1)[-1]


@dataclass
class DeltaSVD:
    """ΔW = U diag(S) Vᵀ, with U (d, r), S (r,) descending, V (k, r); float64."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def frobenius(self) -> float:
        return float(self.S.square().sum().sqrt())


def read_factors(directory: str | os.PathLike[str]) -> tuple[LoraConfig, list[ModuleFactors]]:
    """Every adapted module's A, B and scale from a PEFT adapter directory (safetensors and JSON only).

    Raises:
        AdapterFormatError: a missing or unreadable file, a key that is not PEFT's, or a module with
            A but no B (or the reverse).
    """
    config, found = read_lora_tensors(directory)
    out = []
    for module in sorted(found, key=_natural):
        parts = found[module]
        A = parts["A"].double().reshape(parts["A"].shape[0], -1)
        B = parts["B"].double().reshape(parts["B"].shape[0], -1)
        s = scaling(A.shape[0], config.alpha_for(module), config.use_rslora)
        variant = variant_for(config)
        out.append(ModuleFactors(module, A, B, s, parts["kind"], variant.name if variant is not None else None))
    if not out:
        raise AdapterFormatError(f"{Path(directory) / WEIGHTS_NAME}: no lora_A/lora_B tensors")
    return config, out


def _natural(path: str) -> list:
    """Sort key that puts layer 2 before layer 10."""
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def delta_svd(factors: ModuleFactors) -> DeltaSVD:
    """ΔW = s·B·A as U diag(S) Vᵀ, from the r×r core (never forming ΔW)."""
    qb, rb = torch.linalg.qr(factors.B)
    qa, ra = torch.linalg.qr(factors.A.T)
    uc, sc, vch = torch.linalg.svd(rb @ ra.T)
    return DeltaSVD(qb @ uc, sc * abs(factors.scaling), qa @ vch.T * (1 if factors.scaling >= 0 else -1))


def effective_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares hold `energy` of the total (0 for ΔW = 0)."""
    squares = singular_values.double().square()
    total = float(squares.sum())
    if total == 0.0:
        return 0
    kept = torch.cumsum(squares, 0) / total
    return int((kept < energy - 1e-12).sum()) + 1
