"""Inference is eval mode: whatever order a model meets `eval()`, `train()`, `load_adapter` and `inject`,
every module it gains takes the model's mode, so two inference forwards are identical and equal PEFT's
(issue 24: adapters loaded into an eval-mode model ran dropout, and `inference_mode` raised)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel

import lorakit
from lorakit.modes import evaluating
from lorakit.quantization import quantize
from tests.conftest import clone, nf4_llama, randomize_adapters, tiny_gpt2, tiny_llama

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))


def _saved_adapter(folder: Path, p: float, seed: int, **fields) -> Path:
    """A trained-looking adapter (random A and B) with dropout p, saved in PEFT's format."""
    model = tiny_llama()
    cfg = lorakit.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=p, target_modules=["q_proj", "v_proj", "up_proj"], **fields
    )
    lorakit.inject(model, cfg)
    randomize_adapters(model, seed=seed, scale=0.5)
    lorakit.save_adapter(model, folder)
    return folder


ops = st.lists(st.sampled_from(["eval", "train", "load", "inject"]), min_size=1, max_size=5)


@SETTINGS
@given(ops=ops, p=st.sampled_from([0.05, 0.3, 0.9]), start_training=st.booleans(), dora=st.booleans())
def test_any_order_of_modes_and_adapters_infers_without_dropout(ops, p, start_training, dora):
    with tempfile.TemporaryDirectory() as tmp:
        folder = _saved_adapter(Path(tmp) / "a", p, seed=7, use_dora=dora)
        model = tiny_llama().train(start_training)
        first_loaded = None
        for i, op in enumerate(ops):
            if op == "eval":
                model.eval()
            elif op == "train":
                model.train()
            elif op == "load":
                lorakit.load_adapter(model, folder, adapter_name=f"l{i}")
                first_loaded = first_loaded or f"l{i}"
            else:
                cfg = lorakit.LoraConfig(r=2, lora_dropout=p, target_modules=["q_proj", "k_proj"], use_dora=dora)
                lorakit.inject(model, cfg, adapter_name=f"i{i}")
        # Every module has the mode the model's last eval()/train() (or its start) gave it.
        assert {m.training for m in model.modules()} == {model.training}
        if first_loaded is None:
            return
        lorakit.set_adapter(model, first_loaded)
        with evaluating(model), torch.inference_mode():
            a, b = model(IDS).logits, model(IDS).logits
        assert torch.equal(a, b)
        peft = PeftModel.from_pretrained(tiny_llama(), folder)
        assert not any(m.training for m in peft.modules())
        with torch.no_grad():
            want = peft(IDS).logits
        torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-5)
        if not model.training:  # the user's own forwards, outside any lorakit block, are inference too
            with torch.no_grad():
                torch.testing.assert_close(model(IDS).logits, a, atol=0, rtol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-fused"])
def test_load_into_eval_model_is_deterministic_and_runs_under_inference_mode(tmp_path, make):
    target = ["q_proj", "v_proj"] if make is tiny_llama else ["c_attn"]
    source = make()
    lorakit.inject(source, lorakit.LoraConfig(r=4, lora_dropout=0.3, target_modules=target))
    randomize_adapters(source)
    lorakit.save_adapter(source, tmp_path)
    base = make().eval()
    lorakit.load_adapter(base, tmp_path, adapter_name="x")
    assert not any(m.training for m in base.modules())
    with torch.no_grad():
        a, b = base(IDS).logits, base(IDS).logits
    assert torch.equal(a, b)
    with torch.inference_mode():
        c = base(IDS).logits
    assert torch.equal(a, c)


def test_train_mode_under_inference_mode_drops_without_touching_version_counters():
    # Dropout in training mode on inference tensors, which have no version counter to read.
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "k_proj", "v_proj"]))
    randomize_adapters(model)
    with torch.inference_mode():
        a, b = model(IDS).logits, model(IDS).logits
    assert not torch.equal(a, b)  # dropout is live in training mode


def test_adapter_added_to_training_model_trains():
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_dropout=0.05, target_modules=["q_proj"]))
    assert all(m.training for m in model.modules())


def test_nf4_base_with_loaded_dropout_adapter_infers_deterministically(tmp_path):
    source = nf4_llama()
    quantize(source, "nf4")
    lorakit.inject(source, lorakit.LoraConfig(r=4, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(source, scale=0.05)
    lorakit.save_adapter(source, tmp_path)
    base = nf4_llama().eval()
    quantize(base, "nf4")
    lorakit.load_adapter(base, tmp_path)
    ids = IDS % 64
    with torch.inference_mode():
        a, b = base(ids).logits, base(ids).logits
    assert torch.equal(a, b)
    merged = clone(base)
    lorakit.merge(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, a, atol=2e-4, rtol=2e-4)
