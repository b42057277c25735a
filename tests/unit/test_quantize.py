"""Frozen NF4 and bf16 bases (QLoRA): inject, train, save, load, merge and mixed batches on them."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn

import lorakit
from lorakit import quantization as Q
from lorakit.errors import ConfigError
from lorakit.train import TrainConfig, fit
from tests.conftest import (
    TOL,
    assert_same_state,
    clone,
    each_adapter_alone,
    nf4_llama,
    randomize_adapters,
    state_snapshot,
)

IDS = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
QV = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def _dequantized_twin(model: nn.Module) -> nn.Module:
    """A plain model with the quantized model's effective (dequantized) weights."""
    return Q.dequantize(clone(model))


@pytest.mark.parametrize("scheme", ["nf4", "bf16"])
def test_every_linear_but_the_head_is_stored_compressed_and_computes_its_dequantized_weight(scheme):
    base = nf4_llama()
    model = lorakit.quantize(clone(base), scheme)  # the top-level name is the same function
    quantized = [p for p, m in model.named_modules() if isinstance(m, Q.QuantizedLinear) and not m.stores_table]
    linear = [p for p, m in base.named_modules() if isinstance(m, nn.Linear) and p != "lm_head"]
    assert quantized == linear and Q.quantization_of(model) == scheme
    # The tables beside them: the embeddings and the (untied) head in bf16, computing in fp32.
    assert type(model.model.embed_tokens) is Q.QuantizedEmbedding and model.lm_head.stores_table
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.scheme == "bf16" and model.lm_head.original_dtype == torch.float32
    stored = sum(Q.quantized_bytes(model.get_submodule(p)) for p in quantized)
    full = sum(base.get_submodule(p).weight.numel() * 4 for p in quantized)
    assert stored <= (0.15 if scheme == "nf4" else 0.5) * full  # weights only; no biases in LLaMA
    twin = _dequantized_twin(model)
    assert all(type(m) is not Q.QuantizedLinear for m in twin.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, twin(IDS).logits, atol=1e-5, rtol=0)
        error = (model(IDS).logits - base(IDS).logits).abs().max()
    assert 0 < error < (0.5 if scheme == "nf4" else 0.05)  # quantization changes the model, a little


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_embeddings_and_head_are_stored_in_bf16_and_compute_in_the_model_dtype(tied):
    """The tables are rounded to bf16 and nothing else changes: the quantized model's logits equal
    those of the same model with NF4 linears and bf16-rounded fp32 tables; a tied head keeps sharing
    the one (bf16) table; dequantize gives plain modules back, tied again."""
    base = nf4_llama()
    if tied:
        base.lm_head.weight = base.model.embed_tokens.weight
    model = Q.quantize(clone(base), "nf4")
    embedding, head = model.model.embed_tokens, model.lm_head
    assert (head.weight is embedding.weight) == tied
    reference = Q.quantize(clone(base), "nf4", tables=False)
    assert type(reference.model.embed_tokens) is nn.Embedding and type(reference.lm_head) is nn.Linear
    with torch.no_grad():
        for table in {id(t): t for t in (reference.model.embed_tokens.weight, reference.lm_head.weight)}.values():
            table.copy_(table.to(torch.bfloat16).float())
        got, want = model(IDS).logits, reference(IDS).logits
        assert got.dtype == torch.float32 and model.model.embed_tokens(IDS).dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plain = Q.dequantize(model)
    assert type(plain.model.embed_tokens) is nn.Embedding and type(plain.lm_head) is nn.Linear
    assert plain.model.embed_tokens.weight.dtype == torch.float32
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, want, atol=1e-5, rtol=1e-5)


def test_tables_stay_as_they_are_when_skipped_narrow_or_trained_as_the_head():
    model = Q.quantize(nf4_llama(), "nf4", skip=["lm_head"])
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is Q.QuantizedEmbedding
    model = Q.quantize(nf4_llama(), "nf4", include_head=True)  # the head in NF4, not a bf16 table
    assert model.lm_head.scheme == "nf4" and not model.lm_head.stores_table
    half = nf4_llama().to(torch.bfloat16)
    model = Q.quantize(half, "nf4")  # already 16-bit: nothing to gain
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    tied = nf4_llama()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    model = Q.quantize(tied, "nf4", skip=["embed_tokens"])  # a tied head goes with its table only
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


