"""`lorakit.train`: the loop, its loss, schedule, optimizer groups, checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification

import lorakit
from lorakit.errors import ConfigError, TrainingError
from lorakit.train import (
    TrainConfig,
    build_optimizer,
    build_scheduler,
    fit,
    latest_checkpoint,
    list_checkpoints,
    loss_sum,
)
from lorakit.train.checkpointing import is_grad_checkpointing
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"]


# ---------------------------------------------------------------------------------------- helpers
def lora_llama(seed: int = 0, dropout: float = 0.0, init_seed: int | None = None) -> nn.Module:
    """Tiny LLaMA (base weights from `seed`) with a LoRA adapter whose init comes from `init_seed`."""
    model = tiny_llama(seed)
    torch.manual_seed(seed if init_seed is None else init_seed)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout))
    return model


def token_data(rows: int = 8, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids; labels = ids with a prompt prefix of 1-4 tokens masked, so rows differ in targets."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (rows, seq), generator=gen)
    labels = ids.clone()
    for row in range(rows):
        labels[row, : 1 + row % 4] = -100
    return ids, labels


def batches(ids: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int = 0):
    """A data function whose order depends only on (seed, epoch), as fit's contract asks."""
    rows = ids.shape[0]

    def fn(epoch: int, start: int):
        order = list(range(rows))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for index in range(start, math.ceil(rows / batch_size)):
            take = order[index * batch_size : (index + 1) * batch_size]
            yield {"input_ids": ids[take], "attention_mask": torch.ones_like(ids[take]), "labels": labels[take]}

    return fn


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).detach().abs().max()) for k in a)


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def cfg(**kw) -> TrainConfig:
    base = {"lr": 1e-2, "max_steps": 4, "save_every": None, "batch_size": 4}
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------- config
def test_config_lists_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        TrainConfig(lr=-1.0, schedule="step", grad_accum=0, betas=(0.9, 1.5), max_steps=None, epochs=None)
    text = str(err.value)
    for name in ("lr", "schedule", "grad_accum", "betas", "max_steps or epochs"):
        assert name in text, name
    TrainConfig()  # the defaults are valid


# ---------------------------------------------------------------------------------------- loss
def test_causal_loss_is_shifted_token_sum_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])  # (1, 3 positions, 3 classes)
    labels = torch.tensor([[-100, 1, 2]])  # position 0 predicts label[1]=1, position 1 predicts label[2]=2

    def nll(row: list[float], target: int) -> float:
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    expected = nll([2.0, 0.0, 0.0], 1) + nll([0.0, 1.0, 0.0], 2)
    assert float(loss_sum(logits, labels)) == pytest.approx(expected, abs=1e-6)

    eps = 0.1  # label smoothing: (1 − ε)·nll + ε·mean over classes of −log p

    def smoothed(row: list[float], target: int) -> float:
        lse = math.log(sum(math.exp(v) for v in row))
        return (1 - eps) * nll(row, target) + eps * sum(lse - v for v in row) / len(row)

    expected_smooth = smoothed([2.0, 0.0, 0.0], 1) + smoothed([0.0, 1.0, 0.0], 2)
    assert float(loss_sum(logits, labels, eps)) == pytest.approx(expected_smooth, abs=1e-6)


def test_classification_loss_uses_one_target_per_row():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, -100])
    expected = -(1 - math.log(math.exp(1) + 1)) - (0 - math.log(1 + math.exp(2)))
    assert float(loss_sum(logits, labels)) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_matches_formula(schedule):
    base, warmup, total = 0.5, 3, 11
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base)
    scheduler = build_scheduler(optimizer, TrainConfig(lr=base, warmup_steps=warmup, schedule=schedule), total)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for step, lr in enumerate(seen):
        if step < warmup:
            want = base * step / warmup
        elif schedule == "cosine":
            want = base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        elif schedule == "linear":
            want = base * (total - step) / (total - warmup)
        else:
            want = base
        assert lr == pytest.approx(want, abs=1e-12), (schedule, step)


