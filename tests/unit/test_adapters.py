"""Many adapters per model: activation, deletion, combination, trainable copies, biases, targeting."""

from __future__ import annotations

import peft
import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict

import lorakit
from lorakit.layers import LoraLayer, SavedModule
from lorakit.state import lora_layers
from tests.conftest import TOL, clone, randomize_adapters, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("both_paths")  # kernels on and disabled: the same numbers

ATOL = TOL[torch.float32]


def _two_adapters():
    base = tiny_llama()
    model = lorakit.inject(clone(base), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["v_proj", "o_proj"]), "b")
    randomize_adapters(model)
    return base, model.eval()


def test_second_adapter_is_added_inactive_and_frozen():
    _, model = _two_adapters()
    assert lorakit.active_adapters(model) == ("a",)
    v = model.model.layers[0].self_attn.v_proj
    assert v.adapters["a"].lora_A.requires_grad and not v.adapters["b"].lora_A.requires_grad
    lorakit.set_adapter(model, "b")
    assert not v.adapters["a"].lora_A.requires_grad and v.adapters["b"].lora_A.requires_grad


def test_active_adapters_add_up(ids):
    base, model = _two_adapters()
    with torch.no_grad():
        b0 = base(ids).logits
        lorakit.set_adapter(model, "a")
        only_a = model(ids).logits
        lorakit.set_adapter(model, "b")
        only_b = model(ids).logits
        lorakit.set_adapter(model, ["a", "b"])
        both = model(ids).logits
    assert not torch.allclose(only_a, b0, atol=1e-3) and not torch.allclose(only_b, b0, atol=1e-3)
    # per layer the deltas add; check on one layer directly
    v = model.model.layers[0].self_attn.v_proj
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = v.base_layer(x) + v.branch(v.adapters["a"], x) + v.branch(v.adapters["b"], x)
        torch.testing.assert_close(v(x), expected, atol=ATOL, rtol=0)
    # and the whole model with both active is the base with W0 + ΔW_a + ΔW_b in every adapted layer
    summed = clone(base)
    with torch.no_grad():
        for path, layer in lora_layers(model):
            for name in ("a", "b"):
                if name in layer.adapters:
                    summed.get_submodule(path).weight.add_(layer.delta_weight(name))
        torch.testing.assert_close(both, summed(ids).logits, atol=ATOL, rtol=0)


def test_merge_named_adapters_then_delete_rules(ids):
    _, model = _two_adapters()
    lorakit.set_adapter(model, ["a", "b"])
    with torch.no_grad():
        out = model(ids).logits
        lorakit.merge(model, ["a"])
        torch.testing.assert_close(model(ids).logits, out, atol=ATOL, rtol=0)
    with pytest.raises(lorakit.LorakitError, match="merged"):
        lorakit.delete_adapter(model, "a")
    lorakit.unmerge(model)
    lorakit.delete_adapter(model, "a")
    assert lorakit.list_adapters(model) == ["b"]
    assert lorakit.active_adapters(model) == ("b",)
    assert not any("a" in layer.adapters for _, layer in lora_layers(model))


def test_delete_last_adapter_restores_base_outputs(ids):
    base = tiny_llama()
    model = lorakit.inject(clone(base), lorakit.LoraConfig(target_modules=["q_proj"]))
    randomize_adapters(model)
    lorakit.delete_adapter(model, "default")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)
    assert lorakit.list_adapters(model) == []
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["v_proj"]), "again")
    assert lorakit.active_adapters(model) == ("again",)


@pytest.mark.parametrize("how", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(how, ids):
    base = tiny_llama()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = lorakit.inject(clone(base), lorakit.LoraConfig(**kw), "x")
    lorakit.inject(model, lorakit.LoraConfig(**kw), "y")
    randomize_adapters(model)
    pm = get_peft_model(clone(base), peft.LoraConfig(**kw), adapter_name="x")
    pm.add_adapter("y", peft.LoraConfig(**kw))
    for name in ("x", "y"):
        state = {
            f"base_model.model.{p}.{k}": t
            for p, layer in lora_layers(model)
            for k, t in layer.peft_tensors(name).items()
        }
        set_peft_model_state_dict(pm, state, adapter_name=name)
    lorakit.add_weighted_adapter(model, ["x", "y"], [0.7, -0.4], "mix", combination_type=how)
    pm.add_weighted_adapter(["x", "y"], [0.7, -0.4], "mix", combination_type=how)
    lorakit.set_adapter(model, "mix")
    pm.set_adapter("mix")
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pm(input_ids=ids).logits, atol=1e-4, rtol=0)
    if how == "cat":  # exactly ΔW = Σ wᵢ ΔWᵢ
        q = model.model.layers[0].self_attn.q_proj
        expected = 0.7 * q.delta_weight("x") - 0.4 * q.delta_weight("y")
        torch.testing.assert_close(q.delta_weight("mix"), expected, atol=1e-6, rtol=0)


