"""Preference tuning through `fit` (`TrainConfig.method`): on a tiny random LLaMA with SmolLM2's
tokenizer and chat template, DPO, IPO and ORPO learn to rank held-out pairs and write a PEFT
adapter; accumulation gives one big batch; a run resumed from a checkpoint ends where an
uninterrupted one does; a precomputed reference trains the same; an initial adapter is the frozen
reference; bad input is refused before anything is written."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.data.preference import iterate_pair_batches, load_pairs, tokenize_pairs
from lorakit.errors import ConfigError, TrainingError
from lorakit.models import load_tokenizer
from lorakit.state import lora_layers
from lorakit.train import TrainConfig, fit
from lorakit.train.plot_preference import plot_preference
from lorakit.train.preference_step import (
    REFERENCE_ADAPTER,
    evaluate_pairs,
    precompute_reference,
    preference_step,
)
from tests.unit.test_train import max_diff, metric_lines, read_tensors

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def _records(n: int, offset: int = 0) -> list[dict]:
    """Pairs a tiny model can learn to rank: the chosen answer names the number, the rejected one refuses."""
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus one?"}],
            "chosen": [{"role": "assistant", "content": f"It is {i + 1}."}],
            "rejected": [{"role": "assistant", "content": "I cannot say, sorry."}],
        }
        for i in range(offset, offset + n)
    ]


@pytest.fixture(scope="module")
def data(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    for name, records in (("train", _records(12)), ("eval", _records(4, offset=50))):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    train = tokenize_pairs(load_pairs(folder / "train.jsonl", tokenizer=tok), tok, 64)
    held = tokenize_pairs(load_pairs(folder / "eval.jsonl", tokenizer=tok), tok, 64)
    return folder, train, held


def _base(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _policy(tok, *, dropout: float = 0.05, init_seed: int = 0):
    model = _base(tok)
    torch.manual_seed(init_seed)
    return lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))


def _cfg(**kw) -> TrainConfig:
    base = {"lr": 2e-2, "max_steps": 6, "batch_size": 4, "save_every": None, "method": "dpo", "beta": 0.5}
    return TrainConfig(**{**base, **kw})


def _batches(dataset, cfg: TrainConfig):
    return lambda epoch, start: iterate_pair_batches(dataset, cfg.batch_size, seed=cfg.seed, epoch=epoch, start=start)


@pytest.mark.parametrize("method", ["dpo", "ipo", "orpo"])
def test_each_method_learns_to_rank_held_out_pairs_and_writes_a_peft_adapter(tmp_path, tok, data, method):
    _, train, held = data
    model = _policy(tok)
    cfg = _cfg(method=method, max_steps=6, eval_every=4, beta=0.5 if method != "ipo" else 1.0)

    def evaluate(m):
        return evaluate_pairs(m, held, 4, method=method, beta=cfg.beta)

    before = evaluate(model)
    result = fit(model, _batches(train, cfg), cfg, tmp_path, batches_per_epoch=3, eval_fn=evaluate, progress=False)
    after = result.evals[-1]
    if method != "orpo":  # at the start the policy is its reference: every margin is 0, no pair ranked right
        assert before["margin"] == 0.0 and before["accuracy"] == 0.0
    assert after["eval_accuracy"] == 1.0 and after["eval_margin"] > before["margin"] + 0.01
    lines = metric_lines(tmp_path)
    assert [line["step"] for line in lines] == list(range(1, 7))
    for key in ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy"):
        assert all(math.isfinite(line[key]) for line in lines), key
    assert lines[-1]["margin"] == pytest.approx(lines[-1]["rewards_chosen"] - lines[-1]["rewards_rejected"])
    assert "eval_accuracy" in lines[3] and "eval_margin" in lines[5] and "eval_margin" not in lines[4]
    if method == "orpo":
        assert lines[-1]["nll"] < lines[0]["nll"]
    # An ordinary PEFT adapter: PEFT loads it into the base and computes lorakit's logits.
    ids = torch.tensor([held.chosen_ids[0]])
    theirs = PeftModel.from_pretrained(_base(tok), result.adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    png = plot_preference(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_accumulated_or_packed_micro_batches_give_the_gradient_of_one_big_padded_batch(tok, data):
    """Without dropout: packed and padded rows are different inputs to draw masks over, so no layout
    could draw the other's; the equality is of the computation."""
    _, train, _ = data
    model = _policy(tok, dropout=0.0)
    lorakit.set_adapter(model, "default")
    torch.manual_seed(1)
    for _, layer in lora_layers(model):  # B ≠ 0 so the policy is not the reference
        torch.nn.init.normal_(layer.adapters["default"].lora_B, std=0.2)

    def grads(micro):
        model.zero_grad(set_to_none=True)
        result = preference_step(model, micro, None, method="dpo", beta=0.5)
        return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, whole_grads = grads([train.collate([0, 1, 2, 3])])
    split, split_grads = grads([train.collate([0, 1]), train.collate([2, 3])])
    assert split.loss == pytest.approx(whole.loss, rel=1e-6)
    assert split.metrics == pytest.approx(whole.metrics, rel=1e-5, abs=1e-7)
    scale = max(g.abs().max().item() for g in whole_grads.values())
    assert max_diff(split_grads, whole_grads) <= 1e-6 * scale
    packed, packed_grads = grads([train.collate([0, 1, 2, 3], pack_to=64)])  # 8 sequences of 26-33 tokens
    assert packed.loss == pytest.approx(whole.loss, rel=1e-5)
    assert packed.metrics == pytest.approx(whole.metrics, rel=1e-4, abs=1e-6)
    assert packed.input_tokens == whole.input_tokens
    assert max_diff(packed_grads, whole_grads) <= 1e-5 * scale