# ---------------------------------------------------------------------------------------- optimizer
class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.fc1(x)))


@pytest.mark.parametrize("ratio", [None, 16.0])
def test_optimizer_groups_loraplus_and_no_decay(ratio):
    torch.manual_seed(0)
    model = _Mlp()
    lorakit.inject(
        model,
        lorakit.LoraConfig(
            r=2, lora_alpha=4, target_modules=["fc1", "head"], bias="lora_only", modules_to_save=["norm"]
        ),
    )
    config = TrainConfig(lr=1e-3, weight_decay=0.1, loraplus_lr_ratio=ratio)
    optimizer = build_optimizer(model, config)
    placed = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    want = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(placed) == want  # every trainable parameter once, no frozen one
    for pid, group in placed.items():
        name = names[pid]
        is_b = name.split(".")[-1] == "lora_B" and name.split(".")[-3] == "adapters"
        is_vector = name.endswith(("bias", "norm.adapters.default.weight"))
        assert group["lr"] == pytest.approx(1e-3 * (ratio if (ratio and is_b) else 1.0)), name
        assert group["weight_decay"] == (0.0 if is_vector else 0.1), name
    # The fixture really has each kind: LoRA B, a trained bias, a norm weight.
    kinds = {n.split(".")[-1] for n in (names[p] for p in placed)}
    assert {"lora_A", "lora_B", "bias", "weight"} <= kinds
    assert optimizer.defaults["fused"]  # one fused kernel over every CPU float parameter


# ---------------------------------------------------------------------------------------- the loop
def test_loss_falls_on_memorisation(tmp_path):
    model = lora_llama()
    ids, _ = token_data(rows=4, seq=12)
    data = batches(ids, ids.clone(), batch_size=4)
    result = fit(
        model, data, cfg(lr=3e-2, max_steps=40, schedule="constant", weight_decay=0.0), tmp_path, batches_per_epoch=1
    )
    losses = [m["loss"] for m in metric_lines(tmp_path)]
    assert abs(losses[0] - math.log(64)) < 0.1  # a fresh LoRA is a no-op on a near-uniform model
    assert losses[-1] < 0.1 * losses[0]
    assert result.final_loss == losses[-1]
    assert result.steps == 40


def test_fit_flushes_denormals_while_it_trains_and_restores_the_mode(tmp_path):
    ids, _ = token_data(rows=4, seq=12)
    seen = []

    def flushing() -> bool:
        return float(torch.tensor([1e-40]) * 1.0) == 0.0  # a float32 subnormal, unless flushed

    for before in (False, True):
        torch.set_flush_denormal(before)
        try:
            fit(
                lora_llama(),
                batches(ids, ids.clone(), batch_size=4),
                cfg(max_steps=1),
                tmp_path / str(before),
                batches_per_epoch=1,
                on_step=lambda step, record: seen.append(flushing()),
            )
            assert flushing() == before
        finally:
            torch.set_flush_denormal(False)
    assert seen == [True, True]


def test_full_fine_tuning_trains_every_weight_and_saves_the_model(tmp_path):
    """No lorakit adapter: fit trains what requires grad (here every weight) through the same loop
    and writes the model directory; resuming it continues exactly, as for an adapter."""
    from transformers import LlamaForCausalLM

    ids, labels = token_data(rows=8)
    model = tiny_llama().requires_grad_(True)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = fit(model, batches(ids, labels, 4), cfg(save_every=2), tmp_path / "full", batches_per_epoch=2)
    assert result.adapter_dir is None and result.model_dir == tmp_path / "full" / "model"
    assert {"config.json", "model.safetensors"} <= {p.name for p in result.model_dir.iterdir()}
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters())  # every weight moved
    saved = LlamaForCausalLM.from_pretrained(result.model_dir)
    assert max_diff(dict(saved.named_parameters()), dict(model.named_parameters())) == 0
    assert (result.last_checkpoint / "trainer_state.safetensors").is_file()
    assert not (result.last_checkpoint / "adapter_config.json").exists()  # no adapter to write

    def crash(step, record):
        if step == 2:
            raise _Crash

    with pytest.raises(_Crash):  # the same run, killed after the step-2 checkpoint...
        fit(
            tiny_llama().requires_grad_(True),
            batches(ids, labels, 4),
            cfg(save_every=2),
            tmp_path / "split",
            batches_per_epoch=2,
            on_step=crash,
        )
    resumed = tiny_llama(seed=7).requires_grad_(True)  # ...and resumed on other weights: all come back
    again = fit(
        resumed, batches(ids, labels, 4), cfg(save_every=2), tmp_path / "split", batches_per_epoch=2, resume=True
    )
    assert again.resumed_from == 2 and again.steps == 4
    final = LlamaForCausalLM.from_pretrained(again.model_dir)
    assert max_diff(dict(final.named_parameters()), dict(saved.named_parameters())) <= 1e-6


