"""The NF4 dequantization kernel: torchao's numbers, bit for bit, for every block layout."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.kernels import nf4
from lorakit.quantization import _nf4_module, nf4_scaler_block


@pytest.mark.parametrize("shape", [(16, 16), (192, 576), (576, 576), (256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_torchao(shape, dtype):
    _, to_nf4 = _nf4_module()
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])).to(dtype)
    quantized = to_nf4(weight, 64, nf4_scaler_block(weight.numel()))
    reference = quantized.get_original_weight()
    fast = nf4.dequantize(quantized)
    assert fast.dtype == reference.dtype == dtype and fast.shape == reference.shape
    assert torch.equal(fast, reference)
    assert torch.equal(nf4.dequantize(quantized, torch.float64), reference.double())
    with lorakit.kernels.disabled("nf4_dequant"):
        assert torch.equal(nf4.dequantize(quantized), reference)


def test_the_pair_table_holds_high_then_low_code():
    table = nf4.pair_table(torch.arange(16.0))
    assert table.shape == (256, 2)
    assert table[0x3A].tolist() == [3.0, 10.0] and table[0xF0].tolist() == [15.0, 0.0]


def _same_nf4(a, b) -> bool:
    fields = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
    layout = ("block_size", "n_blocks", "scaler_block_size")
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.requires_grad == b.requires_grad
        and all(getattr(a, k) == getattr(b, k) for k in layout)
        and all(torch.equal(getattr(a, k), getattr(b, k)) for k in fields)
        and all(getattr(a, k).dtype == getattr(b, k).dtype for k in fields)
    )


@pytest.mark.parametrize("shape", [(16, 16), (192, 576), (1536, 576), (576, 1536), (4096 * 64 + 512 * 64,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_equals_torchao(shape, dtype):
    """Codes, scalers, factors and mean equal torchao's `to_nf4` bit for bit, across chunk boundaries
    (the last shape spans two chunks of 4,096 blocks) and with all-zero blocks (0/0 scaled values)."""
    nf4_type, to_nf4 = _nf4_module()
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 0.02).to(dtype)
    flat = weight.view(-1)
    flat[64:128] = 0  # one whole block of zeros
    flat[200:230] = 0
    size = nf4_scaler_block(weight.numel())
    fast = nf4.quantize(weight, 64, size, nf4_type, to_nf4)
    assert type(fast) is nf4_type
    assert _same_nf4(fast, to_nf4(weight, 64, size))
    assert torch.equal(nf4.dequantize(fast), to_nf4(weight, 64, size).get_original_weight())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_breaks_ties_as_torchao(dtype):
    """Values exactly on, just above and just below every midpoint between two levels, and on the
    levels themselves: the nearest level is the one torchao's first-minimum argmin picks."""
    nf4_type, to_nf4 = _nf4_module()
    levels = torch.tensor(nf4.NF4_LEVELS)
    mids = (levels[1:] + levels[:-1]) / 2
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    values = torch.cat([mids, -mids, levels, torch.nextafter(mids, up), torch.nextafter(mids, down)]).to(dtype)
    # Each 64-block keeps an exact ±1 so that scaling by the block's absmax leaves the values as they are.
    blocks = [torch.cat([torch.ones(1, dtype=dtype), values[i : i + 63]]) for i in range(0, values.numel(), 63)]
    blocks[-1] = torch.cat([blocks[-1], torch.zeros(64 - blocks[-1].numel(), dtype=dtype)])
    weight = torch.cat(blocks).repeat(4)
    size = nf4_scaler_block(weight.numel())
    assert _same_nf4(nf4.quantize(weight, 64, size, nf4_type, to_nf4), to_nf4(weight, 64, size))


def test_quantize_path_off_is_torchao_itself():
    nf4_type, to_nf4 = _nf4_module()
    calls = []

    def reference(*args):
        calls.append(args)
        return to_nf4(*args)

    weight = torch.randn(64, 64)
    nf4.quantize(weight, 64, 64, nf4_type, reference)
    assert calls == []
    with lorakit.kernels.disabled("nf4_quant"):
        nf4.quantize(weight, 64, 64, nf4_type, reference)
    assert len(calls) == 1
    nf4.quantize(weight.t(), 64, 64, nf4_type, reference)  # not contiguous: torchao's own checks apply
    assert len(calls) == 2
    trained = weight.clone().requires_grad_()  # the input's requires_grad is recorded, as torchao records it
    assert _same_nf4(nf4.quantize(trained, 64, 64, nf4_type, reference), to_nf4(trained, 64, 64))
    assert len(calls) == 2
