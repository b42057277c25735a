"""Bad input: a clear typed error naming what is wrong, and the model and files unchanged."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import lorakit
from lorakit.errors import (
    AdapterFormatError,
    ConfigError,
    LorakitError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedLayerError,
)
from tests.conftest import (
    assert_same_state,
    conv_net,
    randomize_adapters,
    state_snapshot,
    tiny_gpt2,
    tiny_llama,
)


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"r": -2}, "got -2"),
        ({"r": 2.5}, "got 2.5"),
        ({"r": True}, "got True"),
        ({"lora_alpha": 0}, "lora_alpha must be a number > 0, got 0"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1), got 1.0"),
        ({"lora_dropout": -0.1}, "got -0.1"),
        ({"bias": "some"}, "bias must be one of 'none', 'all', 'lora_only', got 'some'"),
        ({"init_lora_weights": "olora"}, "init_lora_weights"),
        ({"target_modules": "(unclosed"}, "not a valid regular expression"),
        ({"target_modules": []}, "empty list"),
        ({"target_modules": [1, 2]}, "target_modules must be"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']"),
        ({"alpha_pattern": {"q_proj": -1}}, "alpha_pattern['q_proj']"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "only meaningful with layers_to_transform"),
        ({"fused_slices": {"c_attn": [False, False]}}, "adapts no slice"),
        ({"fused_slices": {"c_attn": [True]}}, "list of ≥ 2 bools"),
        ({"init_lora_weights": "pissa", "fused_slices": {"c_attn": [True, False]}}, "pissa"),
    ],
)
def test_config_names_field_and_value(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        lorakit.LoraConfig(**kwargs)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        lorakit.LoraConfig(r=0, lora_alpha=-1, lora_dropout=2, bias="x")
    text = str(info.value)
    for field in ("r must", "lora_alpha must", "lora_dropout must", "bias must"):
        assert field in text


# ------------------------------------------------------------------------------ targeting
def test_target_not_found_lists_closest_names_and_leaves_model_untouched(llama):
    before = state_snapshot(llama)
    modules = [(n, type(m)) for n, m in llama.named_modules()]
    with pytest.raises(TargetNotFoundError) as info:
        lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj", "v_prj"]))
    text = str(info.value)
    assert "'v_prj'" in text and "closest names: v_proj" in text
    assert "q_proj (Linear ×2)" in text and "Layer types lorakit can adapt: Linear" in text
    assert isinstance(info.value, ValueError)
    assert [(n, type(m)) for n, m in llama.named_modules()] == modules
    assert_same_state(llama, before)


def test_regex_and_layer_filter_that_match_nothing(llama):
    with pytest.raises(TargetNotFoundError, match="matched no adaptable module"):
        lorakit.inject(llama, lorakit.LoraConfig(target_modules=r".*\.nothing_here"))
    with pytest.raises(TargetNotFoundError, match=r"layers_to_transform=\[7\]"):
        lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    assert "_lorakit" not in llama.__dict__


def test_unsupported_layer_type_is_named_with_its_adaptable_children(llama):
    before = state_snapshot(llama)
    with pytest.raises(UnsupportedLayerError) as info:
        lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj", "self_attn"]))
    text = str(info.value)
    assert "LlamaAttention" in text and "q_proj" in text and "Adaptable types" in text
    assert_same_state(llama, before)
    assert not any(isinstance(m, lorakit.layers.LoraLayer) for m in llama.modules())


def test_grouped_conv_is_refused_before_anything_changes():
    model = conv_net()
    model.conv = torch.nn.Conv2d(1, 4, 3, padding=1, groups=1)
    model.conv2 = torch.nn.Conv2d(2, 4, 3, groups=2)
    before = state_snapshot(model)
    with pytest.raises(UnsupportedLayerError, match="groups=2"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["lin0", "conv", "conv2"]))
    assert_same_state(model, before)
    assert type(model.lin0) is torch.nn.Linear and type(model.conv) is torch.nn.Conv2d


def test_fused_slices_that_do_not_divide(gpt2):
    with pytest.raises(ConfigError, match="48 output features do not split into 5"):
        lorakit.inject(gpt2, lorakit.LoraConfig(target_modules=["c_attn"], fused_slices={"c_attn": [True] * 5}))
    with pytest.raises(ConfigError, match="matches no adapted module"):
        lorakit.inject(gpt2, lorakit.LoraConfig(target_modules=["c_fc"], fused_slices={"c_attn": [True, False, True]}))


def test_adapter_name_rules(llama):
    lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"]))
    for bad in ("", "a.b", "__base__"):
        with pytest.raises(ConfigError, match="adapter_name"):
            lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"]), bad)
    with pytest.raises(ConfigError, match="already has an adapter named 'default'"):
        lorakit.inject(llama, lorakit.LoraConfig(target_modules=["v_proj"]))


def test_modules_to_save_typo(llama):
    before = state_snapshot(llama)
    with pytest.raises(TargetNotFoundError, match=r"'lm_hed'.*lm_head"):
        lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_hed"]))
    assert_same_state(llama, before)


def test_unknown_adapter_names(llama):
    with pytest.raises(LorakitError, match="no LoRA adapter"):
        lorakit.merge(llama)
    lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(LorakitError, match=r"no adapter named 'x'; this model has \['default'\]"):
        lorakit.set_adapter(llama, "x")
    with pytest.raises(LorakitError, match="unknown adapter"), lorakit.adapter_per_row(llama, ["default", "x"]):
        pass


def test_safe_merge_refuses_nan_and_writes_nothing(llama):
    lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    randomize_adapters(llama)
    with torch.no_grad():
        llama.model.layers[1].self_attn.v_proj.adapters["default"].lora_B[0, 0] = float("nan")
    before = state_snapshot(llama)
    with pytest.raises(LorakitError, match=r"model\.layers\.1\.self_attn\.v_proj.*NaN/inf"):
        lorakit.merge(llama, safe=True)
    assert_same_state(llama, before)
    assert all(layer.merged == () for _, layer in lorakit.state.lora_layers(llama))


def test_per_row_refuses_merged(llama, ids):
    lorakit.inject(llama, lorakit.LoraConfig(target_modules=["q_proj"]))
    lorakit.merge(llama)
    with pytest.raises(LorakitError, match="unmerged"), lorakit.adapter_per_row(llama, ["default"] * 4):
        pass


# ------------------------------------------------------------------------------ files
@pytest.fixture
def saved(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad"


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _expect_load_error(directory, error, needle):
    model = tiny_llama()
    before = state_snapshot(model)
    files = _files(directory) if directory.is_dir() else None
    with pytest.raises(error) as info:
        lorakit.load_adapter(model, directory)
    assert needle in str(info.value), str(info.value)
    assert_same_state(model, before)
    assert not any(isinstance(m, lorakit.layers.AdapterHost) for m in model.modules())
    assert "_lorakit" not in model.__dict__
    if files is not None:
        assert _files(directory) == files
    return str(info.value)


def test_missing_directory_and_files(tmp_path, saved):
    _expect_load_error(tmp_path / "nope", AdapterFormatError, "does not exist")
    (saved / "adapter_config.json").rename(saved / "other.json")
    _expect_load_error(saved, AdapterFormatError, "adapter_config.json: missing")
    (saved / "other.json").rename(saved / "adapter_config.json")
    (saved / "adapter_model.safetensors").unlink()
    _expect_load_error(saved, AdapterFormatError, "adapter_model.safetensors: missing")


def test_pickle_is_never_loaded(saved):
    weights = saved / "adapter_model.safetensors"
    weights.unlink()
    marker = saved / "pwned"
    with open(saved / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": 1}, f)
    msg = _expect_load_error(saved, AdapterFormatError, "pickle")
    assert "adapter_model.bin" in msg
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(1)}, weights)  # a zip-pickle in disguise
    _expect_load_error(saved, AdapterFormatError, "never unpickles")
    assert not marker.exists()


def test_invalid_json_and_wrong_peft_type(saved):
    cfg = saved / "adapter_config.json"
    good = cfg.read_text()
    cfg.write_text(good[:-20])
    _expect_load_error(saved, AdapterFormatError, "not valid JSON")
    data = json.loads(good)
    cfg.write_text(json.dumps({**data, "peft_type": "IA3"}))
    _expect_load_error(saved, AdapterFormatError, "peft_type is 'IA3'")
    cfg.write_text(json.dumps({**data, "use_dora": True}))
    _expect_load_error(saved, AdapterFormatError, "DoRA")
    cfg.write_text(json.dumps({**data, "r": 0}))
    _expect_load_error(saved, AdapterFormatError, "r must be a positive integer")


def test_truncated_and_garbage_safetensors(saved):
    weights = saved / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    _expect_load_error(saved, AdapterFormatError, "not a valid safetensors file")
    weights.write_bytes(os.urandom(256))
    _expect_load_error(saved, AdapterFormatError, "adapter_model.safetensors")


def test_adapter_for_another_model(saved):
    other = tiny_gpt2()
    before = state_snapshot(other)
    with pytest.raises(AdapterFormatError, match="which this model does not have"):
        lorakit.load_adapter(other, saved)
    assert_same_state(other, before)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    before = state_snapshot(wider)
    with pytest.raises(ShapeMismatchError) as info:
        lorakit.load_adapter(wider, saved)
    text = str(info.value)
    assert "adapter_model.safetensors" in text and "lora_A.weight" in text and "[4, 16]" in text and "[4, 32]" in text
    assert_same_state(wider, before)


def test_rank_disagreeing_with_config(saved):
    cfg = saved / "adapter_config.json"
    data = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**data, "r": 8}))
    _expect_load_error(saved, ShapeMismatchError, "has rank 4 but adapter_config.json says r=8")


def test_save_is_atomic_and_leaves_no_temp_files(saved, monkeypatch):
    model = lorakit.load_adapter(tiny_llama(), saved)
    before = _files(saved)
    import lorakit.io as io

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "fsync", boom)
    randomize_adapters(model, seed=9)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(model, saved)
    assert _files(saved) == before
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_saved_files_get_the_permissions_open_would_give(tmp_path):
    """New files: 0o666 less the umask (not the temporary file's 0o600); replaced files keep theirs."""
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    old = os.umask(0o027)
    try:
        lorakit.save_adapter(model, tmp_path / "ad")
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ad").iterdir()}
        assert modes == {"adapter_config.json": 0o640, "adapter_model.safetensors": 0o640}
        (tmp_path / "ad" / "adapter_model.safetensors").chmod(0o604)
        lorakit.save_adapter(model, tmp_path / "ad")
    finally:
        os.umask(old)
    assert (tmp_path / "ad" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o604


def test_load_into_name_in_use(saved):
    model = lorakit.load_adapter(tiny_llama(), saved)
    before = state_snapshot(model)
    with pytest.raises(ConfigError, match="already has an adapter named 'default'"):
        lorakit.load_adapter(model, saved)
    assert_same_state(model, before)
    lorakit.load_adapter(model, saved, adapter_name="second")
    assert lorakit.list_adapters(model) == ["default", "second"]
    # The same files under another name: the same function, and not the base model's.
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = model(ids).logits
        lorakit.set_adapter(model, "second")
        second = model(ids).logits
        with lorakit.disable_adapters(model):
            base = model(ids).logits
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    assert (first - base).abs().max() > 1e-3
