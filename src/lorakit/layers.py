"""LoRA wrappers around one base layer each, holding any number of named adapters.

A wrapper keeps the original module as `base_layer` (as PEFT does), so the base weights keep
their names and any `nn.Module` can be adapted. Each adapter is one `AdapterRecord` (A, B,
scaling, dropout) in the `adapters` ModuleDict, keyed by adapter name.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import functional as LF
from lorakit.errors import LorakitError, UnsupportedLayerError

try:  # GPT-2 style layers store their weight as (in, out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the core importable
    Conv1D = None  # type: ignore[assignment,misc]

__all__ = [
    "BASE",
    "AdapterHost",
    "AdapterRecord",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "SavedModule",
    "supported_types",
    "wrapper_for",
]

BASE = "__base__"
"""The name that stands for "no adapter" in a per-row adapter list."""


class AdapterRecord(nn.Module):
    """One named adapter of one layer: A, B, their scaling and the input dropout.

    Args:
        lora_A: initial A, (r, in) for linear layers (for fused slices (e·r, in); for
            embeddings (r, num_embeddings); for conv (r, in, kh, kw)).
        lora_B: initial B, (out, r) (fused: (e·o, r); embeddings (dim, r); conv (out, r, 1, 1)).
        r: rank per slice.
        lora_alpha: α.
        use_rslora: scale by α/√r instead of α/r.
        dropout: dropout probability on the branch input.
        share_dropout_mask: reuse the dropout mask another layer drew for the very same input
            tensor (q/k/v, gate/up); see `lorakit.functional.dropout_input`.
        slices: for a fused layer, the indices of the adapted output slices; else None.
        n_slices: for a fused layer, the number of equal output slices.
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
        # PiSSA: the initial (A0, B0), kept to write the adapter relative to the original W0.
        self.pissa_initial: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        extra = f", dropout={self.dropout_p}" if self.dropout_p else ""
        extra += f", slices={list(self.slices)}/{self.n_slices}" if self.slices is not None else ""
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}{extra}"

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        """The branch input after this adapter's dropout (identity in eval mode or with p = 0)."""
        return LF.dropout_input(x, self.dropout_p, self.training, self.share_dropout_mask)


