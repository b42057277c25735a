"""Speed paths `nf4_dequant` and `nf4_quant`: an NF4 weight to and from a dense tensor.

`dequantize` (path `nf4_dequant`): torchao's `NF4Tensor.get_original_weight` (the reference)
unpacks the two 4-bit codes of each byte into two int64 tensors, looks each up in the 16-value NF4
table, scales each by its block's scaler and interleaves the halves with a stack: on CPU about
2.1 ms for a 1536×576 weight. Here a 256-entry table maps each byte to its pair of values at once
(one gather over int32 byte codes) and the scalers multiply the result in place: the same numbers,
bit for bit, in about 0.75 ms.
A QLoRA step dequantizes every base weight twice (forward and backward), so this is most of what
an NF4 base costs over a bf16 one.

`quantize` (path `nf4_quant`): torchao's `to_nf4` (the reference) makes a float copy of the whole
weight scaled by its blocks' absmax, another for the absolute values, and finds each value's
nearest code by comparing it with all 16 levels, 2^20 values at a time: a (2^20, 16) distance
matrix, about 150 MB of temporaries, and about 0.1 µs a weight on this CPU, most of a 7B load.
Here the weight goes through in chunks of 4,096 blocks: each chunk's absmax, its scaled values,
and a binary search over the 15 gaps between levels, after which only the two neighbouring levels
are compared, with torchao's arithmetic (|v − level| in the weight's dtype, the first level on a
tie, code 0 for the NaN of an all-zero block). The double quantization of the scalers is
torchao's, expression for expression. The same NF4Tensor, bit for bit, with temporaries of a
few MB whatever the weight's size.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from lorakit.kernels.switch import enabled

__all__ = ["dequantize", "pair_table", "quantize"]

NF4_LEVELS = (
    -1.0000, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0000,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0000,
)  # fmt: skip
"""QLoRA's 16 NF4 levels, as torchao writes them (its table is built from these in the weight's dtype)."""

_CHUNK_BLOCKS = 4096  # blocks a chunk of `quantize`: 2^18 values of 64-blocks


def pair_table(nf4: torch.Tensor) -> torch.Tensor:
    """(256, 2): for each byte b, the values of its high and low 4-bit codes, (nf4[b >> 4], nf4[b & 15])."""
    return torch.stack([nf4.repeat_interleave(16), nf4.repeat(16)], dim=1)


def dequantize(weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A torchao `NF4Tensor` as a dense tensor of `dtype` (default: its own nominal dtype).

    Eligibility: speed path `nf4_dequant` enabled; otherwise torchao's `get_original_weight`.
    """
    if not enabled("nf4_dequant"):
        dense = weight.get_original_weight()
        return dense if dtype is None else dense.to(dtype)
    scalers = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size)
    values = F.embedding(weight.quantized_data.to(torch.int32), pair_table(weight.nf4))  # (n/2, 2)
    dense = values.view(-1, weight.block_size).mul_(scalers[:, None]).view(weight.shape)
    return dense if dtype is None else dense.to(dtype)


def quantize(weight: torch.Tensor, block_size: int, scaler_block_size: int, nf4_type: type, reference) -> torch.Tensor:
    """`weight` as torchao's NF4Tensor (`nf4_type`), equal bit for bit to `reference(weight, ...)`.

    Eligibility: speed path `nf4_quant` enabled, a contiguous 1-D or 2-D floating weight whose size
    the blocks divide; otherwise `reference` (torchao's `to_nf4`) makes it.

    Args:
        weight: the dense weight (its dtype is the NF4Tensor's nominal dtype).
        block_size: values per absmax block (64).
        scaler_block_size: scalers per block of the double quantization.
        nf4_type: torchao's `NF4Tensor` class.
        reference: torchao's `to_nf4`.
    """
    numel = weight.numel()
    if (
        not enabled("nf4_quant")
        or weight.dim() > 2
        or not weight.is_floating_point()
        or not weight.is_contiguous()
        or numel == 0
        or numel % block_size
        or (numel // block_size) % scaler_block_size
        or block_size % 2
    ):
        return reference(weight, block_size, scaler_block_size)
    requires_grad = weight.requires_grad  # the NF4Tensor records the input's, as torchao's does
    with torch.no_grad():
        weight = weight.detach()
        levels = torch.tensor(NF4_LEVELS, device=weight.device, dtype=weight.dtype)
        n_blocks = numel // block_size
        blocks = weight.view(n_blocks, block_size)
        absmax = torch.empty(n_blocks, device=weight.device, dtype=weight.dtype)
        codes = torch.empty(numel // 2, device=weight.device, dtype=torch.uint8)
        half = block_size // 2
        for start in range(0, n_blocks, _CHUNK_BLOCKS):
            stop = min(start + _CHUNK_BLOCKS, n_blocks)
            chunk = blocks[start:stop]
            scale = torch.amax(chunk.abs(), dim=1)
            absmax[start:stop] = scale
            nearest = _nearest_codes((chunk / scale[:, None]).view(-1), levels)
            pairs = nearest.view(-1, 2)
            torch.bitwise_or(pairs[:, 0] << 4, pairs[:, 1], out=codes[start * half : stop * half])
        quantized_scalers, quantization_factor, scaler_mean = _double_quantized(absmax, scaler_block_size)
        meta = sys.modules[nf4_type.__module__].SubclassTensorArgs(
            weight.size(), weight.stride(), weight.storage_offset(), weight.dtype, weight.device, requires_grad
        )
        return nf4_type(
            meta,
            block_size,
            n_blocks,
            scaler_block_size,
            quantized_scalers,
            quantization_factor,
            scaler_mean,
            codes,
            nf4=levels,
        )


def _nearest_codes(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index of the level nearest each value (uint8), as torchao's argmin over |v − level|.

    The levels are sorted, so the nearest is one of the two around the value (the first level not
    below it, and the one before); on a tie the lower index wins, as argmin's first minimum. A NaN
    (an all-zero block scaled by its zero absmax) is code 0, as argmin gives it.
    """
    upper = torch.searchsorted(levels, values).clamp_(max=len(NF4_LEVELS) - 1)
    lower = (upper - 1).clamp_(min=0)
    d_upper = (values - levels[upper]).abs_()
    d_lower = (values - levels[lower]).abs_()
    nearest = torch.where(d_upper < d_lower, upper, lower)
    nearest.masked_fill_(values.isnan(), 0)
    return nearest.to(torch.uint8)


def _double_quantized(scalers: torch.Tensor, scaler_block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchao's `NF4Tensor.double_quantize_scalers` from the blocks' absmax (not from the weight):
    (int8 scalers, the per-scaler-block factor, the scalers' mean), the same expressions."""
    mean = scalers.mean()
    centred = scalers - mean
    n_scaler_blocks = centred.numel() // scaler_block_size
    scaler_blocks = centred.view(n_scaler_blocks, scaler_block_size)
    scaler_absmax = scaler_blocks.abs().max(dim=1).values
    scaler_absmax = scaler_absmax.unsqueeze(-1).expand(n_scaler_blocks, scaler_block_size)
    factor = 256 / (2 * scaler_absmax)
    quantized = (scaler_blocks * factor).round().clamp(-128, 127)
    return quantized.flatten().to(torch.int8), factor[:, 0].view(n_scaler_blocks).contiguous(), mean