def test_add_weighted_adapter_errors():
    _, model = _two_adapters()
    with pytest.raises(lorakit.ConfigError, match="equal ranks"):
        lorakit.add_weighted_adapter(model, ["a", "b"], [1, 1], "m", combination_type="linear")
    with pytest.raises(lorakit.ConfigError, match="one weight per adapter"):
        lorakit.add_weighted_adapter(model, ["a", "b"], [1], "m")
    with pytest.raises(lorakit.ConfigError, match="combination_type"):
        lorakit.add_weighted_adapter(model, ["a"], [1], "m", combination_type="ties")
    assert lorakit.list_adapters(model) == ["a", "b"]


def test_modules_to_save_trains_a_copy_per_adapter(tmp_path, ids):
    base = tiny_llama()
    model = lorakit.inject(clone(base), lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, SavedModule)
    assert model.lm_head.adapters["default"].weight.requires_grad
    assert not model.lm_head.original_module.weight.requires_grad
    model(ids).logits.sum().backward()
    assert model.lm_head.adapters["default"].weight.grad is not None
    with torch.no_grad():
        model.lm_head.adapters["default"].weight.mul_(2)
        doubled = model(ids).logits
        with lorakit.disable_adapters(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)
    plain = lorakit.merge_and_unload(model)
    assert type(plain.lm_head) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, doubled, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_train_and_save_biases(bias, tmp_path, ids):
    base = tiny_gpt2()
    model = lorakit.inject(clone(base), lorakit.LoraConfig(target_modules=["c_attn"], bias=bias))
    attn = model.transformer.h[0].attn
    assert attn.c_attn.base_layer.bias.requires_grad
    assert attn.c_proj.bias.requires_grad == (bias == "all")
    assert not attn.c_attn.base_layer.weight.requires_grad
    with torch.no_grad():
        attn.c_attn.base_layer.bias.add_(0.25)
        if bias == "all":
            attn.c_proj.bias.add_(0.25)
        out = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(clone(base), tmp_path).eval()
    ours = lorakit.load_adapter(clone(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, out, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(ids).logits, out, atol=ATOL, rtol=0)


def test_is_trainable_flag_on_load(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    frozen = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert lorakit.trainable_parameters(frozen)[0] == 0
    live = lorakit.load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    trainable, total = lorakit.trainable_parameters(live)
    assert trainable == 2 * (8 * 16 + 16 * 8) and total > trainable


def test_default_targets_follow_the_paper():
    llama = lorakit.inject(tiny_llama(), lorakit.LoraConfig())
    assert sorted({p.rsplit(".", 1)[1] for p, _ in lora_layers(llama)}) == ["q_proj", "v_proj"]
    gpt2 = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2))
    layers = dict(lora_layers(gpt2))
    assert list(layers) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert layers["transformer.h.0.attn.c_attn"].adapters["default"].slices == (0, 2)


def test_all_linear_skips_output_head_and_respects_filters():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"]))
    leaves = sorted({p.rsplit(".", 1)[1] for p, _ in lora_layers(model)})
    assert leaves == ["down_proj", "gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert not isinstance(model.lm_head, LoraLayer)
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], layers_to_transform=1))
    assert [p for p, _ in lora_layers(model)] == ["model.layers.1.self_attn.q_proj"]


def test_trainable_fraction_counts_only_lora():
    model = tiny_llama()
    total0 = sum(p.numel() for p in model.parameters())
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = lorakit.trainable_parameters(model)
    # q: 16→16, v: 16→8 (2 kv heads × 4), r = 4, two layers
    assert trainable == 2 * (4 * 16 + 16 * 4 + 4 * 16 + 8 * 4)
    assert total == total0 + trainable


def test_mixed_batch_batched_inference_path_equals_grouped_training_path():
    """No grad: one bmm over all rows; with grad: rows grouped per adapter. Same numbers, grads flow."""
    _, model = _two_adapters()
    ids = torch.randint(0, 64, (5, 7), generator=torch.Generator().manual_seed(1))
    names = ["b", "a", "__base__", "a", "b"]
    with lorakit.adapter_per_row(model, names):
        with torch.no_grad():
            batched = model(ids).logits
            again = model(ids).logits  # cached stacks reused
        lorakit.set_adapter(model, ["a", "b"])  # both trainable
        grouped = model(ids).logits
        grouped.square().sum().backward()
    torch.testing.assert_close(batched, grouped, atol=ATOL, rtol=0)
    assert torch.equal(batched, again)
    v = model.model.layers[0].self_attn.v_proj
    assert v.adapters["a"].lora_B.grad.abs().sum() > 0 and v.adapters["b"].lora_B.grad.abs().sum() > 0
    with torch.no_grad(), lorakit.adapter_per_row(model, names):
        model(ids)
        v.adapters["b"].lora_B.add_(1.0)  # a change inside the block invalidates the cached stacks
        changed = model(ids).logits
    assert not torch.allclose(changed[0], batched[0]) and torch.allclose(changed[2], batched[2], atol=ATOL)


def test_disabling_adapters_inside_a_per_row_block_gives_the_base_model():
    """`disable_adapters` wins over per-row routing, with and without gradients."""
    base, model = _two_adapters()
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = base(ids).logits
    with lorakit.adapter_per_row(model, ["a", "b", "__base__"]), lorakit.disable_adapters(model):
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(model(ids).logits, expected, atol=ATOL, rtol=0)