class AdapterHost(nn.Module):
    """What every wrapper shares: named adapters, which are active, disabled, per-row routing."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.trainable_adapters: set[str] = set()
        self.disabled = False
        # Set by `adapters.adapter_per_row`: [(adapter name, row indices)] and the name of each
        # row, or None; `row_cache` holds what a layer derived from them (cleared on exit).
        self.row_groups: list[tuple[str, torch.Tensor]] | None = None
        self.row_names: tuple[str, ...] | None = None
        self.row_cache: tuple | None = None

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
    """Base of the LoRA wrappers: forward = base_layer(x) + Σ over active adapters of s·B·A·x.

    Subclasses say how the branch is computed (`lora_output`), how ΔW looks in the base weight's
    layout (`delta_weight`) and how an adapter is laid out in PEFT's file (`peft_tensors`).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged: tuple[str, ...] = ()

    # -- to be provided by each layer type
    in_features: int
    out_features: int

    def lora_output(self, record: AdapterRecord, x: torch.Tensor) -> torch.Tensor:
        """The branch s·B·A·dropout(x) for one adapter, in x's batch layout."""
        raise NotImplementedError  # pragma: no cover - abstract

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter `name` in float32, laid out as `base_layer.weight`."""
        raise NotImplementedError  # pragma: no cover - abstract

    def init_tensors(
        self, r: int, init: bool | str, slices: Sequence[int] | None = None, n_slices: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (A, B) for a new adapter of rank r, on the base weight's device, float32."""
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
        return {"lora_A.weight": A.contiguous(), "lora_B.weight": B.contiguous()}

    def peft_rank_alpha(self, name: str) -> tuple[int, float]:
        """(r, lora_alpha) under which PEFT reproduces this adapter's scaling from `peft_tensors`."""
        rec = self.adapters[name]
        rank = self.peft_tensors(name)[self._peft_a_key].shape[0]
        if rank == rec.r:
            return rec.r, rec.lora_alpha
        # A fused or PiSSA-converted adapter has a larger stored rank; keep s = α/r (or α/√r).
        alpha = rec.scaling * (math.sqrt(rank) if rec.use_rslora else rank)
        return rank, alpha

    _peft_a_key = "lora_A.weight"

    # -- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.row_groups is not None:
            return self._forward_rows(x, result)
        for name in self.unmerged_active():
            result = self.add_branch(self.adapters[name], x, result)
        return result

    def unmerged_active(self) -> list[str]:
        """The active adapters whose branch the forward adds (none while disabled)."""
        return [] if self.disabled else [n for n in self.active if n not in self.merged]

    def add_branch(self, record: AdapterRecord, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + the branch of one adapter (layers with a fused kernel override this)."""
        return result + self.lora_output(record, x).to(result.dtype)

    def _forward_rows(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        for name, rows in self.row_groups or ():
            if name not in self.adapters:
                continue
            rows = rows.to(result.device)
            delta = self.lora_output(self.adapters[name], x.index_select(0, rows))
            result = result.index_add(0, rows, delta.to(result.dtype))
        return result

    # -- merge
    def merged_weight(self, names: Iterable[str]) -> torch.Tensor:
        """The base weight with adapters `names` added: W0 + Σ ΔW in float32, cast once."""
        weight = self.base_layer.weight
        total = weight.detach().to(LF.accumulate_dtype(weight.dtype))
        for name in names:
            total = total + self.delta_weight(name)
        return total.to(weight.dtype)

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
        if not safe and weight.dtype == LF.accumulate_dtype(weight.dtype):
            # fp32/fp64 weights: add each ΔW in place, no copy of W.
            with torch.no_grad():
                for name in pending:
                    self.add_delta_(weight, name, 1.0)
            self.merged = (*self.merged, *pending)
            return
        new = self.merged_weight(pending)
        if safe and not torch.isfinite(new).all():
            raise LorakitError(
                f"merging adapter(s) {pending} into {type(self.base_layer).__name__} gives NaN/inf weights; "
                "nothing was merged"
            )
        with torch.no_grad():
            weight.copy_(new)
        self.merged = (*self.merged, *pending)

    def add_delta_(self, weight: torch.Tensor, name: str, sign: float) -> None:
        """weight += sign·ΔW of adapter `name`, in place (weight in float32/64)."""
        weight.add_(self.delta_weight(name).to(weight.dtype), alpha=sign)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW again (W0 is restored up to float rounding)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            if weight.dtype == LF.accumulate_dtype(weight.dtype):
                for name in reversed(self.merged):
                    self.add_delta_(weight, name, -1.0)
            else:
                total = weight.detach().to(LF.accumulate_dtype(weight.dtype))
                for name in reversed(self.merged):
                    total = total - self.delta_weight(name)
                weight.copy_(total.to(weight.dtype))
        self.merged = ()

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise LorakitError(f"adapter {name!r} is merged into the weights; unmerge before deleting it")
        self.__dict__.pop("_stacked_adapters", None)
        super().remove(name)

    def _factory(self) -> dict:
        # Adapters live in the base weight's dtype when that is fp32/fp64, and in fp32 over half
        # precision or quantized bases (as PEFT's autocast_adapter_dtype).
        weight = self.base_layer.weight
        return {"device": weight.device, "dtype": LF.accumulate_dtype(weight.dtype)}


class LoraLinear(LoraLayer):
    """LoRA on `nn.Linear` (weight (out, in)) or transformers' `Conv1D` (weight (in, out)).

    h = W0·x + b + s·B·A·dropout(x), A: (r, in), B: (out, r). With fused slices the output is cut
    into `n_slices` equal parts and only the enabled ones get an update (loralib's MergedLinear).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.is_conv1d = Conv1D is not None and isinstance(base_layer, Conv1D)
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.is_conv1d else (w.shape[1], w.shape[0])

    def init_tensors(
        self, r: int, init: bool | str, slices: Sequence[int] | None = None, n_slices: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        e = len(slices) if slices is not None else 1
        out = self.out_features // n_slices
        kw = self._factory()
        A = torch.empty(e * r, self.in_features, **kw)
        B = torch.zeros(e * out, r, **kw)
        if init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:  # True, False: Kaiming-uniform as PEFT (layer.py reset_lora_parameters) and nn.Linear
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        return A, B

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs:
            weight = self._weight_on_the_fly(x)
            if weight is not None:
                return F.linear(x, weight, self.base_layer.bias)
        return super().forward(x, *args, **kwargs)

    def _weight_on_the_fly(self, x: torch.Tensor) -> torch.Tensor | None:
        """W0 + Σ s·B·A for this forward alone, when that is cheaper than the branches (else None).

        Without gradients, a branch reads x and reads and writes the (N, out) output, while
        W0 + s·B·A costs one pass over the (out, in) weight (`functional.weight_path_is_cheaper`):
        for prompts and batches of many tokens the layer then runs as fast as a merged one (its
        values are a merged layer's, to float rounding), for a few tokens (generation) it keeps
        the branches. Only for a plain `nn.Linear` base without hooks, adapters without fused
        slices or dropout in effect, one dtype throughout, and nothing that needs a gradient.
        """
        base = self.base_layer
        if self.row_groups is not None or type(base) is not nn.Linear or hooked(base):
            return None
        pending = [self.adapters[n] for n in self.unmerged_active()]
        W = base.weight
        if not pending or x.dtype != W.dtype or x.shape[-1] != self.in_features:
            return None
        tensors = [W, x, *([base.bias] if base.bias is not None else [])]
        tensors += [t for rec in pending for t in (rec.lora_A, rec.lora_B)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return None
        if any(rec.slices is not None or (rec.training and rec.dropout_p > 0) for rec in pending):
            return None
        if any(rec.lora_A.dtype != W.dtype for rec in pending):
            return None
        if not LF.weight_path_is_cheaper(x.numel() // self.in_features, self.in_features, self.out_features):
            return None
        weight = torch.addmm(W, pending[0].lora_B, pending[0].lora_A, alpha=pending[0].scaling)
        for rec in pending[1:]:
            weight.addmm_(rec.lora_B, rec.lora_A, alpha=rec.scaling)
        return weight

    def add_branch(self, record: AdapterRecord, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if record.slices is not None:
            return super().add_branch(record, x, result)
        return LF.lora_linear(
            result,
            x,
            record.lora_A,
            record.lora_B,
            record.scaling,
            record.dropout_p,
            record.training,
            record.share_dropout_mask,
            in_place=not _output_seen(self.base_layer),
        )

    def _forward_rows(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        stacks = self._row_stacks(x)
        if stacks is None:
            return super()._forward_rows(x, result)
        A_rows, B_rows = stacks  # (batch, r, in), (batch, out, r) with the scaling folded into B
        xa = x.reshape(x.shape[0], -1, x.shape[-1]).to(A_rows.dtype)
        y = torch.bmm(torch.bmm(xa, A_rows.transpose(1, 2)), B_rows.transpose(1, 2))
        return result + y.view(result.shape).to(result.dtype)

    def _row_stacks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each row's (A, s·B), zero for base rows, for one batched product over all rows.

        One `bmm` pair serves any number of distinct adapters, so a batch of 16 adapters costs
        what one does. Used when no gradient flows (inference) and every adapter in the batch is
        a plain (not fused-slice) one; otherwise the rows are grouped per adapter. Built once per
        `adapter_per_row` block and reused while the parameters are unchanged.
        """
        names = self.row_names
        if names is None or torch.is_grad_enabled() or x.dim() < 2 or x.shape[0] != len(names):
            return None
        present = [n for n in dict.fromkeys(names) if n in self.adapters]
        records = [self.adapters[n] for n in present]
        if not records or any(rec.slices is not None for rec in records):
            return None
        dtype = records[0].lora_A.dtype
        if any(rec.lora_A.dtype != dtype for rec in records):
            return None
        key = tuple(
            (n, id(rec.lora_A), rec.lora_A._version, id(rec.lora_B), rec.lora_B._version, rec.scaling)
            for n, rec in zip(present, records, strict=True)
        )
        if self.row_cache is not None and self.row_cache[0] == key:
            return self.row_cache[1]
        stacked = self.__dict__.get("_stacked_adapters")
        if stacked is None or stacked[0] != key:
            # All adapters of the batch stacked (ranks zero-padded, scaling folded into B, a zero
            # slot last for base rows); kept across blocks while the adapters are unchanged.
            r = max(rec.r for rec in records)
            A = torch.zeros(len(records) + 1, r, self.in_features, dtype=dtype, device=x.device)
            B = torch.zeros(len(records) + 1, self.out_features, r, dtype=dtype, device=x.device)
            with torch.no_grad():
                for i, rec in enumerate(records):
                    A[i, : rec.r] = rec.lora_A
                    B[i, :, : rec.r] = rec.lora_B * rec.scaling
            stacked = (key, A, B)
            self.__dict__["_stacked_adapters"] = stacked
        _, A, B = stacked
        slot = {n: i for i, n in enumerate(present)}
        index = torch.tensor([slot.get(n, len(records)) for n in names], device=x.device)
        stacks = (A[index], B[index])
        self.row_cache = (key, stacks)
        return stacks

    def lora_output(self, record: AdapterRecord, x: torch.Tensor) -> torch.Tensor:
        A, B = record.lora_A, record.lora_B
        x = record.dropout(x).to(A.dtype)
        if record.slices is not None:
            return LF.fused_linear_delta(x, A, B, record.scaling, record.slices, record.n_slices)
        return LF.linear_delta(x, A, B, record.scaling)

    def add_delta_(self, weight: torch.Tensor, name: str, sign: float) -> None:
        rec = self.adapters[name]
        if rec.slices is not None or rec.lora_A.dtype != weight.dtype:
            return super().add_delta_(weight, name, sign)
        A, B = rec.lora_A.detach(), rec.lora_B.detach()
        if self.is_conv1d:  # weight is (in, out): += s·(B·A)ᵀ = s·Aᵀ·Bᵀ
            weight.addmm_(A.t(), B.t(), alpha=sign * rec.scaling)
        else:
            weight.addmm_(B, A, alpha=sign * rec.scaling)

    def delta_weight(self, name: str) -> torch.Tensor:
        rec = self.adapters[name]
        A, B = rec.lora_A, rec.lora_B
        if rec.slices is not None:
            A, B = LF.expand_fused(A, B, rec.slices, rec.n_slices)
        delta = LF.delta_weight(A.detach(), B.detach(), rec.scaling)
        return delta.T if self.is_conv1d else delta

    def pissa_tensors(self, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PiSSA initialisation (Meng et al., 2024): (A, B, residual weight in the base layout).

        W = U·S·Vᵀ; A = √(S_r/s)·V_rᵀ, B = U_r·√(S_r/s), so s·B·A is W's best rank-r part and
        W_res = W − s·B·A; the layer's output is unchanged at the start.
        """
        weight = self.base_layer.weight.detach()
        weight = weight.to(LF.accumulate_dtype(weight.dtype))
        W = weight.T if self.is_conv1d else weight  # (out, in)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = torch.sqrt(S[:r] / s)
        A = root[:, None] * Vh[:r]  # (r, in)
        B = U[:, :r] * root[None, :]  # (out, r)
        residual = W - s * (B @ A)
        residual = residual.T if self.is_conv1d else residual
        return A.contiguous(), B.contiguous(), residual.to(self.base_layer.weight.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA on `nn.Embedding`: h = E0[ids] + s·(Aᵀ[ids])·Bᵀ, A: (r, num_embeddings), B: (dim, r).

    Initialised as PEFT does for embeddings: A = 0 and B ~ N(0, 1), so a fresh adapter is a no-op.
    Stored in PEFT files as `lora_embedding_A` / `lora_embedding_B`.
    """

    _peft_a_key = "lora_embedding_A"

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def init_tensors(
        self, r: int, init: bool | str, slices: Sequence[int] | None = None, n_slices: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kw = self._factory()
        A = torch.zeros(r, self.in_features, **kw)
        B = torch.randn(self.out_features, r, **kw)
        if init is False:
            A.normal_()
        return A, B

    def lora_output(self, record: AdapterRecord, x: torch.Tensor) -> torch.Tensor:
        return LF.embedding_delta(x, record.lora_A, record.lora_B, record.scaling, self.base_layer)

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

    def init_tensors(
        self, r: int, init: bool | str, slices: Sequence[int] | None = None, n_slices: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kw = self._factory()
        A = torch.empty(r, self.in_features, *self.base_layer.kernel_size, **kw)
        B = torch.zeros(self.out_features, r, 1, 1, **kw)
        if init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        return A, B

    def lora_output(self, record: AdapterRecord, x: torch.Tensor) -> torch.Tensor:
        A = record.lora_A
        return LF.conv2d_delta(record.dropout(x).to(A.dtype), A, record.lora_B, record.scaling, self.base_layer)

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

    def _current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active:
                if name in self.adapters:
                    return self.adapters[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.row_groups is None or self.disabled:
            return self._current()(x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs)
        for name, rows in self.row_groups:
            if name not in self.adapters:
                continue
            rows = rows.to(out.device)
            out = out.index_copy(0, rows, self.adapters[name](x.index_select(0, rows), *args, **kwargs))
        return out


def supported_types() -> tuple[type[nn.Module], ...]:
    """The base layer types lorakit can wrap."""
    types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.Conv2d)
    return (*types, Conv1D) if Conv1D is not None else types


def wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA wrapper class for a base module, or None when its type cannot be adapted."""
    if isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D)):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, nn.Conv2d):
        return LoraConv2d
    return None


def hooked(module: nn.Module) -> bool:
    """Whether forward (pre-)hooks, the module's own or global ones, would see a call of `module`:
    code that computes its output another way must then let the module run."""
    hooks = nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
    )


def _output_seen(module: nn.Module) -> bool:
    """Whether a forward hook (the module's or a global one) saw the module's output, which then
    must not be updated in place."""
    return bool(module._forward_hooks or nn.modules.module._global_forward_hooks)
