"""The fused gated MLP: same values, gradients and dropout masks as the three layers, less saved."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import lorakit
from lorakit.kernels import gated_mlp
from tests.conftest import clone, randomize_adapters, tiny_gpt2, tiny_llama


def _pair(config: lorakit.LoraConfig, dtype=torch.float64):
    """(fused, unfused) copies of one injected tiny LLaMA with random (non-zero) adapters."""
    model = lorakit.inject(tiny_llama().to(dtype), config)
    randomize_adapters(model)
    twin = clone(model)
    gated_mlp.uninstall(twin)
    return model.train(), twin.train()


def _step(model, ids, seed=7):
    torch.manual_seed(seed)  # the same RNG state: the same dropout masks
    loss = model(ids).logits.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _mlp_nodes(model, ids) -> set[str]:
    names = set()
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda m, i, o: names.add(type(o.grad_fn).__name__))
    model(ids)
    for layer in model.model.layers:
        layer.mlp._forward_hooks.clear()
    return names


IDS = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "targets, dropout, share",
    [
        ("all-linear", 0.0, True),
        ("all-linear", 0.1, True),
        ("all-linear", 0.1, False),
        (["down_proj"], 0.2, True),
        (["gate_proj", "q_proj"], 0.1, True),
        (["up_proj", "down_proj"], 0.0, True),
    ],
)
def test_fused_equals_the_three_layers(targets, dropout, share):
    """Loss and every A/B gradient equal the unfused layers' with the same seed (fp64)."""
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, share_dropout_mask=share
    )
    fused, plain = _pair(config)
    assert _mlp_nodes(fused, IDS) == {"GatedMlpFunctionBackward"}
    assert "GatedMlpFunctionBackward" not in _mlp_nodes(plain, IDS)
    loss_f, grads_f = _step(fused, IDS)
    loss_p, grads_p = _step(plain, IDS)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-12, atol=0)
    assert grads_f.keys() == grads_p.keys() and grads_f
    for name, g in grads_f.items():
        torch.testing.assert_close(g, grads_p[name], rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "silu"])
def test_activations_other_than_silu_go_through_autograd(act):
    """SiLU's derivative is taken directly; any other activation (Gemma's tanh GELU) through
    autograd: both equal the three layers (fp64, dropout on)."""
    from transformers.activations import ACT2FN

    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
    fused, plain = _pair(config)
    for model in (fused, plain):
        for layer in model.model.layers:
            layer.mlp.act_fn = ACT2FN[act]
    assert gated_mlp.plan(fused.model.layers[0].mlp, torch.zeros(1, 16, dtype=torch.float64)) is not None
    assert gated_mlp._is_silu(ACT2FN[act]) == (act == "silu")
    loss_f, grads_f = _step(fused, IDS)
    loss_p, grads_p = _step(plain, IDS)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-12, atol=0)
    for name, g in grads_f.items():
        torch.testing.assert_close(g, grads_p[name], rtol=1e-10, atol=1e-14, msg=name)


def test_float32_and_input_gradient():
    """fp32: A/B gradients and the gradient w.r.t. the MLP input within 1e-6 relative."""
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
    fused, plain = _pair(config, torch.float32)
    x = torch.randn(2, 5, 16, requires_grad=True)
    outs = []
    for model in (fused, plain):
        torch.manual_seed(3)
        mlp = model.model.layers[1].mlp
        y = mlp(x)
        leaves = [x, *(p for p in mlp.parameters() if p.requires_grad)]
        outs.append((y, *torch.autograd.grad(y.square().sum(), leaves)))
    for a, b in zip(outs[0], outs[1], strict=True):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6


def test_half_precision_base_with_float32_adapters():
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
    fused, plain = _pair(config, torch.bfloat16)
    assert fused.model.layers[0].mlp.down_proj.adapters["default"].lora_A.dtype == torch.float32
    loss_f, grads_f = _step(fused, IDS)
    loss_p, grads_p = _step(plain, IDS)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-2, atol=0)
    for name, g in grads_f.items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, grads_p[name], rtol=2e-2, atol=1e-3, msg=name)


def _saved_bytes(model, ids) -> int:
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(storages.values())


def test_mlp_saves_less_than_the_frozen_mlp():
    """LoRA on gate, up and down (dropout on): the fused MLP keeps less than even the frozen MLP.

    Widths in SmolLM2's proportion (hidden 576, intermediate 1536): 24 and 64.
    """
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=24, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    frozen = LlamaMLP(config).requires_grad_(False)
    x = torch.randn(4, 32, 24, requires_grad=True)
    floor = _saved_bytes(frozen, x)
    model = torch.nn.Sequential()
    model.mlp = clone(frozen)
    lora = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.1)
    lorakit.inject(model, lora).train()
    fused = _saved_bytes(model.mlp, x)
    with lorakit.kernels.disabled("gated_mlp"):
        plain = _saved_bytes(model.mlp, x)
    assert fused < floor < plain, (fused, floor, plain)


def test_falls_back_to_the_module_forward_where_it_cannot_fuse():
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
    model = lorakit.inject(tiny_llama(), config).train()
    assert _mlp_nodes(model, IDS) == {"GatedMlpFunctionBackward"}
    with torch.no_grad():
        assert _mlp_nodes(model, IDS) == {"NoneType"}
    model.eval()
    with lorakit.disable_adapters(model):
        assert _mlp_nodes(model, IDS) == {"NoneType"}
    model.train()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["down_proj"]), "second")
    lorakit.set_adapter(model, ["default", "second"])  # two unmerged adapters on down_proj
    assert "GatedMlpFunctionBackward" not in _mlp_nodes(model, IDS)
    lorakit.set_adapter(model, "default")
    hook = model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: None)
    assert len(_mlp_nodes(model, IDS)) == 2  # layer 0 unfused (hooked), layer 1 fused
    hook.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "GatedMlpFunctionBackward" not in _mlp_nodes(model, IDS)
    with lorakit.kernels.disabled("gated_mlp"):
        assert "GatedMlpFunctionBackward" not in _mlp_nodes(model, IDS)
    with lorakit.kernels.disabled():
        assert _mlp_nodes(model, IDS) == {"AddBackward0"}  # the reference: plain autograd


def test_merged_adapter_leaves_base_only_and_unload_restores_forward():
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model = lorakit.inject(tiny_llama(), config)
    randomize_adapters(model)
    mlp = model.model.layers[0].mlp
    assert "forward" in mlp.__dict__
    copy = clone(model)
    assert copy.model.layers[0].mlp.forward.args == (copy.model.layers[0].mlp,)  # deepcopy rebinds
    lorakit.merge(model)
    x = torch.randn(2, 3, 16, requires_grad=True)
    assert mlp(x).grad_fn.name() != "GatedMlpFunctionBackward"  # merged: nothing to add
    plain = lorakit.merge_and_unload(model)
    assert all("forward" not in layer.mlp.__dict__ for layer in plain.model.layers)


def test_recognises_llama_mlp_only():
    assert gated_mlp.is_gated_mlp(tiny_llama().model.layers[0].mlp)
    assert not gated_mlp.is_gated_mlp(tiny_gpt2().transformer.h[0].mlp)

    class Other(torch.nn.Module):  # same attributes, another computation
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = self.down_proj = torch.nn.Linear(4, 4)
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    assert not gated_mlp.is_gated_mlp(Other())
