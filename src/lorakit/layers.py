"""LoRA wrappers around one base layer each, holding any number of named adapters: the reference path.

A wrapper keeps the original module as `base_layer` (as PEFT does), so the base weights keep
their names and any `nn.Module` can be adapted. Each adapter is one `AdapterRecord` (A, B,
scaling, dropout) in the `adapters` ModuleDict, keyed by adapter name. A layer's forward here is
the formula in plain tensor operations (`lorakit.functional`); `lorakit.kernels` may compute the
same with less memory or time, and `lorakit.kernels.disabled()` makes every layer run this code.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lorakit import functional as LF
from lorakit import init
from lorakit.errors import LorakitError, UnsupportedLayerError
from lorakit.kernels import linear as linear_kernels
from lorakit.kernels.dropout import Draw, MaskSharing, draw_for, masked_applies, masked_branches
from lorakit.quantized import dequantized_weight, is_quantized
from lorakit.records import BASE, AdapterRecord, RowRouting
from lorakit.weights import conv1d_type, dense_weight, is_conv1d

__all__ = [
    "BASE",
    "AdapterHost",
    "AdapterRecord",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "RowRouting",
    "SavedModule",
    "is_conv1d",
    "supported_types",
    "wrapper_for",
]


class AdapterHost(nn.Module):
    """What every wrapper shares: named adapters, which are active, disabled, per-row routing."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.trainable_adapters: set[str] = set()
        self.disabled = False
        self.rows: RowRouting | None = None  # set by `adapters.adapter_per_row`

    def set_active(self, names: Iterable[str]) -> None:
        """Make `names` (those this layer has) the active adapters; only they train."""
        self.active = tuple(n for n in names if n in self.adapters)
        for name, module in self.adapters.items():
            grad = name in self.active and name in self.trainable_adapters
            for p in module.parameters():
                p.requires_grad_(grad)

    def remove(self, name: str) -> None:
        """Delete one adapter from this layer."""
        del self.adapters[name]
        self.trainable_adapters.discard(name)
        self.active = tuple(n for n in self.active if n != name)