class _Crash(Exception):
    pass


def test_a_resumed_run_ends_with_the_uninterrupted_adapter(tmp_path, tok, data):
    _, train, _ = data
    cfg = _cfg(max_steps=4, save_every=2, batch_size=2, grad_accum=2, warmup_steps=1)  # 6 batches, 3 steps an epoch
    fit(_policy(tok), _batches(train, cfg), cfg, tmp_path / "whole", batches_per_epoch=6, progress=False)

    def crash(step, record):
        if step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        fit(
            _policy(tok),
            _batches(train, cfg),
            cfg,
            tmp_path / "split",
            batches_per_epoch=6,
            on_step=crash,
            progress=False,
        )
    torch.manual_seed(999)  # another process: another RNG state and another LoRA init, both restored
    result = fit(
        _policy(tok, init_seed=7), _batches(train, cfg), cfg, tmp_path / "split", batches_per_epoch=6, resume=True,
        progress=False,
    )  # fmt: skip
    assert result.resumed_from == 2 and result.steps == 4
    final = "adapter/adapter_model.safetensors"
    assert max_diff(read_tensors(tmp_path / "whole" / final), read_tensors(tmp_path / "split" / final)) <= 1e-6
    whole, split = metric_lines(tmp_path / "whole"), metric_lines(tmp_path / "split")
    assert [m["step"] for m in split] == list(range(1, 5))
    for key in ("loss", "margin", "accuracy"):
        assert [m[key] for m in split] == pytest.approx([m[key] for m in whole], abs=1e-6)


def test_a_precomputed_reference_trains_the_same_adapter(tmp_path, tok, data):
    _, train, _ = data
    cfg = _cfg(max_steps=3)
    fit(_policy(tok), _batches(train, cfg), cfg, tmp_path / "live", batches_per_epoch=3, progress=False)
    model = _policy(tok)
    ref = precompute_reference(model, train, 5)
    assert ref.shape == (len(train), 2) and (ref < 0).all()
    stored = copy.copy(train)
    stored.reference = ref
    assert torch.equal(stored.collate([2, 0])["ref_logps"], torch.cat([ref[[2, 0], 0], ref[[2, 0], 1]]))
    fit(model, _batches(stored, cfg), cfg, tmp_path / "stored", batches_per_epoch=3, progress=False)
    final = "adapter/adapter_model.safetensors"
    # The reference's forward batched otherwise (5 pairs, not 4): float rounding only.
    assert max_diff(read_tensors(tmp_path / "live" / final), read_tensors(tmp_path / "stored" / final)) <= 1e-5
    live, pre = metric_lines(tmp_path / "live"), metric_lines(tmp_path / "stored")
    assert [m["loss"] for m in pre] == pytest.approx([m["loss"] for m in live], abs=1e-5)


