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
