"""lorakit against HF PEFT (test-only dependency): same base, same A and B, same outputs."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

import lorakit
from lorakit.state import lora_layers
from tests.conftest import TOL, clone, conv_net, randomize_adapters, tiny_gpt2, tiny_llama

ATOL = TOL[torch.float32]

CASES = {
    "llama-qv": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-rslora": (
        tiny_llama,
        dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    ),
    "llama-patterns": (
        tiny_llama,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
            alpha_pattern={"v_proj": 3.0},
            layers_to_transform=[1],
        ),
    ),
    "llama-regex": (
        tiny_llama,
        dict(r=2, lora_alpha=4, target_modules=r"model\.layers\.0\.self_attn\.(k|o)_proj"),
    ),
    "gpt2-c_attn": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])),
    "llama-dora": (
        tiny_llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    ),
    "gpt2-dora": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True)),
}


def _peft_twin(base, kwargs, model):
    """A PEFT model with the same config, then lorakit's A and B copied in."""
    pm = get_peft_model(clone(base), peft.LoraConfig(**kwargs))
    state = {}
    for path, layer in lora_layers(model):
        for suffix, t in layer.peft_tensors("default").items():
            state[f"base_model.model.{path}.{suffix}"] = t
    result = set_peft_model_state_dict(pm, state)
    assert not result.unexpected_keys
    return pm.eval()


