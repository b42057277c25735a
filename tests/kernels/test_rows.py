"""The `stacked_rows` path (`kernels/rows.py`): both of its forms equal the reference grouping,
and its stacked copy of the adapters is rebuilt only when an adapter changes."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import kernels
from lorakit.kernels import rows
from lorakit.layers import BASE, LoraLayer
from tests.conftest import randomize_adapters, tiny_llama


def model_with_adapters():
    model = tiny_llama()
    for i, (targets, r) in enumerate([(["q_proj", "v_proj"], 4), (["q_proj", "o_proj"], 8), (["v_proj"], 2)]):
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), adapter_name=f"a{i}")
    randomize_adapters(model)
    return model.eval()


@pytest.mark.parametrize("tokens", [1, 5, rows.DENSE_TOKENS + 7], ids=["decode", "dense", "gathered"])
def test_each_form_equals_the_reference(tokens):
    model = model_with_adapters()
    names = ["a0", BASE, "a2", "a1", "a0"]
    ids = torch.randint(0, model.config.vocab_size, (len(names), tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), lorakit.adapter_per_row(model, names):
        fast = model(ids).logits
        with kernels.disabled():
            reference = model(ids).logits
    assert torch.allclose(fast, reference, atol=1e-5, rtol=1e-5)
    routed = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert routed and all(m.rows is None for m in routed)  # the routing is gone after the block
    form = "dense" if len(names) * tokens <= rows.DENSE_TOKENS else "gathered"
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), lorakit.adapter_per_row(model, names):
        x = torch.randn(len(names), tokens, layer.in_features)
        assert rows.stacks(x, layer.adapters, layer.rows, layer.kernel_cache, owner=layer.base_layer)[0] == form


def test_the_stacked_copy_is_kept_across_blocks_and_rebuilt_when_an_adapter_changes():
    model = model_with_adapters()
    layer = model.model.layers[0].self_attn.q_proj
    ids = torch.randint(0, model.config.vocab_size, (2, 3))
    with torch.no_grad():
        with lorakit.adapter_per_row(model, ["a0", "a1"]):
            model(ids)
        first = layer.kernel_cache["stacked_rows"]
        with lorakit.adapter_per_row(model, ["a1", BASE]):  # another mix of the same adapters
            model(ids)
        assert layer.kernel_cache["stacked_rows"] is first
        layer.adapters["a1"].lora_B.add_(1.0)  # an in-place change bumps the version
        with lorakit.adapter_per_row(model, ["a1", BASE]):
            after = model(ids).logits
            with kernels.disabled():
                reference = model(ids).logits
    assert layer.kernel_cache["stacked_rows"] is not first
    assert torch.allclose(after, reference, atol=1e-5, rtol=1e-5)