def test_a_wrapped_injected_model_trains_and_saves_its_adapter(tmp_path):
    """A model injected, then wrapped (e.g. for a custom forward): the adapter is found inside."""

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **batch):
            return self.inner(**batch)

    ids, labels = token_data(rows=8)
    inner = lora_llama()
    result = fit(Wrapper(inner), batches(ids, labels, 4), cfg(save_every=2), tmp_path, batches_per_epoch=2)
    assert result.model_dir is None
    loaded = lorakit.load_adapter(tiny_llama(), result.adapter_dir)
    assert (
        max_diff(
            {n: p for n, p in loaded.named_parameters() if ".adapters." in n},
            {n: p for n, p in inner.named_parameters() if ".adapters." in n},
        )
        == 0
    )
    assert (result.last_checkpoint / "adapter_model.safetensors").is_file()


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    ids, labels = token_data(rows=8)
    small, big = lora_llama(), lora_llama()
    start = trainable(small)
    fit(small, batches(ids, labels, 2), cfg(grad_accum=2, batch_size=2), tmp_path / "a", batches_per_epoch=4)
    fit(big, batches(ids, labels, 4), cfg(grad_accum=1, batch_size=4), tmp_path / "b", batches_per_epoch=2)
    assert max_diff(trainable(small), start) > 1e-3  # it trained
    assert max_diff(trainable(small), trainable(big)) <= 1e-6
    loss_a = [m["loss"] for m in metric_lines(tmp_path / "a")]
    loss_b = [m["loss"] for m in metric_lines(tmp_path / "b")]
    assert loss_a == pytest.approx(loss_b, abs=1e-6)


def test_metrics_lines_and_eval(tmp_path):
    model = lora_llama()
    ids, labels = token_data(rows=8)
    seen = []

    def eval_fn(m):
        seen.append((m.training, torch.is_grad_enabled()))
        logits = m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return {"loss": float(loss_sum(logits, labels) / (labels[:, 1:] != -100).sum())}

    config = cfg(max_steps=5, warmup_steps=2, eval_every=2, lr=0.02)
    result = fit(model, batches(ids, labels, 4), config, tmp_path, batches_per_epoch=2, eval_fn=eval_fn)
    lines = metric_lines(tmp_path)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    for line in lines:
        assert {"step", "epoch", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(line)
        assert math.isfinite(line["loss"]) and line["tokens_per_s"] > 0 and line["grad_norm"] > 0
    assert [m["epoch"] for m in lines] == [0.5, 1.0, 1.5, 2.0, 2.5]
    for step, line in enumerate(lines):  # lr used by step s (0-based): warmup s/2, then cosine
        want = 0.02 * (step / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 3)))
        assert line["lr"] == pytest.approx(want, abs=1e-12)
    assert [m["step"] for m in lines if "eval_loss" in m] == [2, 4, 5]
    assert seen == [(False, False)] * 3
    assert model.training  # back in train mode
    assert result.eval_losses == [(m["step"], m["eval_loss"]) for m in lines if "eval_loss" in m]


