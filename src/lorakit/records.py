"""What layers and kernels share: one named adapter of one layer (`AdapterRecord`), the per-row
routing of a mixed batch (`RowRouting`) and the name of "no adapter" (`BASE`).

A leaf module: `lorakit.layers` builds and owns records, `lorakit.kernels` computes with their
public fields, `lorakit.variants` add what a variant needs to a record. Nothing here imports those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit import functional as LF

if TYPE_CHECKING:
    from lorakit.variants import Variant

__all__ = ["BASE", "AdapterRecord", "RowRouting"]

BASE = "__base__"
"""The name that stands for "no adapter" in a per-row adapter list."""


class AdapterRecord(nn.Module):
    """One named adapter of one layer: A, B, their scaling, the input dropout and its variant.

    Args:
        lora_A: initial A, (r, in) for linear layers (for fused slices (e·r, in); for
            embeddings (r, num_embeddings); for conv (r, in, kh, kw)).
        lora_B: initial B, (out, r) (fused: (e·o, r); embeddings (dim, r); conv (out, r, 1, 1)).
        r: rank per slice.
        lora_alpha: α.
        use_rslora: scale by α/√r instead of α/r.
        dropout: dropout probability on the branch input.
        share_dropout_mask: use the dropout mask another layer drew for the very same input
            tensor (q/k/v, gate/up); see `lorakit.kernels.dropout.MaskSharing`.
        slices: for a fused layer, the indices of the adapted output slices; else None.
        n_slices: for a fused layer, the number of equal output slices.

    Attributes:
        variant: the `lorakit.variants.Variant` this adapter is (None: plain LoRA); the variant
            registers its own parameters on the record (DoRA: `lora_magnitude_vector`).
        merge_state: while merged, what the variant's `merged` returned for its `unmerged`.
        pissa_initial: PiSSA's initial (A0, B0), to write the adapter relative to the original W0.
    """

    def __init__(
        self,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        *,
        r: int,
        lora_alpha: float,
        use_rslora: bool = False,
        dropout: float = 0.0,
        share_dropout_mask: bool = True,
        slices: Sequence[int] | None = None,
        n_slices: int = 1,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(lora_B)
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = LF.scaling(r, lora_alpha, use_rslora)
        self.dropout_p = float(dropout)
        self.share_dropout_mask = share_dropout_mask
        self.slices = tuple(slices) if slices is not None else None
        self.n_slices = n_slices
        self.pissa_initial: tuple[torch.Tensor, torch.Tensor] | None = None
        self.variant: Variant | None = None
        self.merge_state: Any = None

    @property
    def dropout_in_effect(self) -> bool:
        """Whether the input dropout drops anything now: training mode and p ≥ 1/131072."""
        return self.training and LF.dropout_active(self.dropout_p)

    def extra_repr(self) -> str:
        extra = f", dropout={self.dropout_p}" if self.dropout_p else ""
        extra += f", slices={list(self.slices)}/{self.n_slices}" if self.slices is not None else ""
        extra += f", {self.variant.name}" if self.variant is not None else ""
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}{extra}"


@dataclass
class RowRouting:
    """Which adapter each batch row uses inside one `lorakit.adapter_per_row` block.

    Attributes:
        names: the adapter name of each row (`BASE` for none).
        groups: (adapter name, row indices) for every named adapter of the batch.
        derived: what a speed path computed from this routing, per layer; dropped with the block.
    """

    names: tuple[str, ...]
    groups: list[tuple[str, torch.Tensor]]
    derived: dict[nn.Module, Any] = field(default_factory=dict)