def test_a_step_keeps_the_compressed_weights_not_dense_copies():
    """Autograd keeps each base weight in NF4 for the backward, never a dequantized (out, in) copy."""
    model = lorakit.inject(Q.quantize(nf4_llama(), "nf4"), QV).train()
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, Q.QuantizedLinear)}
    dense = []

    def pack(t):
        if type(t) is torch.Tensor and tuple(t.shape) in shapes and t.dtype == torch.float32:
            dense.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(IDS).logits.square().mean().backward()
    assert dense == []
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.usefixtures("both_paths")
def test_fit_trains_only_the_adapter_and_the_file_loads_on_the_full_precision_base_in_lorakit_and_peft(tmp_path):
    base = nf4_llama()
    model = lorakit.inject(Q.quantize(clone(base), "nf4"), QV)
    codes = {
        p: m.weight.quantized_data.clone()
        for p, m in model.named_modules()
        if isinstance(m, Q.QuantizedLinear) and m.scheme == "nf4"
    }
    labels = IDS.clone()
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}
    result = fit(
        model, lambda e, s: iter([batch][s:]), TrainConfig(lr=1e-2, max_steps=3), tmp_path, batches_per_epoch=1
    )
    for path, m in model.named_modules():
        if isinstance(m, Q.QuantizedLinear) and m.scheme == "nf4":
            assert torch.equal(m.weight.quantized_data, codes[path])  # W0 never moves
    with safe_open(result.adapter_dir / "adapter_model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "lorakit.base_quantization": "nf4"}
    assert lorakit.io.adapter_base_quantization(result.adapter_dir) == "nf4"
    ours = lorakit.load_adapter(clone(base), result.adapter_dir).eval()
    theirs = peft.PeftModel.from_pretrained(clone(base), str(result.adapter_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=0)
        # on the NF4 base it was trained on, the adapter's outputs are the quantized model's
        again = lorakit.load_adapter(Q.quantize(clone(base), "nf4"), result.adapter_dir).eval()
        torch.testing.assert_close(again(IDS).logits, model.eval()(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("scheme", ["nf4", "bf16"])
def test_merge_writes_dense_weights_unmerge_restores_the_compressed_ones_exactly(scheme):
    model = lorakit.inject(Q.quantize(nf4_llama(), scheme), QV).eval()
    randomize_adapters(model, scale=0.05)
    layer = model.model.layers[0].self_attn.q_proj
    stored = layer.base_layer.weight
    atol = 1e-4 if scheme == "nf4" else TOL[torch.bfloat16]  # a bf16 base is merged in bf16: W0 + ΔW rounds
    with torch.no_grad():
        unmerged = model(IDS).logits
        lorakit.merge(model, safe=True)
        assert type(layer.base_layer.weight) is nn.Parameter and layer.base_layer.weight.dtype == stored.dtype
        torch.testing.assert_close(model(IDS).logits, unmerged, atol=atol, rtol=0)
        lorakit.unmerge(model)
        assert layer.base_layer.weight is stored  # the very compressed weight: nothing re-quantized
        torch.testing.assert_close(model(IDS).logits, unmerged, atol=0, rtol=0)
        plain = lorakit.merge_and_unload(model)
        assert all(type(m) is not Q.QuantizedLinear for m in plain.modules())
        assert type(plain.model.layers[1].mlp.gate_proj) is nn.Linear  # not adapted: dequantized too
        torch.testing.assert_close(plain(IDS).logits, unmerged, atol=atol, rtol=0)


@pytest.mark.usefixtures("both_paths")
def test_mixed_batches_on_an_nf4_base_equal_each_adapter_alone():
    model = lorakit.inject(Q.quantize(nf4_llama(), "nf4"), QV, "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["v_proj", "o_proj"]), "b")
    randomize_adapters(model, scale=0.05)
    model.eval()
    names = ["b", "__base__", "a"]
    alone = each_adapter_alone(model, IDS, names)
    with torch.no_grad(), lorakit.adapter_per_row(model, names):
        mixed = model(IDS).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=0)


def test_bf16_base_takes_fp32_activations_and_keeps_fp32_adapters():
    model = lorakit.inject(Q.quantize(nf4_llama(), "bf16"), QV)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.adapters["default"].lora_A.dtype == torch.float32
    out = model.train()(IDS).logits
    assert out.dtype == torch.float32
    out.square().mean().backward()
    assert layer.adapters["default"].lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: Q.quantize(m, "int3"), "unknown quantization scheme 'int3'; choose one of nf4, bf16"),
        (lambda m: Q.quantize(Q.quantize(m, "bf16"), "nf4"), r"already quantized \(bf16\)"),
        (lambda m: Q.quantize(lorakit.inject(m, QV), "nf4"), "carries LoRA adapters; quantize the base first"),
        (lambda m: Q.quantize(m, "nf4", skip=["nope"]), r"skip entries \['nope'\] name no linear layer or embedding"),
        (
            lambda m: lorakit.inject(Q.quantize(m, "nf4"), lorakit.LoraConfig(init_lora_weights="pissa")),
            "'pissa' rewrites W0, which 'model.layers.0.self_attn.q_proj' stores quantized",
        ),
    ],
    ids=["scheme", "twice", "adapters", "skip", "pissa"],
)
def test_bad_requests_are_refused_and_name_the_problem(call, message):
    model = nf4_llama()
    with pytest.raises(ConfigError, match=message):
        call(model)


def test_a_shape_nf4_cannot_block_is_named_and_nothing_changes():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))  # 160 values: not whole 64-blocks
    before = state_snapshot(model)
    with pytest.raises(ConfigError, match=r"multiple of 64; these are not: 2 \(10×16\)"):
        Q.quantize(model, "nf4")
    assert_same_state(model, before)
    assert Q.quantization_of(model) is None
    Q.quantize(model, "nf4", skip=["2"])
    assert Q.quantization_of(model) == "nf4" and type(model[2]) is nn.Linear


def test_scalers_group_in_256_or_the_largest_power_of_two_that_divides_the_blocks():
    """QLoRA's 256-scaler blocks where they divide; SmolLM2's 576×576 (5,184 blocks) takes 64."""
    assert Q.nf4_scaler_block(128 * 128) == 256
    assert Q.nf4_scaler_block(576 * 576) == 64 and Q.nf4_scaler_block(192 * 576) == 64
    assert Q.nf4_scaler_block(16 * 16) == 4
    layer = Q.QuantizedLinear.from_linear(nn.Linear(576, 576), "nf4")
    assert (layer.weight.block_size, layer.weight.scaler_block_size) == (64, 64)
