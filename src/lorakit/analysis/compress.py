"""`compress`: truncate each module's ΔW to a lower rank by SVD and save an ordinary PEFT adapter."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from lorakit import atomic
from lorakit.analysis.factors import delta_svd, effective_rank, read_factors
from lorakit.errors import ConfigError
from lorakit.functional import scaling
from lorakit.io import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from lorakit.models import adapter_directory
from lorakit.variants import variant_for

__all__ = ["Compression", "compress"]


@dataclass
class Compression:
    """What `lorakit compress` does.

    Args:
        adapter: the adapter directory (PEFT format), or a training run's output directory; required.
        out: directory for the compressed adapter (must not exist, or be empty); required.
        energy: keep, per module, the fewest singular directions of ΔW that hold this fraction of its
            energy (Σσ²); give this or `rank`.
        rank: keep this many singular directions in every module (at most its rank).
    """

    adapter: str | None = None
    out: str | None = None
    energy: float | None = None
    rank: int | None = None


def compress(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    energy: float | None = None,
    rank: int | None = None,
) -> dict[str, Any]:
    """Write `adapter` truncated to lower ranks as a PEFT adapter in `out`.

    Each module's ΔW = s·B·A is replaced by its best rank-k approximation U_k Σ_k V_kᵀ (Eckart–
    Young), stored as balanced factors B' = U_k Σ_k^½ / √s', A' = Σ_k^½ V_kᵀ / √s' with the module's
    new scale s' (its alpha over k, or over √k with rsLoRA), so s'·B'·A' is the truncated ΔW. The
    ranks go into `rank_pattern` (keyed by exact path), the alphas stay.

    Returns:
        `{"out", "modules": {path: {"rank", "kept", "energy_kept", "relative_error"}}, "parameters":
        [before, after], "bytes": [before, after]}`; relative_error is ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F.

    Raises:
        ConfigError: neither or both of energy and rank, or out of range; `out` exists and is not
            empty, or cannot be created (`lorakit.atomic.check_target`); an adapter of a LoRA variant
            such as DoRA (its own parameters were learned for the full update). Nothing is written then.
        AdapterFormatError: unreadable adapter files.
        FileWriteError: a file could not be written (a full disk); `out` is left as it was.
    """
    if (energy is None) == (rank is None):
        raise ConfigError("give exactly one of energy (a fraction in (0, 1]) or rank (an integer >= 1)")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy must be in (0, 1], got {energy}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be an integer >= 1, got {rank!r}")
    target = atomic.check_target(out, directory=True, empty=True)
    source = adapter_directory(adapter)
    config, modules = read_factors(source)
    variant = variant_for(config)
    if variant is not None:
        raise ConfigError(
            f"a {variant.title} adapter cannot be truncated this way: its own parameters "
            f"({', '.join(variant.param_names)}) were learned for the full-rank update s·B·A"
        )
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    before = after = 0
    dtype = torch.float32
    for factors in modules:
        svd = delta_svd(factors)
        k = min(factors.rank, rank) if rank is not None else max(1, effective_rank(svd.S, energy))
        alpha = config.alpha_for(factors.path)
        s = scaling(k, alpha, config.use_rslora)
        root = (svd.S[:k] / s).sqrt()
        B = svd.U[:, :k] * root
        A = root[:, None] * svd.V[:, :k].T
        total = float(svd.S.square().sum())
        kept = float(svd.S[:k].square().sum())
        report[factors.path] = {
            "rank": factors.rank,
            "kept": k,
            "energy_kept": kept / total if total else 1.0,
            "relative_error": ((total - kept) / total) ** 0.5 if total else 0.0,
        }
        names = ("lora_embedding_A", "lora_embedding_B") if factors.kind == "embedding" else (
            "lora_A.weight", "lora_B.weight"
        )  # fmt: skip
        tensors[f"{PREFIX}{factors.path}.{names[0]}"] = A.to(dtype).contiguous()
        tensors[f"{PREFIX}{factors.path}.{names[1]}"] = B.to(dtype).contiguous()
        ranks[factors.path] = k
        before += factors.A.numel() + factors.B.numel()
        after += A.numel() + B.numel()
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    new_config = dataclasses.replace(
        config, r=common, rank_pattern={re.escape(p): k for p, k in ranks.items() if k != common}
    )
    peft = new_config.to_peft_dict()
    payload = safetensors_save(tensors, {"format": "pt"})

    def build(tmp: Path) -> None:
        atomic.write_bytes(tmp / WEIGHTS_NAME, payload)
        atomic.write_json(tmp / CONFIG_NAME, peft, sort_keys=True)

    atomic.build_directory(target, build)  # renamed onto an empty `out`, which a failure leaves as it was
    old_bytes = (source / WEIGHTS_NAME).stat().st_size
    return {
        "out": str(target),
        "source": str(source),
        "modules": report,
        "parameters": [before, after],
        "bytes": [old_bytes, (target / WEIGHTS_NAME).stat().st_size],
    }
