"""A LoRA variant is one module: a toy variant registered here — a learned per-output scale on the
branch, h = W0·x + b + g ⊙ s·B·A·x — trains, merges, saves and loads through the same layers as
DoRA, every speed path refuses it (none declares it), and the reference computes it by hand."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import lorakit
from lorakit import functional as LF
from lorakit.kernels import gated_mlp, merged_weight, rows
from lorakit.kernels.dropout import masked_applies
from lorakit.kernels.guards import computes
from lorakit.kernels.linear import fused_applies
from lorakit.variants import VARIANTS, Variant, register, unregister
from tests.conftest import randomize_adapters, tiny_llama

MARK = "toy-variant"  # the config field this test's variant is selected by
GATE = "lora_toy_gate"


class ToyGate(Variant):
    """h = base(x) + g ⊙ s·B·A·dropout(x), g (out,) learned, starting at 1 (plain LoRA at start)."""

    name = "toy_gate"
    title = "ToyGate"
    param_names = (GATE,)

    def selected(self, config) -> bool:
        return config.base_model_name_or_path == MARK

    def init(self, layer: Any, record) -> None:
        record.register_parameter(GATE, nn.Parameter(torch.ones(layer.out_features, dtype=record.lora_A.dtype)))

    def param_shape(self, layer: Any, record_r: int) -> dict[str, tuple[int, ...]]:
        return {GATE: (layer.out_features,)}

    def output(self, layer: Any, record, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + (getattr(record, GATE) * layer.branch(record, x)).to(result.dtype)

    def merged(self, layer: Any, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, None]:
        rec = layer.adapters[name]
        return weight + getattr(rec, GATE).detach()[:, None] * layer.delta_weight(name), None

    def unmerged(self, layer: Any, name: str, weight: torch.Tensor, state: None) -> torch.Tensor:
        rec = layer.adapters[name]
        return weight - getattr(rec, GATE).detach()[:, None] * layer.delta_weight(name)


@pytest.fixture
def toy():
    variant = register(ToyGate())
    yield variant
    unregister(variant.name)
    assert variant.name not in VARIANTS


def _config(**fields) -> lorakit.LoraConfig:
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    return lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, base_model_name_or_path=MARK, **fields)


def _randomize_gates(model: nn.Module, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(GATE):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def test_every_speed_path_refuses_the_toy_variant(toy, kernels_allowed):
    model = tiny_llama().train()
    lorakit.inject(model, _config(lora_dropout=0.1))
    layer = model.model.layers[0].self_attn.q_proj
    records = layer.pending()
    assert [rec.variant for rec in records] == [toy] and not computes(records[0])
    x = torch.randn(3, 70, 16)
    assert not fused_applies(records)
    assert not masked_applies(records)
    with torch.no_grad():
        model.eval()
        assert merged_weight.weight(layer.base_layer, x, records) is None
        with lorakit.adapter_per_row(model, ["default", "__base__", "default"]):
            assert rows.stacks(x, layer.adapters, layer.rows, layer.kernel_cache, owner=layer.base_layer) is None
    model.train()
    assert gated_mlp.plan(model.model.layers[0].mlp, x.requires_grad_()) is None
    # The same layer with a plain adapter is taken by the paths: it is the variant they refuse.
    plain = tiny_llama().train()
    lorakit.inject(plain, lorakit.LoraConfig(r=4, lora_dropout=0.1, target_modules=_config().target_modules))
    assert fused_applies(plain.model.layers[0].self_attn.q_proj.pending())
    assert gated_mlp.plan(plain.model.layers[0].mlp, x) is not None


def test_the_reference_computes_the_toy_variant_by_hand(toy, both_paths):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=3, target_modules=["0"], base_model_name_or_path=MARK))
    randomize_adapters(model)
    _randomize_gates(model)
    layer, x = model[0], torch.randn(64, 6, dtype=torch.float64)  # 64 rows: the merged-weight path's size
    rec = layer.adapters["default"]
    W0, b, A, B, g = layer.base_layer.weight, layer.base_layer.bias, rec.lora_A, rec.lora_B, getattr(rec, GATE)
    expected = x @ W0.T + b + g * (rec.scaling * (x @ A.T) @ B.T)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
        lorakit.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
        lorakit.unmerge(model)
        torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-14)
    assert LF.dropout_active(0.0) is False


def test_a_toy_variant_trains_the_same_on_both_paths_and_round_trips_through_files(toy, tmp_path):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    grads = {}
    for path in ("kernels", "reference"):
        model = tiny_llama().train()
        lorakit.inject(model, _config(lora_dropout=0.1))
        randomize_adapters(model)
        _randomize_gates(model)
        torch.manual_seed(3)  # the same dropout masks on both paths
        if path == "reference":
            with lorakit.kernels.disabled():
                model(ids, labels=ids).loss.backward()
        else:
            model(ids, labels=ids).loss.backward()
        grads[path] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(GATE) for n in grads["kernels"])
    assert grads["kernels"].keys() == grads["reference"].keys()
    for name, grad in grads["kernels"].items():
        torch.testing.assert_close(grad, grads["reference"][name], rtol=1e-5, atol=1e-6, msg=name)

    lorakit.save_adapter(model, tmp_path)
    again = lorakit.load_adapter(tiny_llama(), tmp_path)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    record = again.model.layers[1].mlp.down_proj.adapters["default"]
    assert record.variant is toy and torch.equal(
        getattr(record, GATE), getattr(model.model.layers[1].mlp.down_proj.adapters["default"], GATE)
    )
