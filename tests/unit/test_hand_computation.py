"""Each layer type against the paper's formula h = W0·x + (α/r)·B·A·x, written out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.layers import LoraConv2d, LoraEmbedding, LoraLinear

pytestmark = pytest.mark.usefixtures("both_paths")  # kernels on and disabled: the same numbers


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _ints(*shape, lo=-3, hi=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).double()


def _set(record, A, B):
    with torch.no_grad():
        record.lora_A.data = A.clone()
        record.lora_B.data = B.clone()


def test_linear_matches_formula():
    lin = nn.Linear(3, 2).double()
    with torch.no_grad():
        lin.weight.copy_(_ints(2, 3, seed=1))
        lin.bias.copy_(_ints(2, seed=2))
    model = lorakit.inject(Holder(lin), lorakit.LoraConfig(r=2, lora_alpha=6, target_modules=["layer"]))
    A, B = _ints(2, 3, seed=3), _ints(2, 2, seed=4)
    _set(model.layer.adapters["default"], A, B)
    x = _ints(5, 3, seed=5)
    W0, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    expected = torch.empty(5, 2, dtype=torch.float64)
    for i in range(5):
        for o in range(2):
            base = sum(W0[o, k] * x[i, k] for k in range(3)) + b[o]
            low = sum(B[o, j] * sum(A[j, k] * x[i, k] for k in range(3)) for j in range(2))
            expected[i, o] = base + (6 / 2) * low
    assert isinstance(model.layer, LoraLinear)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    lorakit.merge(model)
    torch.testing.assert_close(lin.weight, W0 + 3 * (B @ A), atol=1e-12, rtol=0)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    lin = nn.Linear(3, 2, bias=False).double()
    model = lorakit.inject(
        Holder(lin), lorakit.LoraConfig(r=4, lora_alpha=6, target_modules=["layer"], use_rslora=True)
    )
    A, B = _ints(4, 3, seed=3), _ints(2, 4, seed=4)
    _set(model.layer.adapters["default"], A, B)
    x = _ints(2, 3, seed=6)
    torch.testing.assert_close(model(x), x @ lin.weight.T + (6 / 2) * (x @ A.T @ B.T), atol=1e-12, rtol=0)


def test_conv1d_weight_is_in_by_out():
    conv = Conv1D(2, 3).double()  # nf=2 outputs, nx=3 inputs; weight (3, 2)
    with torch.no_grad():
        conv.weight.copy_(_ints(3, 2, seed=1))
        conv.bias.copy_(_ints(2, seed=2))
    model = lorakit.inject(Holder(conv), lorakit.LoraConfig(r=1, lora_alpha=2, target_modules=["layer"]))
    A, B = _ints(1, 3, seed=3), _ints(2, 1, seed=4)
    _set(model.layer.adapters["default"], A, B)
    x = _ints(4, 3, seed=5)
    expected = x @ conv.weight + conv.bias + 2 * (x @ A.T) @ B.T
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    W0 = conv.weight.detach().clone()
    lorakit.merge(model)
    torch.testing.assert_close(conv.weight, W0 + 2 * (B @ A).T, atol=1e-12, rtol=0)


def test_embedding_looks_up_columns_of_A():
    emb = nn.Embedding(5, 3).double()
    with torch.no_grad():
        emb.weight.copy_(_ints(5, 3, seed=1))
    model = lorakit.inject(Holder(emb), lorakit.LoraConfig(r=2, lora_alpha=2, target_modules=["layer"]))
    assert isinstance(model.layer, LoraEmbedding)
    A, B = _ints(2, 5, seed=3), _ints(3, 2, seed=4)  # A: (r, num_embeddings), B: (dim, r)
    _set(model.layer.adapters["default"], A, B)
    ids = torch.tensor([[0, 4, 2], [1, 1, 3]])
    expected = torch.empty(2, 3, 3, dtype=torch.float64)
    for i in range(2):
        for t in range(3):
            tok = ids[i, t]
            expected[i, t] = emb.weight[tok] + 1.0 * (B @ A[:, tok])
    torch.testing.assert_close(model(ids), expected, atol=0, rtol=0)


def test_conv2d_via_im2col():
    conv = nn.Conv2d(2, 3, kernel_size=2, stride=1, padding=0).double()
    model = lorakit.inject(Holder(conv), lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["layer"]))
    assert isinstance(model.layer, LoraConv2d)
    A, B = _ints(2, 2, 2, 2, seed=3), _ints(3, 2, 1, 1, seed=4)
    _set(model.layer.adapters["default"], A, B)
    x = _ints(1, 2, 3, 3, seed=5)
    cols = torch.nn.functional.unfold(x, kernel_size=2)  # (1, in·kh·kw, L)
    W0 = conv.weight.detach().flatten(1)  # (out, in·kh·kw)
    delta = B.flatten(1) @ A.flatten(1)  # (out, r)·(r, in·kh·kw)
    expected = (W0 + (4 / 2) * delta) @ cols[0] + conv.bias.detach()[:, None]  # (out, L)
    torch.testing.assert_close(model(x), expected.view(1, 3, 2, 2), atol=1e-10, rtol=0)


def test_fused_slices_adapt_only_enabled_parts():
    lin = nn.Linear(2, 6, bias=False).double()  # three slices of 2: q, k, v
    cfg = lorakit.LoraConfig(r=1, lora_alpha=1, target_modules=["layer"], fused_slices={"layer": [True, False, True]})
    model = lorakit.inject(Holder(lin), cfg)
    rec = model.layer.adapters["default"]
    assert rec.lora_A.shape == (2, 2) and rec.lora_B.shape == (4, 1)
    A, B = _ints(2, 2, seed=3), _ints(4, 1, seed=4)
    _set(rec, A, B)
    x = _ints(3, 2, seed=5)
    q = x @ A[0:1].T @ B[0:2].T  # slice 0 uses A_0, B_0
    v = x @ A[1:2].T @ B[2:4].T  # slice 2 uses A_1, B_1
    expected = x @ lin.weight.T + torch.cat([q, torch.zeros(3, 2, dtype=torch.float64), v], dim=1)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    W0 = lin.weight.detach().clone()
    lorakit.merge(model)
    dW = torch.zeros(6, 2, dtype=torch.float64)
    dW[0:2] = B[0:2] @ A[0:1]
    dW[4:6] = B[2:4] @ A[1:2]
    torch.testing.assert_close(lin.weight, W0 + dW, atol=1e-12, rtol=0)


def test_fresh_adapter_init_kaiming_A_zero_B():
    lin = nn.Linear(64, 8)
    model = lorakit.inject(Holder(lin), lorakit.LoraConfig(r=4, target_modules=["layer"]))
    rec = model.layer.adapters["default"]
    assert torch.count_nonzero(rec.lora_B) == 0
    bound = 1 / 64**0.5  # kaiming_uniform(a=√5): bound = √(6/((1+5)·fan_in)) = 1/√fan_in
    assert rec.lora_A.abs().max() <= bound and rec.lora_A.abs().max() > bound / 2
    gauss = lorakit.inject(
        Holder(nn.Linear(64, 8)),
        lorakit.LoraConfig(r=4, target_modules=["layer"], init_lora_weights="gaussian"),
    )
    std = gauss.layer.adapters["default"].lora_A.std().item()
    assert 0.15 < std < 0.35  # N(0, 1/r) with r = 4


def test_pissa_keeps_output_and_saves_relative_to_original(tmp_path):
    lin = nn.Linear(6, 5).double()
    x = _ints(3, 6, seed=7)
    before = lin(x).detach()
    W0 = lin.weight.detach().clone()
    model = lorakit.inject(
        Holder(lin),
        lorakit.LoraConfig(r=2, lora_alpha=2, target_modules=["layer"], init_lora_weights="pissa"),
    )
    torch.testing.assert_close(model(x), before, atol=1e-10, rtol=0)
    assert not torch.allclose(lin.weight, W0)  # W0 replaced by the residual
    rec = model.layer.adapters["default"]
    s = rec.scaling
    U, S, Vh = torch.linalg.svd(W0.float(), full_matrices=False)
    top2 = (U[:, :2] * S[:2]) @ Vh[:2]
    torch.testing.assert_close((s * rec.lora_B @ rec.lora_A).float(), top2, atol=1e-5, rtol=0)
    with torch.no_grad():
        rec.lora_B.add_(0.1)
    tuned = model(x).detach()
    lorakit.save_adapter(model, tmp_path)
    fresh = nn.Linear(6, 5).double()
    with torch.no_grad():
        fresh.weight.copy_(W0)
        fresh.bias.copy_(lin.bias)
    other = lorakit.load_adapter(Holder(fresh), tmp_path)
    torch.testing.assert_close(other(x).double(), tuned, atol=1e-5, rtol=0)
