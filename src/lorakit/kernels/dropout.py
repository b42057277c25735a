"""Dropout on LoRA branch inputs: which elements drop, how a mask is kept, and how layers share it.

A LoRA training step runs the frozen model plus small products, so the dropout mask over each
branch input (N × in elements) is one of its largest costs on CPU: `bernoulli_` alone was a fifth
of a PEFT all-linear step. Both paths, reference and fast, draw their masks here, so that
`lorakit.kernels.disabled()` changes how a mask is kept and applied but never which elements drop:
a training step gives the same values either way (to float rounding).

Drawing (`draw_mask`), two samplers of i.i.d. Bernoulli(p) drops:

- sparse (CPU, p ≤ `SPARSE_MAX_P`, outside torch.compile; `sparse_applies`): the gaps between
  dropped elements are i.i.d. geometric, so ~N·in·p uniforms give every dropped position
  (cumulative sums of floor(log(1 − U) / log(1 − p))); ~1/10 of the random bits at p = 0.05.
- dense (elsewhere): 16-bit uniform integers cut from 64-bit draws against a threshold, so p acts
  in steps of 1/65536.

Either way the exact p realised is returned, so the kept values are scaled by exactly 1/(1 − p),
and seeding (`torch.manual_seed`) and checkpointed RNG states reproduce a mask.

Keeping (`KeepMask`): a mask is held as dropped positions or as a boolean tensor, and a backward
keeps it as int32 positions or as bits, 8 per byte (`KeepMask.saved`) — not as a float copy.

Sharing (`MaskSharing`, one per model): layers reading the very same unchanged tensor (q, k, v;
gate, up) share one mask when `LoraConfig.share_dropout_mask` is on, as the paper's code does for
GPT-2's fused q/v (`MergedLinear`: one dropout of x). A mask over one input is a `Draw`: created by
the first forward that reads the input, it hands x·keep to the nodes that want it and, through its
`Rebuild`, rebuilds x·keep once in the backward for all the nodes that kept x itself instead.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lorakit import functional as LF
from lorakit.kernels.guards import compiling, computes, grad_needed
from lorakit.kernels.switch import enabled

__all__ = [
    "DROPOUT_RESOLUTION",
    "SPARSE_MAX_P",
    "Draw",
    "KeepMask",
    "MaskSharing",
    "Rebuild",
    "dense_mask",
    "draw_for",
    "draw_mask",
    "dropout_active",
    "dropped",
    "masked_applies",
    "masked_branches",
    "pack_mask",
    "sparse_applies",
    "sparse_mask",
    "unpack_mask",
]

DROPOUT_RESOLUTION = LF.DROPOUT_RESOLUTION
"""Dense masks apply p in steps of 1/65536 (p = 0.5 + 1e-6 acts as 32768/65536); sparse ones apply p
itself. Probabilities below 1/131072 act as no dropout either way (`functional.dropout_active`)."""

SPARSE_MAX_P = 0.2
"""Up to this p, CPU masks are drawn as dropped positions. Measured per mask (draw, keep, apply,
restore, apply; 512 × 576 and 512 × 1536, 2 threads): sparse costs 0.70–0.76× of dense at
p = 0.15 and 1.10–1.15× at p = 0.25."""


def _dropout_threshold(p: float) -> int:
    return min(DROPOUT_RESOLUTION - 1, round(p * DROPOUT_RESOLUTION))


dropout_active = LF.dropout_active


# ---------------------------------------------------------------------------- bits
# Bit j of a packed byte is mask element 8·k + j: multiplying 8 one-byte flags by _GATHER brings
# them into the top byte without carries; multiplying a byte by _SPREAD copies it into all eight
# bytes, _SELECT keeps bit j in byte j, and adding 0x7F to every byte then carries a set bit into
# that byte's top bit (never into the next byte), which `>> 7` and _ONES turn into a 0/1 byte.
_GATHER = 0x0102040810204080
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # as a signed int64
_LOW7 = 0x7F7F7F7F7F7F7F7F
_ONES = 0x0101010101010101


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as bits, 8 per byte (uint8, ceil(numel / 8) entries); see `unpack_mask`."""
    flat = keep.reshape(-1).view(torch.uint8)
    if flat.numel() % 8:
        flat = F.pad(flat, (0, 8 - flat.numel() % 8))
    return ((flat.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def _unpack_bytes(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """uint8 of `shape`, 1 where the packed mask was True and 0 elsewhere."""
    words = ((((packed.to(torch.int64) * _SPREAD) & _SELECT) + _LOW7) >> 7) & _ONES
    return words.view(torch.uint8)[: math.prod(shape)].view(tuple(shape))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The boolean tensor of `shape` that `pack_mask` packed."""
    return _unpack_bytes(packed, shape).view(torch.bool)


# ---------------------------------------------------------------------------- the mask
class KeepMask:
    """Which elements of a tensor of `shape` dropout keeps, with the exact p it realises.

    Held as the flat positions of the dropped elements (`dropped`, int64; sparse), as a boolean
    tensor (`keep`; dense, fresh) or as bits (`bits`; dense, restored for a backward). `saved()`
    is what a backward keeps and `from_saved` rebuilds the mask from it.
    """

    __slots__ = ("_saved", "bits", "dropped", "keep", "p", "shape")

    def __init__(
        self,
        shape: Sequence[int],
        p: float,
        *,
        dropped: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        bits: torch.Tensor | None = None,
    ) -> None:
        self.shape = tuple(shape)
        self.p = p
        self.dropped, self.keep, self.bits = dropped, keep, bits
        self._saved: torch.Tensor | None = None

    def factor(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as a new 0/1 tensor of `dtype`, to multiply by.

        On CPU, `x * factor` with a float factor (and the uint8 → float cast that makes it) run
        vectorised; `torch.where(keep, x, 0)` and bool → float casts do not, and cost 3–5× more.
        """
        if self.keep is not None:
            return self.keep.view(torch.uint8).to(dtype)
        if self.bits is not None:
            return _unpack_bytes(self.bits, self.shape).to(dtype)
        return self.to_bool().view(torch.uint8).to(dtype)

    def to_bool(self) -> torch.Tensor:
        """The mask as a boolean tensor of `shape`, True where kept."""
        if self.dropped is None:
            return self.keep if self.keep is not None else unpack_mask(self.bits, self.shape)
        keep = torch.ones(math.prod(self.shape), dtype=torch.bool, device=self.dropped.device)
        return keep.index_fill_(0, self.dropped.long(), False).view(self.shape)

    def apply(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """x·keep as a new contiguous tensor of `dtype` (default: x's), in one pass over x."""
        dtype = dtype or x.dtype
        if self.dropped is None:
            return self.factor(dtype).mul_(x)  # the factor's memory becomes the result
        out = torch.empty(self.shape, dtype=dtype, device=x.device)
        out.copy_(x)
        return self.apply_(out)

    def apply_(self, t: torch.Tensor) -> torch.Tensor:
        """t·keep in place (t: a contiguous tensor of `shape`)."""
        if self.dropped is None:
            return t.mul_(self.factor(t.dtype))
        t.view(-1).index_fill_(0, self.dropped.long(), 0)
        return t

    def saved(self) -> torch.Tensor:
        """What a backward keeps: the dropped positions (int32 where they fit) or the bits.

        Made once per mask: the nodes of layers sharing the mask keep one tensor between them.
        """
        if self._saved is None:
            if self.dropped is not None:
                small = math.prod(self.shape) < 2**31
                self._saved = self.dropped.to(torch.int32) if small else self.dropped
            else:
                self._saved = self.bits if self.bits is not None else pack_mask(self.keep)
        return self._saved

    @classmethod
    def from_saved(cls, saved: torch.Tensor, shape: Sequence[int], p: float) -> KeepMask:
        """The mask whose `saved()` gave `saved`."""
        if saved.dtype == torch.uint8:
            return cls(shape, p, bits=saved)
        return cls(shape, p, dropped=saved)


# ---------------------------------------------------------------------------- drawing
def sparse_applies(p: float, device: torch.device | str) -> bool:
    """Whether `draw_mask` takes the sparse sampler: CPU, 0 < p ≤ `SPARSE_MAX_P`, not under torch.compile
    (Dynamo cannot trace the data-dependent number of positions)."""
    return torch.device(device).type == "cpu" and dropout_active(p) and p <= SPARSE_MAX_P and not compiling()


def _dropped_positions(n: int, p: float, device: torch.device | str, first: int | None = None) -> torch.Tensor:
    """The positions in [0, n) that i.i.d. Bernoulli(p) trials drop, ascending (int64).

    Gaps between drops are geometric: floor(log(1 − U) / log(1 − p)) for U uniform on [0, 1)
    (U from float32 draws, so the gap distribution is exact to 2⁻²⁴). Enough gaps are drawn to
    pass n but for a chance below 1e-12 (or `first`, for tests); past that, more are drawn.
    """
    mean = n * p
    count = first or int(mean + 8 * math.sqrt(mean * (1 - p))) + 16
    log_q = math.log1p(-p)
    parts, start = [], 0
    while True:
        u = torch.rand(count, device=device).double()
        gaps = u.neg_().log1p_().div_(log_q).to(torch.int64)  # ≥ 0, so truncation is floor
        pos = gaps.add_(1).cumsum_(0).add_(start - 1)
        parts.append(pos)
        last = int(pos[-1])
        if last >= n:
            break
        start, count = last + 1, int((n - last) * p + 8 * math.sqrt(mean)) + 16
    pos = parts[0] if len(parts) == 1 else torch.cat(parts)
    return pos[: int(torch.searchsorted(pos, n))]


def sparse_mask(shape: Sequence[int], p: float, device: torch.device | str) -> KeepMask:
    """A mask drawn as the positions of the dropped elements (exact p; see the module docstring)."""
    return KeepMask(shape, p, dropped=_dropped_positions(math.prod(shape), p, device))


def dense_mask(shape: Sequence[int], p: float, device: torch.device | str) -> KeepMask:
    """A mask drawn as a boolean tensor, p in steps of 1/65536 (see the module docstring)."""
    threshold = _dropout_threshold(p)
    n = math.prod(shape)
    size = ((n + 3) // 4,)
    if compiling():  # Dynamo does not trace random_
        words = torch.randint(-(2**63), 2**63 - 1, size, dtype=torch.int64, device=device)
    else:  # random_(min, None) draws all 64 bits; randint's range reduction costs ~17% more
        words = torch.empty(size, dtype=torch.int64, device=device).random_(-(2**63), None)
    keep = words.view(torch.int16)[:n].view(tuple(shape)) >= threshold - (1 << 15)
    return KeepMask(shape, threshold / DROPOUT_RESOLUTION, keep=keep)


def draw_mask(shape: Sequence[int], p: float, device: torch.device | str) -> KeepMask:
    """A dropout mask over `shape` with probability p in [0, 1), from the default generator:
    `sparse_mask` where `sparse_applies`, else `dense_mask`."""
    return sparse_mask(shape, p, device) if sparse_applies(p, device) else dense_mask(shape, p, device)


# ---------------------------------------------------------------------------- one mask over one input
class Rebuild:
    """The backward half of a shared `Draw`: x·keep rebuilt once for all the nodes that kept x.

    Each node that will need x·keep in its backward calls `claim()` in its forward; in the
    backward the first `take` builds x·keep and holds it until the last claim took it, then drops
    it. A second backward over a retained graph finds no claims left and builds per node.
    """

    __slots__ = ("pending", "value")

    def __init__(self) -> None:
        self.pending = 0
        self.value: torch.Tensor | None = None

    def claim(self) -> None:
        """Called in a forward: this node will `take` once in its backward."""
        self.pending += 1

    def take(self, x: torch.Tensor, mask: KeepMask, dtype: torch.dtype) -> torch.Tensor:
        """x·keep in `dtype` (x and mask as kept by the calling node)."""
        value = self.value if self.value is not None else mask.apply(x, dtype)
        self.pending -= 1
        self.value = value if self.pending > 0 else None
        return value


class Draw:
    """One dropout mask drawn over one input tensor, and x·keep in the forms asked for.

    `plain(x, dtype)` is x·keep outside autograd (for nodes that keep x itself and rebuild x·keep in
    their backward through `rebuild`); `node(x)` is x·keep as the output of a `MaskedInput` node
    (for branches written as tensor operations). Each is made at most once per Draw. `rebuild` is
    None when the mask is not shared: a node then rebuilds its own.
    """

    __slots__ = ("_node", "_plain", "mask", "rebuild")

    def __init__(self, mask: KeepMask, shared: bool) -> None:
        self.mask = mask
        self.rebuild = Rebuild() if shared else None
        self._plain: torch.Tensor | None = None
        self._node: torch.Tensor | None = None

    def plain(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x·keep in `dtype`, outside autograd."""
        if self._plain is None or self._plain.dtype != dtype:
            self._plain = self.mask.apply(x.detach(), dtype)
        return self._plain

    def node(self, x: torch.Tensor) -> torch.Tensor:
        """x·keep in x's dtype, carrying x's gradient through a node that keeps only the mask."""
        if self._node is None:
            self._node = MaskedInput.apply(x, self.mask) if grad_needed(x) else self.plain(x, x.dtype)
        return self._node


class MaskSharing(threading.local):
    """The mask last drawn, keyed by the input tensor it was drawn for: one per model, per thread.

    Layers reading the very same unchanged tensor get the same `Draw` (with sharing on, and outside
    torch.compile, where each layer draws its own). The entry is dropped when that tensor is freed
    or the next input is drawn for. Deep copies and pickles of a model get a fresh, empty one.
    """

    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.key: tuple = ()
        self.value: Draw | None = None

    def __deepcopy__(self, memo: dict) -> MaskSharing:
        return MaskSharing()

    def __reduce__(self):
        return (MaskSharing, ())

    def forget(self, _ref: object = None) -> None:
        """Drop the cached draw."""
        self.ref, self.key, self.value = None, (), None

    def draw(self, x: torch.Tensor, p: float, share: bool = True) -> Draw:
        """The mask for input `x` with probability p: the shared one when `x` already has one."""
        if not share or compiling():
            return Draw(draw_mask(x.shape, p, x.device), shared=False)
        # An inference tensor (made under torch.inference_mode) has no version counter to read;
        # it cannot be changed in place outside inference mode either, so its identity is the key.
        version = -1 if x.is_inference() else x._version
        key = (version, x.shape, p, torch.is_grad_enabled())
        if self.value is not None and self.ref is not None and self.ref() is x and self.key == key:
            return self.value
        value = Draw(draw_mask(x.shape, p, x.device), shared=True)
        self.ref, self.key, self.value = weakref.ref(x, self.forget), key, value
        return value


def draw_for(masks: MaskSharing, record, x: torch.Tensor) -> Draw | None:
    """The dropout mask of an adapter record (`lorakit.records.AdapterRecord`) over input x, shared
    with the layers reading the same x as `record.share_dropout_mask` says; None when its dropout
    is not in effect (eval mode, or p = 0): no dropout code runs then."""
    if not record.dropout_in_effect:
        return None
    return masks.draw(x, record.dropout_p, record.share_dropout_mask)


# ---------------------------------------------------------------------------- applying
class MaskedInput(torch.autograd.Function):
    """x·keep (dropout without rescaling), keeping only the mask's positions or bits for the backward."""

    @staticmethod
    def forward(ctx, x, mask: KeepMask):
        ctx.save_for_backward(mask.saved())
        ctx.shape, ctx.p = mask.shape, mask.p
        return mask.apply(x)

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        return KeepMask.from_saved(saved, ctx.shape, ctx.p).apply(grad), None


def dropped(x: torch.Tensor, draw: Draw) -> torch.Tensor:
    """x·keep/(1 − p) for a branch written as tensor operations, x·keep from a `MaskedInput` node
    (made once per shared mask), so autograd keeps the mask's positions or bits instead of a float
    factor. Reference: `functional.dropout(x, keep, p)`."""
    return draw.node(x) * (1 / (1 - draw.mask.p))


def masked_applies(records: Sequence) -> bool:
    """Eligibility of speed path `masked_input` for a layer whose forward adds `records`: plain
    adapters (`guards.computes`), at least one with dropout in effect and a gradient to keep for
    (else the reference keeps nothing either)."""
    return (
        enabled("masked_input")
        and torch.is_grad_enabled()
        and all(computes(rec) for rec in records)
        and any(rec.dropout_in_effect for rec in records)
    )


def masked_branches(
    result: torch.Tensor,
    x: torch.Tensor,
    records: Sequence,
    masks: MaskSharing,
    delta: Callable[[Any, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """result + Σ delta(record, dropout(x)) over `records`, each dropout's x·keep kept as a mask
    (`dropped`): the branches of layers the fused node does not cover (fused slices, conv) in
    training. `delta(record, x_dropped)` is the layer's branch on an input already dropped out."""
    for rec in records:
        draw = draw_for(masks, rec, x)
        result = result + delta(rec, x if draw is None else dropped(x, draw)).to(result.dtype)
    return result
