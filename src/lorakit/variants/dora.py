"""DoRA (Liu et al., 2024): weight-decomposed low-rank adaptation, all of it.

Each adapted row of W becomes m·(W0 + s·B·A)/‖W0 + s·B·A‖: the direction is updated by LoRA, the
magnitude m (out,) — PEFT's `lora_magnitude_vector`, initialised to the row norms of W0, so a fresh
adapter is a no-op — is trained. The norm is detached (the paper's §4.3), so its gradient reaches m
only. As a layer's output, with t = W0·x + b + s·B·A·x and scale = m/‖W0 + s·B·A‖:
scale·t + (1 − scale)·b (eq. 5) — a rescaling of the plain LoRA output (`rescales_sum`), which the
fused LoRA node computes before this module rescales it. Linear layers only (`nn.Linear`, `Conv1D`,
quantized bases: QDoRA); merging writes m·(W0 + ΔW)/‖W0 + ΔW‖ and keeps the norms to unmerge exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit import functional as LF
from lorakit.variants.base import Variant
from lorakit.weights import dense_weight, is_conv1d

if TYPE_CHECKING:
    from lorakit.config import LoraConfig
    from lorakit.records import AdapterRecord

__all__ = ["DORA", "Dora", "dora_norm", "dora_output"]

MAGNITUDE = "lora_magnitude_vector"


def dora_norm(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """‖W0 + s·B·A‖ of every output row, outside autograd (DoRA's §4.3: the norm is a constant).

    Args:
        W0: (out, in), dense.
        A: (r, in).
        B: (out, r).
        s: scaling.

    Returns:
        (out,) in float32 (float64 for float64 inputs).
    """
    with torch.no_grad():
        dtype = LF.accumulate_dtype(W0.dtype, A.dtype)
        return torch.linalg.vector_norm(W0.to(dtype) + LF.delta_weight(A, B, s), dim=1)


def dora_output(t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A DoRA layer's output from t = W0·x + b + s·B·A·x and scale = m/‖W0 + s·B·A‖ (per output):
    scale·(W0 + s·B·A)·x + b = scale·t + (1 − scale)·b (eq. 5), computed in the wider of the two
    dtypes and returned in t's."""
    out = t * scale
    if bias is not None:
        out = out + (1 - scale) * bias
    return out.to(t.dtype)


class Dora(Variant):
    """DoRA as a `Variant` (see the module docstring)."""

    name = "dora"
    title = "DoRA"
    param_names = (MAGNITUDE,)
    rescales_sum = True

    def selected(self, config: LoraConfig) -> bool:
        return config.use_dora is True

    def config_problems(self, config: LoraConfig) -> list[str]:
        problems = []
        if config.fused_slices:
            problems.append("use_dora cannot be combined with fused_slices (DoRA rescales whole rows of W)")
        if config.init_lora_weights == "pissa":
            problems.append("use_dora cannot be combined with init_lora_weights='pissa'")
        return problems

    def unsupported(self, layer: nn.Module, path: str) -> str | None:
        base = layer.base_layer
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            return (
                f"use_dora supports linear layers (nn.Linear, Conv1D); {path!r} is a {type(base).__name__}: "
                "adapt it without DoRA, or leave it out of target_modules"
            )
        return None

    def init(self, layer: Any, record: AdapterRecord) -> None:
        # m starts at ‖W0 + s·B·A‖ (= ‖W0‖ for B = 0), so a fresh DoRA adapter is a no-op.
        norm = dora_norm(layer.base_weight(), record.lora_A, record.lora_B, record.scaling)
        record.register_parameter(MAGNITUDE, nn.Parameter(norm.to(record.lora_A.dtype)))

    def param_shape(self, layer: Any, record_r: int) -> dict[str, tuple[int, ...]]:
        return {MAGNITUDE: (layer.out_features,)}

    def rescale(self, base: nn.Module, record: AdapterRecord, t: torch.Tensor) -> torch.Tensor:
        norm = dora_norm(dense_weight(base), record.lora_A, record.lora_B, record.scaling)
        return dora_output(t, getattr(record, MAGNITUDE) / norm, base.bias)

    def merged(self, layer: Any, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m·(W + ΔW)/‖W + ΔW‖ in the base layout, the row norms it divided by)."""
        rec = layer.adapters[name]
        W = (weight.T if layer.is_conv1d else weight) + LF.delta_weight(
            rec.lora_A.detach(), rec.lora_B.detach(), rec.scaling
        )
        norm = torch.linalg.vector_norm(W, dim=1)
        merged = W * (getattr(rec, MAGNITUDE).detach().to(W.dtype) / norm)[:, None]
        return (merged.T if layer.is_conv1d else merged), norm

    def unmerged(self, layer: Any, name: str, weight: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        rec = layer.adapters[name]
        norm = state
        W = weight.T if layer.is_conv1d else weight
        W = W / (getattr(rec, MAGNITUDE).detach().to(W.dtype) / norm)[:, None]
        W = W - LF.delta_weight(rec.lora_A.detach(), rec.lora_B.detach(), rec.scaling)
        return W.T if layer.is_conv1d else W


DORA = Dora()
"""The registered DoRA variant."""