def test_epochs_set_the_length_and_a_step_never_spans_two_epochs(tmp_path):
    ids, labels = token_data(rows=6)
    calls = []

    def data(epoch, start):
        calls.append((epoch, start))
        return batches(ids, labels, 2)(epoch, start)

    config = cfg(max_steps=None, epochs=2, grad_accum=2, batch_size=2)
    result = fit(lora_llama(), data, config, tmp_path, batches_per_epoch=3)
    assert result.steps == 4  # ceil(3 batches / 2) = 2 steps per epoch: 2 batches, then 1
    assert calls == [(0, 0), (1, 0)]
    assert [m["epoch"] for m in metric_lines(tmp_path)] == [round(2 / 3, 6), 1.0, round(1 + 2 / 3, 6), 2.0]
    with pytest.raises(TrainingError, match="ran out at batch 3 of epoch 0, but batches_per_epoch is 4"):
        fit(lora_llama(), data, config, tmp_path / "short", batches_per_epoch=4)


def test_checkpoint_files_atomic_keep_and_no_pickle(tmp_path):
    model = lora_llama()
    ids, labels = token_data(rows=8)
    fit(model, batches(ids, labels, 4), cfg(save_every=1, keep_checkpoints=2), tmp_path, batches_per_epoch=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-4"]  # no .tmp leftovers, 2 kept
    step4 = root / "step-4"
    assert sorted(p.name for p in step4.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
        "trainer_state.json",
        "trainer_state.safetensors",
    ]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle"
            assert path.suffix in {".json", ".jsonl", ".safetensors"}, path
    state = json.loads((step4 / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (4, 2, 0)
    tensors = read_tensors(step4 / "trainer_state.safetensors")
    assert tensors["rng.torch.0"].dtype == torch.uint8
    assert any(k.startswith("optimizer.") for k in tensors)
    for name, value in trainable(model).items():
        assert torch.equal(tensors[f"param.{name}"], value), name
    # The checkpoint's adapter is a normal PEFT-format adapter equal to the final one.
    assert (
        max_diff(
            read_tensors(step4 / "adapter_model.safetensors"),
            read_tensors(tmp_path / "adapter" / "adapter_model.safetensors"),
        )
        == 0
    )
    fresh = lorakit.load_adapter(tiny_llama(), step4)  # the checkpoint's adapter loads as the trained one
    assert (
        max_diff(
            {n: p for n, p in fresh.named_parameters() if ".adapters." in n},
            {n: p for n, p in model.named_parameters() if ".adapters." in n},
        )
        == 0
    )
    assert latest_checkpoint(tmp_path) == step4


def test_fresh_run_refuses_dir_with_checkpoints_and_resume_refuses_changed_config(tmp_path):
    ids, labels = token_data(rows=8)
    fit(lora_llama(), batches(ids, labels, 4), cfg(save_every=2), tmp_path, batches_per_epoch=2)
    with pytest.raises(TrainingError, match="resume=True"):
        fit(lora_llama(), batches(ids, labels, 4), cfg(save_every=2), tmp_path, batches_per_epoch=2)
    with pytest.raises(TrainingError, match=re.escape("lr: checkpoint 0.01, now 0.02")):
        fit(
            lora_llama(),
            batches(ids, labels, 4),
            cfg(save_every=2, lr=0.02),
            tmp_path,
            batches_per_epoch=2,
            resume=True,
        )


class _Crash(Exception):
    pass


def test_resume_in_process_equals_uninterrupted(tmp_path):
    ids, labels = token_data(rows=8)
    data = batches(ids, labels, 2)
    config = cfg(max_steps=6, save_every=3, batch_size=2, warmup_steps=1)  # 4 batches/epoch: crosses an epoch
    whole = lora_llama(dropout=0.1)
    fit(whole, data, config, tmp_path / "whole", batches_per_epoch=4)

    def crash(step, record):
        if step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        fit(lora_llama(dropout=0.1), data, config, tmp_path / "split", batches_per_epoch=4, on_step=crash)
    assert not (tmp_path / "split" / "adapter").exists()
    # A new process would have another LoRA init and another RNG state: both must come from the checkpoint.
    again = lora_llama(dropout=0.1, init_seed=99)
    torch.manual_seed(12345)
    result = fit(again, data, config, tmp_path / "split", batches_per_epoch=4, resume=True)
    assert result.resumed_from == 3 and result.steps == 6
    final = "adapter/adapter_model.safetensors"
    assert max_diff(read_tensors(tmp_path / "whole" / final), read_tensors(tmp_path / "split" / final)) <= 1e-6
    losses = [m["loss"] for m in metric_lines(tmp_path / "split")]
    assert [m["step"] for m in metric_lines(tmp_path / "split")] == [1, 2, 3, 4, 5, 6]
    assert losses == pytest.approx([m["loss"] for m in metric_lines(tmp_path / "whole")], abs=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = lora_llama()
    ids, labels = token_data(rows=8)
    calls = []

    def poison(module, args, output):  # the 4th forward (step 4) produces NaN logits
        calls.append(1)
        return output * float("nan") if len(calls) == 4 else output

    model.lm_head.register_forward_hook(poison)
    with pytest.raises(
        TrainingError, match=r"loss became nan at step 4; the last good checkpoint is checkpoints/step-3"
    ):
        fit(
            model,
            batches(ids, labels, 4),
            cfg(max_steps=6, save_every=1, keep_checkpoints=5),
            tmp_path,
            batches_per_epoch=2,
        )
    assert [n for n, _ in list_checkpoints(tmp_path)] == [1, 2, 3]
    assert not (tmp_path / "adapter").exists()
    saved = read_tensors(tmp_path / "checkpoints" / "step-3" / "trainer_state.safetensors")
    for name, value in trainable(model).items():  # the bad update was never applied
        assert torch.isfinite(value).all(), name
        assert torch.equal(saved[f"param.{name}"], value), name
    assert [m["step"] for m in metric_lines(tmp_path)] == [1, 2, 3]


def test_grad_checkpointing_gives_the_same_training(tmp_path):
    ids, labels = token_data(rows=8)
    plain, ckpt = lora_llama(dropout=0.1), lora_llama(dropout=0.1)
    fit(plain, batches(ids, labels, 4), cfg(), tmp_path / "a", batches_per_epoch=2)
    fit(ckpt, batches(ids, labels, 4), cfg(grad_checkpointing=True), tmp_path / "b", batches_per_epoch=2)
    assert is_grad_checkpointing(ckpt) and not is_grad_checkpointing(plain)
    assert not ckpt.model.gradient_checkpointing  # lorakit's own, not transformers' switch
    assert max_diff(trainable(plain), trainable(ckpt)) <= 1e-6


def test_classification_batches_train_on_logits(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config)
    lorakit.inject(
        model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    )
    ids = torch.randint(1, 64, (4, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}
    fit(
        model,
        lambda e, s: iter([batch][s:]),
        cfg(lr=5e-2, max_steps=30, weight_decay=0.0),
        tmp_path,
        batches_per_epoch=1,
    )
    losses = [m["loss"] for m in metric_lines(tmp_path)]
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------- subprocesses
SCRIPT = r'''
"""Train a tiny LLaMA with LoRA (dropout 0.1): the run the kill/interrupt tests drive."""
import argparse, math, random, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import lorakit
from lorakit.train import TrainConfig, fit

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--resume", action="store_true")
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--save-every", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                         target_modules=["q_proj", "v_proj", "up_proj", "lm_head"]))
gen = torch.Generator().manual_seed(1)
ids = torch.randint(0, 64, (10, 8), generator=gen)
labels = ids.clone()
for row in range(10):
    labels[row, : 1 + row % 3] = -100

def data(epoch, start):
    order = list(range(10))
    random.Random(f"7:{epoch}").shuffle(order)
    for index in range(start, 5):
        take = order[index * 2 : (index + 1) * 2]
        yield {"input_ids": ids[take], "attention_mask": torch.ones_like(ids[take]), "labels": labels[take]}

def slow(step, record):
    time.sleep(args.sleep)

cfg = TrainConfig(lr=1e-2, max_steps=args.steps, batch_size=2, grad_accum=2, warmup_steps=2,
                  save_every=args.save_every, keep_checkpoints=2)
try:
    result = fit(model, data, cfg, args.out, batches_per_epoch=5, resume=args.resume, on_step=slow, progress=False)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(130)
print("RESUMED_FROM", result.resumed_from, flush=True)
'''


def _run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the training process ended early (rc {proc.returncode}):\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the training process")
        time.sleep(0.05)


@pytest.mark.integration  # a training script in a child process, killed
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, str(script)]
    reference = subprocess.Popen(
        [*cmd, str(tmp_path / "ref")], env=_run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    victim = subprocess.Popen(
        [*cmd, str(tmp_path / "run"), "--sleep", "0.25"],
        env=_run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: len(list_checkpoints(tmp_path / "run")) >= 2, victim)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "adapter").exists()  # it really died before the end
    killed_at = list_checkpoints(tmp_path / "run")[-1][0]
    assert killed_at < 12

    resumed = subprocess.run(
        [*cmd, str(tmp_path / "run"), "--resume"], env=_run_env(), capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"RESUMED_FROM {killed_at}" in resumed.stdout
    _, ref_err = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_err
    final = "adapter/adapter_model.safetensors"
    diff = max_diff(read_tensors(tmp_path / "ref" / final), read_tensors(tmp_path / "run" / final))
    assert diff <= 1e-6
    assert [m["step"] for m in metric_lines(tmp_path / "run")] == list(range(1, 13))


@pytest.mark.integration  # a training script in a child process, killed
def test_sigint_saves_a_checkpoint_at_the_current_step(tmp_path):
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), "--sleep", "0.3", "--steps", "60", "--save-every", "1000"],
        env=_run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "INTERRUPTED" in stdout
    assert "interrupted: saved checkpoint" in stderr
    steps = [m["step"] for m in metric_lines(out)]
    saved = list_checkpoints(out)
    assert len(saved) == 1  # save_every=1000: this checkpoint exists only because of Ctrl-C
    step, path = saved[0]
    assert step == steps[-1] and 2 <= step < 60
    assert json.loads((path / "trainer_state.json").read_text())["step"] == step
    assert not (out / "adapter").exists()


def test_train_step_is_one_step_of_fit_and_without_an_optimizer_only_computes_gradients(tmp_path):
    """`train_step` alone: the step fit runs (the same parameters after one step), and with no
    optimizer the frozen model's floor: gradients, the token-normalised loss, no update."""
    from lorakit.train import build_optimizer, build_scheduler, train_step

    ids, labels = token_data(rows=4)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    by_fit, alone = lora_llama(), lora_llama()
    fit(by_fit, lambda epoch, start: iter([batch][start:]), cfg(max_steps=1), tmp_path, batches_per_epoch=1)
    config = cfg(max_steps=1)
    optimizer = build_optimizer(alone, config)
    torch.manual_seed(config.seed)  # fit seeds here, after building the optimizer
    result = train_step(alone, [batch], optimizer, build_scheduler(optimizer, config, 1), max_grad_norm=1.0)
    assert max_diff(trainable(alone), trainable(by_fit)) == 0
    assert result.loss == pytest.approx(metric_lines(tmp_path)[0]["loss"], rel=1e-12)

    floor = lora_llama()
    before = trainable(floor)
    result = train_step(floor, [batch], None)
    expected = loss_sum(floor(input_ids=ids).logits, labels).item() / int((labels[:, 1:] != -100).sum())
    assert result.loss == pytest.approx(expected, rel=1e-6) and math.isnan(result.grad_norm)
    assert max_diff(trainable(floor), before) == 0
    assert all(p.grad is not None for p in floor.parameters() if p.requires_grad)
