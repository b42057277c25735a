"""Adapters in fp32 over low-precision bases by default, in bf16 when asked; bf16 autocast in training."""

from __future__ import annotations

import math

import peft
import pytest
import torch

import lorakit
from lorakit import quantization as Q
from lorakit.train import TrainConfig, build_optimizer, fit, train_step
from tests.conftest import TOL, clone, nf4_llama, randomize_adapters, tiny_llama

IDS = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
BATCH = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS.clone()}


@pytest.mark.parametrize(
    "make, dtype, expected",
    [
        (lambda: tiny_llama(), "auto", torch.float32),
        (lambda: tiny_llama().to(torch.bfloat16), "auto", torch.float32),  # fp32 over bf16, as PEFT
        (lambda: Q.quantize(nf4_llama(), "nf4"), "auto", torch.float32),
        (lambda: tiny_llama(), "bfloat16", torch.bfloat16),
        (lambda: Q.quantize(nf4_llama(), "bf16"), "bfloat16", torch.bfloat16),
    ],
    ids=["fp32-base", "bf16-base", "nf4-base", "asked-bf16", "bf16-base-asked-bf16"],
)
def test_adapter_dtype(make, dtype, expected):
    model = lorakit.inject(
        make(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], adapter_dtype=dtype, use_dora=True)
    )
    rec = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert rec.lora_A.dtype == rec.lora_B.dtype == rec.lora_magnitude_vector.dtype == expected


def test_bf16_adapters_train_and_their_file_loads_in_peft(tmp_path):
    base = tiny_llama()
    model = lorakit.inject(clone(base), lorakit.LoraConfig(r=4, target_modules="all-linear", adapter_dtype="bfloat16"))
    randomize_adapters(model)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
    result = train_step(model.train(), [BATCH], optimizer, max_grad_norm=1.0)
    assert math.isfinite(result.loss) and math.isfinite(result.grad_norm)
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(clone(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits, theirs(IDS).logits, atol=TOL[torch.bfloat16], rtol=0)
    assert "adapter_dtype" not in (tmp_path / "adapter_config.json").read_text()  # a lorakit setting


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32-base", "nf4-base"])
def test_bf16_autocast_trains_with_fp32_adapters_and_the_kernels_step_aside(tmp_path, quantized):
    base = Q.quantize(nf4_llama(), "nf4") if quantized else nf4_llama()
    model = lorakit.inject(base, lorakit.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    randomize_adapters(model, scale=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.train()(IDS).logits
    assert logits.dtype == torch.bfloat16
    assert all(type(fn).__name__ != "LoraLinearFunctionBackward" for fn in _nodes(logits))

    grads = []
    for run in ("kernels", "reference"):
        twin = clone(model)
        optimizer = build_optimizer(twin, TrainConfig(lr=1e-2))
        torch.manual_seed(0)
        with lorakit.kernels.disabled() if run == "reference" else torch.enable_grad():
            train_step(twin, [BATCH], optimizer, autocast=torch.bfloat16)
        grads.append({n: p.detach().clone() for n, p in twin.named_parameters() if p.requires_grad})
        assert grads[-1] and all(p.dtype == torch.float32 for p in grads[-1].values())
    for name, value in grads[0].items():
        torch.testing.assert_close(value, grads[1][name], rtol=0, atol=0, msg=name)  # the same code ran

    config = TrainConfig(lr=1e-2, max_steps=2, autocast="bf16", save_every=None)
    result = fit(model, lambda e, s: iter([BATCH] * (2 - s)), config, tmp_path, batches_per_epoch=2)
    assert result.steps == 2 and math.isfinite(result.final_loss)


def _nodes(tensor: torch.Tensor) -> list:
    seen, stack = [], [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.append(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return seen