def test_an_initial_adapter_is_the_frozen_reference_and_only_the_policy_trains(tmp_path, tok, data):
    _, train, held = data
    sft = _policy(tok)
    for _, layer in lora_layers(sft):
        torch.nn.init.normal_(layer.adapters["default"].lora_B, std=0.2)
    lorakit.save_adapter(sft, tmp_path / "sft")
    model = lorakit.load_adapter(_base(tok), tmp_path / "sft", "default", is_trainable=True)
    lorakit.load_adapter(model, tmp_path / "sft", REFERENCE_ADAPTER)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n}
    before = evaluate_pairs(model, held, 4, method="dpo", beta=0.5)
    # The policy starts as its reference (not as the base): every margin is exactly 0, the loss log 2.
    assert before["margin"] == 0.0 and before["loss"] == pytest.approx(math.log(2))
    against_base = copy.deepcopy(model)
    lorakit.delete_adapter(against_base, REFERENCE_ADAPTER)  # the reference would be the base: not 0
    assert abs(evaluate_pairs(against_base, held, 4, method="dpo", beta=0.5)["margin"]) > 1e-3
    result = fit(model, _batches(train, _cfg()), _cfg(), tmp_path / "run", batches_per_epoch=3, progress=False)
    now = {n: p.detach() for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n}
    assert initial.keys() == now.keys() and len(initial) == 2 * 2 * len(TARGETS)
    assert all(torch.equal(initial[n], now[n]) for n in initial)  # the reference never moved
    saved = read_tensors(result.adapter_dir / "adapter_model.safetensors")
    first = read_tensors(tmp_path / "sft" / "adapter_model.safetensors")
    assert saved.keys() == first.keys() and max_diff(saved, first) > 1e-3  # the policy did
    assert evaluate_pairs(model, held, 4, method="dpo", beta=0.5)["margin"] > 0


def test_dpo_without_an_adapter_or_a_stored_reference_is_refused(tmp_path, tok, data):
    _, train, _ = data
    model = _base(tok)
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(TrainingError, match="dpo and ipo need a reference"):
        preference_step(model, [train.collate([0, 1])], None, method="dpo", beta=0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "kto"}, "method must be one of 'sft', 'dpo', 'ipo', 'orpo', got 'kto'"),
        ({"method": "dpo", "beta": 0.0}, r"beta must be a finite number > 0 \(β of dpo\), got 0"),
        ({"method": "orpo", "beta": -1.0}, r"beta must be a finite number > 0 \(λ"),
        ({"method": "dpo", "label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"method": "sft", "precompute_ref": True}, "precompute_ref applies to dpo and ipo"),
    ],
    ids=["method", "beta", "lambda", "smoothing", "precompute-sft"],
)
def test_bad_preference_settings_are_config_errors_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_dir(tok, tmp_path_factory):
    """A transformers directory: the tiny LLaMA with SmolLM2's tokenizer (real chat template)."""
    folder = tmp_path_factory.mktemp("tiny")
    _base(tok).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("extra", "record", "message"),
    [
        ([], {"prompt": "q", "chosen": "a"}, "bad.jsonl, line 2: no field 'rejected'"),
        (["--beta", "0"], None, r"--beta must be a number > 0|beta must be a finite number > 0"),
        (["--method", "kto"], None, "argument --method: choose from sft, dpo, ipo, orpo; got 'kto'"),
        (["--train-on", "all"], None, "--train-on all: preference tuning scores only the answers"),
    ],
    ids=["missing-rejected", "beta", "method", "train-on"],
)
def test_bad_input_is_one_error_line_before_the_model_loads_and_nothing_is_written(
    tmp_path, tiny_dir, data, capsys, extra, record, message
):
    folder, _, _ = data
    source = folder / "train.jsonl"
    if record is not None:
        source = tmp_path / "bad.jsonl"
        source.write_text(json.dumps(_records(1)[0]) + "\n" + json.dumps(record) + "\n")
    out = tmp_path / "out"
    argv = ["train", "--method", "dpo", "--model", str(tiny_dir), "--data", str(source), "--out", str(out), *extra]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's refusal of a flag's value
        code = exit_.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and re.search(message, captured.err), captured.err
    assert "loading model" not in captured.out
    assert not out.exists() or not any(p.name != "lorakit.lock" for p in out.iterdir())


def test_init_adapter_flags_agree_with_its_config_when_they_name_the_same_modules():
    from lorakit.train.preference_run import _same_setting

    paths = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    assert _same_setting("target_modules", "q_proj,up_proj", paths)
    assert _same_setting("target_modules", ["up_proj", "q_proj"], paths)
    assert not _same_setting("target_modules", "q_proj", paths)  # up_proj would be left out
    assert not _same_setting("target_modules", "q_proj,up_proj,v_proj", paths)  # v_proj is not in the adapter
    assert not _same_setting("target_modules", "all-linear", paths)
    assert _same_setting("lora_dropout", 0.05, 0.05) and not _same_setting("lora_dropout", 0.1, 0.05)
