"""Model-level merge, unmerge, merge-and-unload, and weighted combinations of adapters."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.functional import expand_fused
from lorakit.inject import apply, plan, unload
from lorakit.layers import LoraEmbedding, LoraLayer, SavedModule
from lorakit.quantization import dequantize
from lorakit.state import check_adapter_name, hosts, lora_layers, require_adapter, state_of
from lorakit.targeting import Target

__all__ = ["add_weighted_adapter", "merge", "merge_and_unload", "unmerge"]


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None, *, safe: bool = False) -> None:
    """Add ΔW = s·B·A of each adapter into its base weight (zero added latency afterwards).

    Idempotent per adapter: an adapter already merged is skipped. ΔW is computed in float32 and
    the sum cast once to the weight's dtype.

    Args:
        model: a model with adapters.
        adapter_names: adapters to merge; default: the active ones.
        safe: compute every merged weight first and check it is finite; if any is not, nothing
            is written anywhere.

    Raises:
        LorakitError: unknown adapter, or (with `safe`) a merge that would give NaN/inf weights.
    """
    state = state_of(model)
    names = list(state.active if adapter_names is None else adapter_names)
    for name in names:
        require_adapter(model, name)
    layers = [layer for _, layer in lora_layers(model)]
    if safe:
        for path, layer in lora_layers(model):
            pending = layer.pending_merge(names)
            if pending and not torch.isfinite(layer.merged_weight(pending)).all():
                raise LorakitError(f"merging {pending} into {path!r} gives NaN/inf weights; nothing was merged")
    for layer in layers:
        layer.merge(names)


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter again, restoring W0 (up to float rounding)."""
    state_of(model)
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, *, safe: bool = False) -> nn.Module:
    """Merge the active adapters and replace every wrapper by a plain module.

    LoRA layers become their base layers with ΔW merged in; `modules_to_save` wrappers become the
    active adapter's trained copy. The result has the model's original module types and no
    trace of lorakit: save it with `save_pretrained` like any model. A quantized base
    (`lorakit.quantization`) comes back dequantized: every layer a plain `nn.Linear` holding the weights
    the model computed with (ΔW added where merged); nothing is re-quantized.

    Returns:
        The same model object.
    """
    state = state_of(model)
    active = state.active
    merge(model, active, safe=safe)
    for _, host in list(hosts(model)):
        if isinstance(host, SavedModule):
            chosen = next((n for n in active if n in host.adapters), None)
            if chosen is not None:
                trained = host.adapters[chosen]
                for p in trained.parameters():
                    p.requires_grad_(False)
                host.original_module = trained
    return dequantize(unload(model))


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> None:
    """Create a new adapter from a weighted combination of existing ones (as PEFT's method).

    - `"linear"`: all adapters must have the same rank r on every layer;
      A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ (PEFT's definition: not Σ wᵢΔWᵢ in general).
    - `"cat"`: A = [w₁s₁A₁; …], B = [B₁ … ], rank Σ rᵢ: exactly ΔW = Σ wᵢΔWᵢ.
    - `"svd"`: ΔW = Σ wᵢΔWᵢ truncated to rank `svd_rank` (default: the largest rᵢ) by SVD.

    The new adapter has scaling 1 (lora_alpha = r), is added inactive, and is trainable.

    Raises:
        ConfigError: unknown combination, mismatched lengths, a rank mismatch for "linear",
            or an existing name.
        LorakitError: an unknown adapter name.
    """
    state = state_of(model)
    for name in adapters:
        require_adapter(model, name)
    check_adapter_name(model, adapter_name)
    if combination_type not in ("linear", "cat", "svd"):
        raise ConfigError(f"combination_type must be 'linear', 'cat' or 'svd', got {combination_type!r}")
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError(f"need one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ConfigError(f"svd_rank must be a positive integer, got {svd_rank!r}")

    # Every layer that holds any of the adapters gets the new one.
    layer_specs: list[tuple[str, LoraLayer, torch.Tensor, torch.Tensor]] = []
    for path, layer in lora_layers(model):
        present = [(n, w) for n, w in zip(adapters, weights, strict=True) if n in layer.adapters]
        if not present:
            continue
        A, B = _combine(path, layer, present, combination_type, svd_rank)
        layer_specs.append((path, layer, A, B))

    rank_pattern = {path: A.shape[0] for path, _, A, _ in layer_specs}
    first = state.configs[adapters[0]]
    r = max(rank_pattern.values())
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=first.lora_dropout,
        target_modules=[p for p, *_ in layer_specs],
        rank_pattern={p: k for p, k in rank_pattern.items() if k != r},
        alpha_pattern={p: k for p, k in rank_pattern.items() if k != r},
        base_model_name_or_path=first.base_model_name_or_path,
    )
    targets = [Target(path, layer) for path, layer, *_ in layer_specs]
    steps = plan(model, config, adapter_name, targets)
    for step, (_, _, A, B) in zip(steps, layer_specs, strict=True):
        step.record.lora_A.data = A.to(step.record.lora_A.dtype)
        step.record.lora_B.data = B.to(step.record.lora_B.dtype)
    apply(model, config, adapter_name, steps, [], trainable=True)


def _full_AB(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    # The adapter as it acts in this model, as one plain (A, B) pair (fused slices expanded).
    rec = layer.adapters[name]
    A, B = rec.lora_A.detach(), rec.lora_B.detach()
    if rec.slices is not None:
        A, B = expand_fused(A, B, rec.slices, rec.n_slices)
    return A.float(), B.float(), rec.scaling


def _combine(
    path: str, layer: LoraLayer, present: list[tuple[str, float]], how: str, svd_rank: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [(*_full_AB(layer, n), w) for n, w in present]
    if how == "linear":
        ranks = {A.shape[0] for A, *_ in parts}
        if len(ranks) > 1:
            raise ConfigError(
                f"combination_type='linear' needs equal ranks; {path!r} has ranks {sorted(ranks)} (use 'cat' or 'svd')"
            )
        A = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * A for A, _, s, w in parts)
        B = sum(math.sqrt(abs(w * s)) * B for _, B, s, w in parts)
        return A, B
    if how == "cat":
        A = torch.cat([w * s * A for A, _, s, w in parts])
        B = torch.cat([B for _, B, _, _ in parts], dim=1)
        return A, B
    # svd: the exact weighted sum, then its best rank-k approximation.
    conv = not isinstance(layer, LoraEmbedding) and parts[0][0].dim() == 4
    if conv:
        raise ConfigError(f"combination_type='svd' supports linear and embedding layers; {path!r} is a conv")
    delta = sum(w * s * (B @ A) for A, B, s, w in parts)
    k = svd_rank or max(A.shape[0] for A, *_ in parts)
    k = min(k, *delta.shape)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:k].contiguous(), (U[:, :k] * S[:k]).contiguous()
