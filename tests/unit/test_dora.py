"""DoRA (Liu et al., 2024): h = m/‖W0 + s·B·A‖ ⊙ (W0 + s·B·A)·x + b, the norm a constant for autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import quantization as Q
from lorakit.errors import ConfigError, UnsupportedLayerError
from tests.conftest import (
    assert_same_state,
    clone,
    conv_net,
    each_adapter_alone,
    nf4_llama,
    randomize_adapters,
    state_snapshot,
    tiny_llama,
)

pytestmark = pytest.mark.usefixtures("both_paths")  # kernels on and disabled: the same numbers

DORA = dict(r=2, lora_alpha=3, use_dora=True)


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _ints(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=g).double()


def _set(record, A, B, m) -> None:
    with torch.no_grad():
        record.lora_A.copy_(A)
        record.lora_B.copy_(B)
        record.lora_magnitude_vector.copy_(m)


def test_linear_matches_the_formula_by_hand():
    base = nn.Linear(5, 4).double()
    model = lorakit.inject(Holder(base), lorakit.LoraConfig(target_modules=["layer"], **DORA))
    rec = model.layer.adapters["default"]
    W0, b = base.weight.detach().clone(), base.bias.detach().clone()
    assert torch.allclose(rec.lora_magnitude_vector, W0.norm(dim=1))  # m starts at ‖W0‖: a no-op
    A, B, m = _ints(2, 5, seed=1), _ints(4, 2, seed=2), _ints(4, seed=3).abs() + 1
    _set(rec, A, B, m)
    x = _ints(3, 5, seed=4)
    s = 3 / 2
    V = W0 + s * (B @ A)  # the direction, (out, in)
    expected = x @ (V * (m / V.norm(dim=1))[:, None]).T + b
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    lorakit.merge(model)
    torch.testing.assert_close(base.weight.detach(), V * (m / V.norm(dim=1))[:, None], rtol=1e-12, atol=1e-12)
    lorakit.unmerge(model)
    torch.testing.assert_close(base.weight.detach(), W0, rtol=1e-12, atol=1e-12)


def test_conv1d_weight_is_in_by_out():
    base = Conv1D(4, 5).double()  # weight (in=5, out=4)
    nn.init.normal_(base.weight)
    model = lorakit.inject(Holder(base), lorakit.LoraConfig(target_modules=["layer"], **DORA))
    rec = model.layer.adapters["default"]
    W0 = base.weight.detach().T.clone()  # (out, in)
    A, B, m = _ints(2, 5, seed=5), _ints(4, 2, seed=6), _ints(4, seed=7).abs() + 1
    _set(rec, A, B, m)
    V = W0 + 1.5 * (B @ A)
    x = _ints(3, 5, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), x @ (V * (m / V.norm(dim=1))[:, None]).T + base.bias, rtol=1e-12, atol=1e-12
        )


def test_gradients_treat_the_norm_as_a_constant():
    """∂/∂m, ∂/∂A, ∂/∂B, ∂/∂x of the formula with ‖W0 + s·B·A‖ detached (the paper's §4.3)."""
    base = nn.Linear(5, 4).double()
    model = lorakit.inject(Holder(base), lorakit.LoraConfig(target_modules=["layer"], **DORA)).train()
    rec = model.layer.adapters["default"]
    A, B, m = _ints(2, 5, seed=1), _ints(4, 2, seed=2), _ints(4, seed=3).abs() + 1
    _set(rec, A, B, m)
    x = _ints(3, 5, seed=9).requires_grad_(True)
    model(x).square().sum().backward()
    theirs = [t.detach().clone().requires_grad_(True) for t in (A, B, m)]
    x2 = x.detach().clone().requires_grad_(True)
    W0, b = base.weight.detach(), base.bias.detach()
    V = W0 + 1.5 * (theirs[1] @ theirs[0])
    out = x2 @ (V * (theirs[2] / V.detach().norm(dim=1))[:, None]).T + b
    out.square().sum().backward()
    for ours, ref in zip((rec.lora_A, rec.lora_B, rec.lora_magnitude_vector, x), (*theirs, x2), strict=True):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-10)
    assert base.weight.grad is None


def test_a_per_row_batch_with_dora_rows_equals_each_adapter_alone(ids):
    """PEFT refuses `adapter_names` with DoRA; lorakit routes DoRA and LoRA rows in one batch."""
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj", "v_proj"], **DORA), "d")
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["v_proj", "o_proj"]), "l")
    randomize_adapters(model)
    model.eval()
    names = ["d", "__base__", "l", "d"]
    alone = each_adapter_alone(model, ids, names)
    with torch.no_grad(), lorakit.adapter_per_row(model, names):
        mixed = model(ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=0)


def test_unmerge_is_exact_after_mode_switches_and_a_save_and_reload(tmp_path, ids):
    """PEFT keeps the merge's norms in a cache that `train()` clears; lorakit keeps them with the adapter."""
    base = tiny_llama()
    model = lorakit.inject(clone(base), lorakit.LoraConfig(target_modules="all-linear", **DORA))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    model = lorakit.load_adapter(clone(base), tmp_path).eval()  # a reloaded adapter, merged
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    with torch.no_grad():
        expected = model(ids).logits
        lorakit.merge(model)
        model.train()
        model.eval()
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
        lorakit.unmerge(model)
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        if name in before:
            torch.testing.assert_close(p.detach(), before[name], atol=1e-6, rtol=0)


def test_qdora_on_an_nf4_base_equals_dora_on_the_dequantized_weights(tmp_path):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    quantized = Q.quantize(nf4_llama(), "nf4")
    twin = Q.dequantize(clone(quantized))  # the weights the NF4 model computes with, dense
    config = lorakit.LoraConfig(target_modules=["q_proj", "down_proj"], **DORA)
    torch.manual_seed(0)
    lorakit.inject(quantized, config)
    randomize_adapters(quantized, scale=0.05)
    lorakit.save_adapter(quantized, tmp_path)
    lorakit.load_adapter(twin, tmp_path)
    quantized.eval(), twin.eval()
    with torch.no_grad():
        expected = twin(ids).logits
        torch.testing.assert_close(quantized(ids).logits, expected, atol=1e-5, rtol=0)
        lorakit.merge(quantized)
        torch.testing.assert_close(quantized(ids).logits, expected, atol=1e-4, rtol=0)
        lorakit.unmerge(quantized)
        torch.testing.assert_close(quantized(ids).logits, expected, atol=1e-5, rtol=0)
    quantized.train()(ids).logits.square().mean().backward()
    magnitudes = [p for n, p in quantized.named_parameters() if n.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 4  # q_proj and down_proj in two layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in magnitudes)


def test_dora_on_a_layer_type_without_it_is_refused_and_nothing_changes():
    model = conv_net()
    before = state_snapshot(model)
    with pytest.raises(UnsupportedLayerError, match=r"use_dora supports linear layers.*'emb' is a Embedding"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["lin0", "emb"], **DORA))
    assert_same_state(model, before)
    with pytest.raises(ConfigError, match="use_dora cannot be combined with fused_slices"):
        lorakit.LoraConfig(use_dora=True, fused_slices={"c_attn": [True, False, True]})