class LoraLayer(AdapterHost):
    """Base of the LoRA wrappers: forward = base_layer(x) + Σ over active adapters of s·B·A·dropout(x).

    Subclasses say how one adapter's branch is computed (`branch`), how ΔW looks in the base
    weight's layout (`delta_weight`), how a new adapter starts (`new_pair`) and how it is laid out
    in PEFT's file (`peft_tensors`).
    """

    in_features: int
    out_features: int
    _peft_a_key = "lora_A.weight"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged: tuple[str, ...] = ()
        # A quantized base (`lorakit.quantization`) holds a dense merged weight while adapters are
        # merged; its compressed weight waits here, to come back exactly on unmerge.
        self.stored_weight: nn.Parameter | None = None
        # Dropout masks shared by layers reading the same tensor: `inject` gives every layer of a
        # model the model's one `MaskSharing`.
        self.masks = MaskSharing()
        # What `lorakit.kernels` derived from this layer's adapters (each entry keyed by the
        # adapters' identities and versions, so a stale one is never used); cleared on `remove`.
        self.kernel_cache: dict[str, Any] = {}

    # -- forward: the reference
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """h = base_layer(x) + Σ s·B·A·dropout(x) over the active, unmerged adapters (Hu et al., eq. 3).

        Inside `adapter_per_row` each adapter's branch is added to its own rows only. Plain tensor
        operations (`branch`, `lorakit.functional`): this is what `lorakit.kernels.disabled()` runs.
        """
        result = self.base_layer(x, *args, **kwargs)
        if self.rows is not None and not self.disabled:
            return self.forward_rows(x, result)
        for record in self.pending():
            result = self.output(record, x, result)
        return result

    def forward_rows(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result with, on the rows of each adapter of the routing, that adapter's output (gather,
        compute, scatter back)."""
        for name, rows in self.rows.groups:
            if name not in self.adapters:
                continue
            rows = rows.to(result.device)
            own = self.output(self.adapters[name], x.index_select(0, rows), result.index_select(0, rows))
            result = result.index_copy(0, rows, own)
        return result

    def output(self, record: AdapterRecord, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result (the output so far) with one adapter applied: + s·B·A·dropout(x), or what the
        adapter's variant makes of it (`lorakit.variants`)."""
        if record.variant is not None:
            return record.variant.output(self, record, x, result)
        return result + self.branch(record, x).to(result.dtype)

    def branch(self, record: AdapterRecord, x: torch.Tensor) -> torch.Tensor:
        """s·B·A·dropout(x) for one adapter, in x's batch layout and A's dtype."""
        raise NotImplementedError  # pragma: no cover - abstract

    def pending(self) -> list[AdapterRecord]:
        """The adapters whose branch the forward adds: active and not merged (none while disabled)."""
        if self.disabled:
            return []
        return [self.adapters[n] for n in self.active if n not in self.merged]

    # -- dropout
    def dropout_in_effect(self, record: AdapterRecord) -> bool:
        """Whether the adapter's dropout drops anything now (training, p > 0)."""
        return record.dropout_in_effect

    def draw_dropout(self, record: AdapterRecord, x: torch.Tensor) -> Draw | None:
        """The dropout mask of `record` over input `x` (shared with layers reading the same x), or None."""
        return draw_for(self.masks, record, x)

    def dropout(self, record: AdapterRecord, x: torch.Tensor) -> torch.Tensor:
        """x·keep/(1 − p) with the adapter's mask (`functional.dropout`); x itself when no dropout
        is in effect. The mask is drawn where the speed paths draw theirs, so both drop the same elements."""
        draw = self.draw_dropout(record, x)
        return x if draw is None else LF.dropout(x, draw.mask.to_bool(), draw.mask.p)

    # -- new adapters and files
    def new_pair(
        self, r: int, init_mode: bool | str, *, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (A, B) for a new adapter of rank r (see `lorakit.init`), in `dtype` (default: see
        `LoraConfig.adapter_dtype`). `LoraLinear`'s also takes fused slices."""
        raise NotImplementedError  # pragma: no cover - abstract

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter `name` in float32, laid out as `base_layer.weight`."""
        raise NotImplementedError  # pragma: no cover - abstract

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter as PEFT stores it: `{"lora_A.weight": ..., "lora_B.weight": ...}`."""
        rec = self.adapters[name]
        A, B = rec.lora_A.detach(), rec.lora_B.detach()
        if rec.slices is not None:
            A, B = LF.expand_fused(A, B, rec.slices, rec.n_slices)
        if rec.pissa_initial is not None:
            # Relative to the original W0 = W_res + s·B0·A0: ΔW = s·(B·A − B0·A0) = s·[B, −B0]·[A; A0].
            A0, B0 = rec.pissa_initial
            A, B = torch.cat([A, A0.to(A)]), torch.cat([B, -B0.to(B)], dim=1)
        tensors = {"lora_A.weight": A.contiguous(), "lora_B.weight": B.contiguous()}
        if rec.variant is not None:  # its own parameters, under their PEFT names
            tensors.update({k: getattr(rec, k).detach().contiguous() for k in rec.variant.param_names})
        return tensors

    def peft_rank_alpha(self, name: str) -> tuple[int, float]:
        """(r, lora_alpha) under which PEFT reproduces this adapter's scaling from `peft_tensors`."""
        rec = self.adapters[name]
        rank = self.peft_tensors(name)[self._peft_a_key].shape[0]
        if rank == rec.r:
            return rec.r, rec.lora_alpha
        # A fused or PiSSA-converted adapter has a larger stored rank; keep s = α/r (or α/√r).
        alpha = rec.scaling * (math.sqrt(rank) if rec.use_rslora else rank)
        return rank, alpha

    # -- merge
    def merged_weight(self, names: Iterable[str]) -> torch.Tensor:
        """The base weight with adapters `names` merged in turn, in float32, cast once (a quantized
        base weight is dequantized first): W + ΔW for LoRA, what its variant makes of W otherwise."""
        return self._merge_result(names)[0]

    def _merge_result(self, names: Iterable[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        """(merged weight, {adapter with a variant: what its `merged` returned for `unmerged`})."""
        weight = self.base_layer.weight
        total = dequantized_weight(weight.detach(), LF.accumulate_dtype(weight.dtype))
        states: dict[str, Any] = {}
        for name in names:
            variant = self.adapters[name].variant
            if variant is not None:
                total, states[name] = variant.merged(self, name, total)
            else:
                total = total + self.delta_weight(name)
        return total.to(weight.dtype), states

    def pending_merge(self, names: Iterable[str]) -> list[str]:
        """Of `names`, those this layer holds and has not merged yet."""
        return [n for n in names if n in self.adapters and n not in self.merged]

    def merge(self, names: Iterable[str], safe: bool = False) -> None:
        """Add ΔW of each named adapter into the base weight; merging an adapter twice is a no-op.

        Raises:
            LorakitError: with `safe`, if the merged weight has NaN/inf (nothing is written).
        """
        pending = self.pending_merge(names)
        if not pending:
            return
        weight = self.base_layer.weight
        variants = any(self.adapters[n].variant is not None for n in pending)
        if (
            not safe
            and not variants
            and not is_quantized(self.base_layer)
            and weight.dtype == LF.accumulate_dtype(weight.dtype)
        ):
            # fp32/fp64 weights: add each ΔW in place, no copy of W.
            with torch.no_grad():
                for name in pending:
                    self.add_delta_(weight, name, 1.0)
            self.merged = (*self.merged, *pending)
            return
        new, states = self._merge_result(pending)
        if safe and not torch.isfinite(new).all():
            raise LorakitError(
                f"merging adapter(s) {pending} into {type(self.base_layer).__name__} gives NaN/inf weights; "
                "nothing was merged"
            )
        if is_quantized(self.base_layer) and self.stored_weight is None:
            # W0 is stored compressed: the merged weight is dense (dequantized W0 with the updates),
            # and the compressed W0 waits aside for unmerge. Nothing is re-quantized.
            self.stored_weight = weight
            self.base_layer.weight = nn.Parameter(new, requires_grad=False)
        else:
            with torch.no_grad():
                weight.copy_(new)
        for name, state in states.items():
            self.adapters[name].merge_state = state
        self.merged = (*self.merged, *pending)

    def add_delta_(self, weight: torch.Tensor, name: str, sign: float) -> None:
        """weight += sign·ΔW of adapter `name`, in place (weight in float32/64)."""
        weight.add_(self.delta_weight(name).to(weight.dtype), alpha=sign)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW again (W0 is restored up to float rounding; a quantized
        W0 exactly)."""
        if not self.merged:
            return
        if self.stored_weight is not None:
            self.base_layer.weight, self.stored_weight = self.stored_weight, None
        else:
            weight = self.base_layer.weight
            variants = any(self.adapters[n].variant is not None for n in self.merged)
            with torch.no_grad():
                if not variants and weight.dtype == LF.accumulate_dtype(weight.dtype):
                    for name in reversed(self.merged):
                        self.add_delta_(weight, name, -1.0)
                else:
                    total = weight.detach().to(LF.accumulate_dtype(weight.dtype))
                    for name in reversed(self.merged):
                        rec = self.adapters[name]
                        if rec.variant is not None:
                            total = rec.variant.unmerged(self, name, total, rec.merge_state)
                        else:
                            total = total - self.delta_weight(name)
                    weight.copy_(total.to(weight.dtype))
        for name in self.merged:
            self.adapters[name].merge_state = None
        self.merged = ()

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise LorakitError(f"adapter {name!r} is merged into the weights; unmerge before deleting it")
        self.kernel_cache.clear()
        super().remove(name)

    def _factory(self, dtype: torch.dtype | None = None) -> dict:
        # Adapters live in the base weight's dtype when that is fp32/fp64, and in fp32 over half
        # precision or quantized bases (as PEFT's autocast_adapter_dtype), unless `dtype` is given.
        weight = self.base_layer.weight
        return {"device": weight.device, "dtype": dtype or LF.accumulate_dtype(weight.dtype)}


class LoraLinear(LoraLayer):
    """LoRA on `nn.Linear` (weight (out, in)) or transformers' `Conv1D` (weight (in, out)).

    h = W0·x + b + Σ s·B·A·dropout(x), A: (r, in), B: (out, r), s = α/r, summed over the active,
    unmerged adapters. With fused slices the output is cut into `n_slices` equal parts and only
    the enabled ones get an update (loralib's MergedLinear). `lorakit.kernels.linear.forward`
    computes the same faster where it applies; `LoraLayer.forward` is the reference.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.is_conv1d = is_conv1d(base_layer)
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.is_conv1d else (w.shape[1], w.shape[0])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.rows is not None and not self.disabled:
            # `_modules`: the adapters as a plain dict (this runs per layer per decoding step).
            adapters = self.adapters._modules
            fast = linear_kernels.forward_rows(
                self.base_layer, x, adapters, self.rows, cache=self.kernel_cache, args=args, kwargs=kwargs
            )
        else:
            fast = linear_kernels.forward(
                self.base_layer, x, self.pending(), masks=self.masks, args=args, kwargs=kwargs
            )
        return fast if fast is not None else super().forward(x, *args, **kwargs)

    def base_weight(self) -> torch.Tensor:
        """W0 as a dense (out, in) tensor outside autograd (a quantized weight dequantized)."""
        return dense_weight(self.base_layer)

    def branch(self, record: AdapterRecord, x: torch.Tensor) -> torch.Tensor:
        A, B = record.lora_A, record.lora_B
        x = self.dropout(record, x).to(A.dtype)
        if record.slices is not None:
            return LF.fused_linear_delta(x, A, B, record.scaling, record.slices, record.n_slices)
        return LF.linear_delta(x, A, B, record.scaling)

    def new_pair(
        self,
        r: int,
        init_mode: bool | str,
        *,
        dtype: torch.dtype | None = None,
        slices: Sequence[int] | None = None,
        n_slices: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (A, B); with fused `slices` (indices of the adapted ones among `n_slices` equal
        output slices) A is (e·r, in) and B (e·out/n_slices, r)."""
        e = len(slices) if slices is not None else 1
        out = self.out_features // n_slices
        return init.lora_pair((e * r, self.in_features), (e * out, r), r, init_mode, **self._factory(dtype))

    def add_delta_(self, weight: torch.Tensor, name: str, sign: float) -> None:
        rec = self.adapters[name]
        if rec.slices is not None or rec.lora_A.dtype != weight.dtype:
            return super().add_delta_(weight, name, sign)
        A, B = rec.lora_A.detach(), rec.lora_B.detach()
        LF.add_delta_(weight, A, B, sign * rec.scaling, transposed=self.is_conv1d)

    def delta_weight(self, name: str) -> torch.Tensor:
        rec = self.adapters[name]
        A, B = rec.lora_A, rec.lora_B
        if rec.slices is not None:
            A, B = LF.expand_fused(A, B, rec.slices, rec.n_slices)
        delta = LF.delta_weight(A.detach(), B.detach(), rec.scaling)
        return delta.T if self.is_conv1d else delta

    def pissa_tensors(self, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PiSSA initialisation (`lorakit.init.pissa`): (A, B, residual weight in the base layout and dtype)."""
        weight = self.base_layer.weight
        A, B, residual = init.pissa(weight.T if self.is_conv1d else weight, r, s)
        residual = residual.T if self.is_conv1d else residual
        return A, B, residual.to(weight.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA on `nn.Embedding`: h = E0[ids] + s·(Aᵀ[ids])·Bᵀ, A: (r, num_embeddings), B: (dim, r).

    Initialised as PEFT does for embeddings: A = 0 and B ~ N(0, 1), so a fresh adapter is a no-op;
    no dropout (ids are not dropped). Stored in PEFT files as `lora_embedding_A` / `lora_embedding_B`.
    """

    _peft_a_key = "lora_embedding_A"

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def branch(self, record: AdapterRecord, x: torch.Tensor) -> torch.Tensor:
        return LF.embedding_delta(x, record.lora_A, record.lora_B, record.scaling, self.base_layer)

    def new_pair(
        self, r: int, init_mode: bool | str, *, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return init.embedding_pair(self.in_features, self.out_features, r, init_mode, **self._factory(dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        rec = self.adapters[name]
        return LF.delta_weight(rec.lora_A.detach(), rec.lora_B.detach(), rec.scaling).T

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        rec = self.adapters[name]
        return {
            "lora_embedding_A": rec.lora_A.detach().contiguous(),
            "lora_embedding_B": rec.lora_B.detach().contiguous(),
        }


class LoraConv2d(LoraLayer):
    """LoRA on `nn.Conv2d` (groups=1): a k×k conv in → r (A), then a 1×1 conv r → out (B), as PEFT."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise UnsupportedLayerError(
                f"LoRA on a grouped Conv2d (groups={base_layer.groups}) is not supported; only groups=1"
            )
        if base_layer.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"LoRA on a Conv2d with padding_mode={base_layer.padding_mode!r} is not supported; only 'zeros'"
            )
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        records = self.pending()
        if self.rows is None and records and masked_applies(records):  # training with dropout: masks kept as bits
            return masked_branches(self.base_layer(x, *args, **kwargs), x, records, self.masks, self._delta)
        return super().forward(x, *args, **kwargs)

    def branch(self, record: AdapterRecord, x: torch.Tensor) -> torch.Tensor:
        return self._delta(record, self.dropout(record, x))

    def _delta(self, record: AdapterRecord, x: torch.Tensor) -> torch.Tensor:
        A = record.lora_A
        return LF.conv2d_delta(x.to(A.dtype), A, record.lora_B, record.scaling, self.base_layer)

    def new_pair(
        self, r: int, init_mode: bool | str, *, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        A_shape = (r, self.in_features, *self.base_layer.kernel_size)
        return init.lora_pair(A_shape, (self.out_features, r, 1, 1), r, init_mode, **self._factory(dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        rec = self.adapters[name]
        return LF.conv2d_delta_weight(rec.lora_A.detach(), rec.lora_B.detach(), rec.scaling)


class SavedModule(AdapterHost):
    """A module trained in full per adapter (`modules_to_save`), e.g. a classification head.

    Keeps the original frozen as `original_module` and one trainable copy per adapter in
    `adapters`; the forward runs the first active adapter's copy (the original when disabled or
    when no active adapter has a copy), per row inside `adapter_per_row`.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module

    def add_copy(self, name: str) -> nn.Module:
        """Add a trainable copy of the original module under adapter `name`."""
        module = copy.deepcopy(self.original_module)
        self.adapters[name] = module
        return module

    def current(self) -> nn.Module:
        """The module the forward runs (without per-row routing): the first active adapter's copy, or
        the original when disabled or when no active adapter has a copy."""
        if not self.disabled:
            for name in self.active:
                if name in self.adapters:
                    return self.adapters[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.rows is None or self.disabled:
            return self.current()(x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs)
        for name, rows in self.rows.groups:
            if name not in self.adapters:
                continue
            rows = rows.to(out.device)
            out = out.index_copy(0, rows, self.adapters[name](x.index_select(0, rows), *args, **kwargs))
        return out


def supported_types() -> tuple[type[nn.Module], ...]:
    """The base layer types lorakit can wrap (transformers' `Conv1D` once transformers is loaded)."""
    types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.Conv2d)
    conv1d = conv1d_type()
    return (*types, conv1d) if conv1d is not None else types


def wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA wrapper class for a base module, or None when its type cannot be adapted."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, nn.Conv2d):
        return LoraConv2d
    return None
