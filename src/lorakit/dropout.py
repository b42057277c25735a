"""Dropout on LoRA branch inputs: drawing masks cheaply, keeping them small, sharing them.

A LoRA training step runs the frozen model plus small products, so the dropout mask over each
branch input (N × in elements) is one of its largest costs on CPU: `bernoulli_` alone was a fifth
of a PEFT all-linear step. Two ways of drawing a mask live here:

- sparse (CPU, p ≤ `SPARSE_MAX_P`): the gaps between dropped elements of i.i.d. Bernoulli(p)
  trials are i.i.d. geometric, so ~N·in·p uniforms give every dropped position (cumulative sums
  of floor(log(1 − U) / log(1 − p))). The mask is kept as those positions; applying it is a copy
  and a scatter of zeros. At p = 0.05 that draws ~1/10 of the random bits of the dense way.
- dense (elsewhere, and inside `torch.compile`): 16-bit uniform integers cut from 64-bit draws,
  compared with a threshold, so p acts in steps of 1/65536; kept for the backward as bits.

Either way the exact p realised is returned, so the kept values are scaled by 1/(1 − p) exactly,
and seeding (`torch.manual_seed`) and checkpointed RNG states reproduce a mask.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "DROPOUT_RESOLUTION",
    "SPARSE_MAX_P",
    "KeepMask",
    "SharedRebuild",
    "draw_mask",
    "dropout_active",
    "dropout_input",
    "dropout_keep_mask",
    "keep_factor",
    "masked_input",
    "pack_mask",
    "shared_mask",
    "unpack_factor",
    "unpack_mask",
]

DROPOUT_RESOLUTION = 1 << 16
"""Dense masks apply p in steps of 1/65536 (p = 0.5 + 1e-6 acts as 32768/65536); sparse ones apply p
itself. Probabilities below 1/131072 act as no dropout either way."""

SPARSE_MAX_P = 0.2
"""Up to this p, CPU masks are drawn as dropped positions. Measured per mask (draw, keep, apply,
restore, apply; 512 × 576 and 512 × 1536, 2 threads): sparse costs 0.70–0.76× of dense at
p = 0.15 and 1.10–1.15× at p = 0.25."""


def _dropout_threshold(p: float) -> int:
    return min(DROPOUT_RESOLUTION - 1, round(p * DROPOUT_RESOLUTION))


def dropout_active(p: float) -> bool:
    """Whether a dropout probability drops anything (p ≥ 1/131072)."""
    return _dropout_threshold(p) > 0


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


def unpack_factor(packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The mask that `pack_mask` packed as a 0/1 multiplier of `dtype` (see `keep_factor`)."""
    return _unpack_bytes(packed, shape).to(dtype)