def _lorakit_model(make, kwargs):
    base = make()
    model = lorakit.inject(clone(base), lorakit.LoraConfig(**kwargs))
    randomize_adapters(model)
    return base, model.eval()


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_merge_unmerge_disable_unload_match_peft(case, ids):
    make, kwargs = CASES[case]
    base, model = _lorakit_model(make, kwargs)
    pm = _peft_twin(base, kwargs, model)
    base_out = base(ids).logits
    with torch.no_grad():
        ours, theirs = model(ids).logits, pm(input_ids=ids).logits
        assert (ours - base_out).abs().max() > 1e-3, "adapter must change the output"
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)

        lorakit.merge(model)
        pm.merge_adapter()
        torch.testing.assert_close(model(ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(model(ids).logits, ours, atol=ATOL, rtol=0)

        lorakit.unmerge(model)
        pm.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)

        with lorakit.disable_adapters(model), pm.disable_adapter():
            torch.testing.assert_close(model(ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)
            torch.testing.assert_close(model(ids).logits, base_out, atol=ATOL, rtol=0)

        plain = lorakit.merge_and_unload(model)
        peft_plain = pm.merge_and_unload()
        assert type(
            plain.model.layers[0].self_attn.q_proj if hasattr(plain, "model") else plain.transformer.h[0].attn.c_attn
        ) in (
            torch.nn.Linear,
            __import__("transformers").pytorch_utils.Conv1D,
        )
        torch.testing.assert_close(plain(ids).logits, peft_plain(input_ids=ids).logits, atol=ATOL, rtol=0)
        ours_sd, theirs_sd = plain.state_dict(), peft_plain.state_dict()
        assert list(ours_sd) == list(theirs_sd)
        for k in ours_sd:
            torch.testing.assert_close(ours_sd[k], theirs_sd[k], atol=1e-6, rtol=0)


def test_gpt2_fused_qv_slices_load_in_peft_with_same_logits(tmp_path, ids):
    base = tiny_gpt2()
    cfg = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]})
    model = lorakit.inject(clone(base), cfg)
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    pm = PeftModel.from_pretrained(clone(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)
    # B is block-structured: rows of the k slice are zero.
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert B.shape == (48, 4)
    assert torch.count_nonzero(B[16:32]) == 0 and torch.count_nonzero(B[:16, 2:]) == 0
    assert torch.count_nonzero(B[:16, :2]) > 0 and torch.count_nonzero(B[32:, 2:]) > 0


@pytest.mark.parametrize("case", ["llama-qv", "gpt2-c_attn", "llama-patterns", "llama-dora", "gpt2-dora"])
def test_lorakit_file_loads_in_peft(case, tmp_path, ids):
    make, kwargs = CASES[case]
    base, model = _lorakit_model(make, kwargs)
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert set(config) <= set(peft.LoraConfig().to_dict()) | {"peft_type"}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in tensors)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    pm = PeftModel.from_pretrained(clone(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_peft_file_loads_in_lorakit(case, tmp_path, ids):
    make, kwargs = CASES[case]
    base = make()
    pm = get_peft_model(clone(base), peft.LoraConfig(init_lora_weights=False, **kwargs)).eval()
    pm.save_pretrained(tmp_path)
    model = lorakit.load_adapter(clone(base), tmp_path).eval()
    with torch.no_grad():
        theirs = pm(input_ids=ids).logits
        assert (theirs - base(ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(model(ids).logits, theirs, atol=ATOL, rtol=0)


def test_modules_to_save_and_embedding_files_both_ways(tmp_path, ids):
    base = tiny_llama()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    pm = get_peft_model(clone(base), peft.LoraConfig(init_lora_weights=False, **kwargs)).eval()
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    pm.save_pretrained(tmp_path / "peft")
    model = lorakit.load_adapter(clone(base), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)
    lorakit.save_adapter(model, tmp_path / "ours")
    again = PeftModel.from_pretrained(clone(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, pm(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_embedding_and_conv2d_match_peft(ids):
    base = conv_net()
    kwargs = dict(r=2, lora_alpha=4, target_modules=["emb", "conv", "lin0"])
    model = lorakit.inject(clone(base), lorakit.LoraConfig(**kwargs))
    randomize_adapters(model)
    pm = _peft_twin(base, kwargs, model)
    x = torch.randint(0, 20, (5, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), atol=ATOL, rtol=0)
        lorakit.merge(model)
        pm.merge_adapter()
        torch.testing.assert_close(model(x), pm(x), atol=ATOL, rtol=0)


def test_mixed_batch_matches_peft_adapter_names(tmp_path, ids):
    base = tiny_llama()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = get_peft_model(clone(base), peft.LoraConfig(**kwargs))
    torch.manual_seed(5)
    pm.add_adapter("other", peft.LoraConfig(**{**kwargs, "r": 2, "target_modules": ["v_proj", "o_proj"]}))
    pm.eval()
    pm.save_pretrained(tmp_path)  # writes tmp_path/ (default) and tmp_path/other
    model = lorakit.load_adapter(clone(base), tmp_path, adapter_name="a")
    lorakit.load_adapter(model, tmp_path / "other", adapter_name="b")
    names = ["a", "b", "__base__", "b"]
    with torch.no_grad():
        theirs = pm(input_ids=ids, adapter_names=["default", "other", "__base__", "other"]).logits
        with lorakit.adapter_per_row(model, names):
            ours = model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # and row by row it equals the single-adapter forward
    with torch.no_grad():
        lorakit.set_adapter(model, "b")
        torch.testing.assert_close(ours[1], model(ids[1:2]).logits[0], atol=ATOL, rtol=0)
        with lorakit.disable_adapters(model):
            torch.testing.assert_close(ours[2], model(ids[2:3]).logits[0], atol=ATOL, rtol=0)


def test_peft_half_injects_on_error_lorakit_does_not():
    """PEFT 0.21 swaps modules while matching; a failure halfway leaves the model changed."""
    from tests.conftest import assert_same_state, state_snapshot

    base = tiny_llama()
    # Matches q_proj (Linear, fine) in every layer, then LlamaRMSNorm `input_layernorm` (unsupported).
    pattern = r"model\.layers\.\d+\.(self_attn\.q_proj|input_layernorm)"
    peft_model = clone(base)
    with pytest.raises(ValueError):
        get_peft_model(peft_model, peft.LoraConfig(target_modules=pattern))
    assert any("lora" in n for n, _ in peft_model.named_modules()), "PEFT left wrapped modules behind"

    ours = clone(base)
    before = state_snapshot(ours)
    types = [type(m) for m in ours.modules()]
    with pytest.raises(lorakit.UnsupportedLayerError, match="input_layernorm"):
        lorakit.inject(ours, lorakit.LoraConfig(target_modules=pattern))
    assert [type(m) for m in ours.modules()] == types
    assert_same_state(ours, before)
    assert "_lorakit" not in ours.__dict__