def keep_factor(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as a 0/1 tensor of `dtype`, to multiply by.

    On CPU, `x * factor` with a float factor (and the uint8 → float cast that makes it) run
    vectorised; `torch.where(keep, x, 0)` and bool → float casts do not, and cost 3–5× more.
    """
    return keep.view(torch.uint8).to(dtype)


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

    def _factor(self, dtype: torch.dtype) -> torch.Tensor:
        if self.keep is not None:
            return keep_factor(self.keep, dtype)
        if self.bits is not None:
            return unpack_factor(self.bits, self.shape, dtype)
        raise AssertionError("a sparse mask has no factor")

    def to_bool(self) -> torch.Tensor:
        """The mask as a boolean tensor of `shape`, True where kept."""
        if self.dropped is None:
            return self.keep if self.keep is not None else unpack_mask(self.bits, self.shape)
        keep = torch.ones(math.prod(self.shape), dtype=torch.bool, device=self.dropped.device)
        return keep.index_fill_(0, self.dropped.long(), False).view(self.shape)

    def apply(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """x·keep as a new contiguous tensor of `dtype` (default: x's)."""
        dtype = dtype or x.dtype
        if self.dropped is None:
            return self._factor(dtype).mul_(x)  # the factor's memory becomes the result
        out = torch.empty(self.shape, dtype=dtype, device=x.device)
        out.copy_(x)
        return self.apply_(out)

    def apply_(self, t: torch.Tensor) -> torch.Tensor:
        """t·keep in place (t: a contiguous tensor of `shape`)."""
        if self.dropped is None:
            return t.mul_(self._factor(t.dtype))
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


def _dense_keep(shape: Sequence[int], p: float, device: torch.device | str) -> tuple[torch.Tensor, float]:
    threshold = _dropout_threshold(p)
    n = math.prod(shape)
    size = ((n + 3) // 4,)
    if torch.compiler.is_compiling():  # Dynamo does not trace random_
        words = torch.randint(-(2**63), 2**63 - 1, size, dtype=torch.int64, device=device)
    else:  # random_(min, None) draws all 64 bits; randint's range reduction costs ~17% more
        words = torch.empty(size, dtype=torch.int64, device=device).random_(-(2**63), None)
    keep = words.view(torch.int16)[:n].view(tuple(shape)) >= threshold - (1 << 15)
    return keep, threshold / DROPOUT_RESOLUTION


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


def _uses_sparse(p: float, device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and p <= SPARSE_MAX_P and not torch.compiler.is_compiling()


def draw_mask(shape: Sequence[int], p: float, device: torch.device | str, sparse: bool | None = None) -> KeepMask:
    """A dropout mask over `shape` with probability p in [0, 1), drawn from the default generator.

    Sparse (dropped positions, the exact p) on CPU for p ≤ `SPARSE_MAX_P` outside `torch.compile`;
    dense (a boolean tensor, p in steps of 1/65536) otherwise; `sparse` forces one or the other
    (benchmarks, tests). See the module docstring.
    """
    if sparse is None:
        sparse = _uses_sparse(p, device)
    if sparse and dropout_active(p):
        return KeepMask(shape, p, dropped=_dropped_positions(math.prod(shape), p, device))
    keep, p_exact = _dense_keep(shape, p, device)
    return KeepMask(shape, p_exact, keep=keep)


def dropout_keep_mask(
    shape: torch.Size | Sequence[int], p: float, device: torch.device | str
) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask for dropout with probability p, and the exact p it realises.

    The same mask `draw_mask` draws from the same generator state, as a boolean tensor.

    Args:
        shape: the mask's shape (that of the input).
        p: dropout probability in [0, 1).
        device: where to draw it.

    Returns:
        (keep, p_exact): keep is True where the input is kept.
    """
    mask = draw_mask(shape, p, device)
    return mask.to_bool(), mask.p


class _MaskedInput(torch.autograd.Function):
    """x·keep in `dtype` (dropout without rescaling; the cast, if any, in the same pass), keeping
    only the mask's positions or bits for the backward."""

    @staticmethod
    def forward(ctx, x, mask: KeepMask, dtype: torch.dtype):
        ctx.save_for_backward(mask.saved())
        ctx.shape, ctx.p, ctx.x_dtype = mask.shape, mask.p, x.dtype
        return mask.apply(x, dtype)

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        return KeepMask.from_saved(saved, ctx.shape, ctx.p).apply(grad, ctx.x_dtype), None, None


class SharedRebuild:
    """x·keep rebuilt once in a backward for all the nodes that keep x and one shared mask.

    Each node that will rebuild x·keep in its backward calls `expect` in its forward; the first
    `get` in the backward builds x·keep and holds it until the last expected node took it.
    """

    __slots__ = ("pending", "value")

    def __init__(self) -> None:
        self.pending = 0
        self.value: torch.Tensor | None = None

    def expect(self) -> None:
        self.pending += 1

    def get(self, x: torch.Tensor, mask: KeepMask, dtype: torch.dtype) -> torch.Tensor:
        """x·keep in `dtype` (x and mask as kept by the calling node)."""
        value = self.value if self.value is not None else mask.apply(x, dtype)
        self.pending -= 1
        self.value = value if self.pending > 0 else None
        return value


class _Drawn:
    """One mask drawn over one input, with x·keep in the forms asked for so far.

    `plain` is x·keep as a tensor outside autograd (for nodes that keep x itself and rebuild
    x·keep in their backward through `rebuild`, `LoraLinearFunction`; None when the mask is not
    shared); `node` is x·keep as the output of a `_MaskedInput` node (for branches written as
    plain tensor ops). Each is made at most once.
    """

    __slots__ = ("_node", "_plain", "dtype", "mask", "rebuild")

    def __init__(self, mask: KeepMask, dtype: torch.dtype, shared: bool) -> None:
        self.mask, self.dtype = mask, dtype
        self.rebuild = SharedRebuild() if shared else None
        self._plain: torch.Tensor | None = None
        self._node: torch.Tensor | None = None

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        if self._plain is None:
            self._plain = self.mask.apply(x.detach(), self.dtype)
        return self._plain

    def node(self, x: torch.Tensor) -> torch.Tensor:
        if self._node is None:
            if torch.is_grad_enabled() and x.requires_grad:
                self._node = _MaskedInput.apply(x, self.mask, self.dtype)
            else:
                self._node = self.plain(x)
        return self._node


class _SharedDrop(threading.local):
    """The mask last drawn, keyed by the input tensor it was drawn for.

    q, k and v projections (and gate/up) read the very same input tensor; with sharing on, they
    reuse one mask and one masked input x·keep: it is computed once, and what the backward keeps
    of it — x itself and the mask's positions or bits (`LoraLinearFunction`), or the masked input
    with the mask (`_MaskedInput`) — is kept once, instead of a float copy per layer; the mask is
    applied to each branch's share of the input gradient. This is also what the reference
    implementation does for GPT-2's fused q/v layer (`MergedLinear`: one dropout of x).
    """

    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.key: tuple = ()
        self.value: _Drawn | None = None

    def clear(self, _ref: object = None) -> None:
        self.ref, self.key, self.value = None, (), None

    def get(self, x: torch.Tensor, p: float, dtype: torch.dtype) -> _Drawn:
        key = (x._version, x.shape, p, dtype, torch.is_grad_enabled())
        if self.ref is not None and self.ref() is x and self.key == key and self.value is not None:
            return self.value
        value = _Drawn(draw_mask(x.shape, p, x.device), dtype, shared=True)
        self.ref, self.key, self.value = weakref.ref(x, self.clear), key, value
        return value


_shared_drop = _SharedDrop()


def _drawn(x: torch.Tensor, p: float, share: bool, dtype: torch.dtype | None) -> _Drawn:
    dtype = dtype or x.dtype
    if share and not torch.compiler.is_compiling():
        return _shared_drop.get(x, p, dtype)
    return _Drawn(draw_mask(x.shape, p, x.device), dtype, shared=False)


def masked_input(x: torch.Tensor, p: float, share: bool = True, dtype: torch.dtype | None = None):
    """(x·keep in `dtype`, the exact p): dropout without the 1/(1 − p) rescaling.

    The result carries x's gradient (through a node that keeps only the mask). With `share`, a
    layer that reads the very same (unchanged) tensor gets the same result (except inside
    `torch.compile`, where each layer draws its own mask).
    """
    drawn = _drawn(x, p, share, dtype)
    return drawn.node(x), drawn.mask.p


def shared_mask(
    x: torch.Tensor, p: float, share: bool = True, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, KeepMask, SharedRebuild | None]:
    """(x·keep in `dtype` outside autograd, the mask, its `SharedRebuild` or None when not shared):
    for a node that keeps x and the mask and rebuilds x·keep in its backward.

    Sharing as `masked_input` (the same mask for layers reading the very same tensor).
    """
    drawn = _drawn(x, p, share, dtype)
    return drawn.plain(x), drawn.mask, drawn.rebuild


def dropout_input(x: torch.Tensor, p: float, training: bool, share: bool = True) -> torch.Tensor:
    """Dropout of the LoRA branch input as a plain tensor op (for the branches without a fused kernel).

    Args:
        x: the input.
        p: probability.
        training: apply only when True (and p > 0).
        share: reuse the mask of another layer that read this very tensor.
    """
    if not training or not dropout_active(p):
        return x
    xm, p_exact = masked_input(x, p, share)
    return xm * (1 / (1 - p_exact))
