"""`lorakit train --method dpo` as a user runs it, on a tiny LLaMA directory with SmolLM2's tokenizer
(its real chat template): killed with SIGKILL after a checkpoint and resumed with `--out X --resume`
alone, a run with `--precompute-ref` reads its stored reference and ends with the uninterrupted
run's adapter; under `torchrun` on two ranks it trains the adapter of one process (issue 29)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.models import load_tokenizer
from lorakit.train import list_checkpoints
from tests.cli.test_cli import ENV, LORAKIT
from tests.cli.test_ddp import TORCHRUN, _free_port

pytestmark = pytest.mark.integration  # real lorakit processes: killed, resumed, and under torchrun


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny LLaMA directory with SmolLM2's tokenizer, and 20 conversational pairs."""
    folder = tmp_path_factory.mktemp("pref")
    tok = load_tokenizer("smollm2-135m")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder / "model", safe_serialization=True)
    tok.save_pretrained(folder / "model")
    with (folder / "pairs.jsonl").open("w") as f:
        for i in range(20):
            record = {
                "prompt": [{"role": "user", "content": f"What is {i} plus one?"}],
                "chosen": [{"role": "assistant", "content": f"It is {i + 1}."}],
                "rejected": [{"role": "assistant", "content": "I cannot say, sorry."}],
            }
            f.write(json.dumps(record) + "\n")
    return folder


def _flags(work: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--method", "dpo", "--beta", "0.5", "--model", str(work / "model"),
        "--data", str(work / "pairs.jsonl"), "--seq-len", "64", "--batch-size", "2", "--lr", "2e-2",
        "--lora-dropout", "0.05", "--target", "q_proj,v_proj,up_proj", "--eval-max-rows", "4",
        "--samples", "1", "--threads", "1", "--no-progress", "--out", str(out), *extra,
    ]  # fmt: skip


def _tensors(path: Path) -> dict:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_a_killed_run_resumes_with_its_stored_reference_to_the_uninterrupted_adapter(work, tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    flags = ("--precompute-ref", "--max-steps", "40", "--save-every", "4")
    reference = subprocess.Popen(
        [str(LORAKIT), *_flags(work, ref, *flags)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    victim = subprocess.Popen(
        [str(LORAKIT), *_flags(work, run, *flags)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not list_checkpoints(run):
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline, "no checkpoint in 300 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert not (run / "adapter").exists()  # it died before the end
    killed_at = list_checkpoints(run)[-1][0]
    assert (run / "reference_logps.safetensors").is_file()

    resumed = subprocess.run(
        [str(LORAKIT), "train", "--out", str(run), "--resume", "--no-progress"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from step-{killed_at}" in resumed.stdout
    assert f"reference log-probabilities: read from {run / 'reference_logps.safetensors'}" in resumed.stdout
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    assert "training data: 18 preference pairs -> 18 kept" in out and "reference: the base (adapter off)" in out
    assert "reference log-probabilities: 20 pairs in" in out  # 18 training + 2 held out, computed once

    final = "adapter/adapter_model.safetensors"
    ours, theirs = _tensors(run / final), _tensors(ref / final)
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 41))
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["eval_before"]["margin"] == 0.0 and summary["eval_after"]["accuracy"] == 1.0
    assert (ref / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_torchrun_two_ranks_train_the_adapter_of_one_process(work, tmp_path):
    """17 training pairs in batches of 4 on 2 ranks, 2 micro-batches a step: the answers' tokens split
    unevenly, and the last batch of the epoch (1 pair) leaves rank 1 with none. No dropout: its masks
    depend on the ranks' shards."""
    flags = ("--max-steps", "4", "--batch-size", "4", "--grad-accum", "2", "--lora-dropout", "0", "--save-every", "100")
    flags += ("--eval-fraction", "0.15")
    env = {k: v for k, v in ENV.items() if k not in ("MASTER_ADDR",)}
    ddp = subprocess.Popen(
        [
            str(TORCHRUN), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "lorakit", *_flags(work, tmp_path / "ddp", *flags),
        ],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    single = subprocess.run(
        [sys.executable, "-m", "lorakit", *_flags(work, tmp_path / "single", *flags)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    _, err = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, err[-4000:]
    assert single.returncode == 0, single.stderr[-4000:]
    final = "adapter/adapter_model.safetensors"
    a, b = _tensors(tmp_path / "ddp" / final), _tensors(tmp_path / "single" / final)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 1e-3  # it trained
    ddp_lines = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one_lines = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ddp_lines] == [1, 2, 3, 4]
    for d, s in zip(ddp_lines, one_lines, strict=True):
        for key in ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy"):
            assert abs(d[key] - s[key]) <= 1e-5, key


def test_dpo_from_an_sft_adapter_with_checkpointing_starts_at_its_reference_and_moves_only_the_copy(work, tmp_path):
    """`--init-adapter DIR` as a user passes it (the same LoRA flags as the adapter's, accepted),
    with `--grad-checkpointing`: the reference is DIR frozen, so the evaluation before training
    finds every margin exactly 0 and the loss log 2; the policy moves, DIR's files stay as they were."""
    import math

    sft = tmp_path / "sft"
    first = subprocess.run(
        [str(LORAKIT), *_flags(work, sft, "--max-steps", "3", "--save-every", "100")],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-4000:]
    init = sft / "adapter"
    before = {p.name: p.read_bytes() for p in init.iterdir()}
    flags = ("--init-adapter", str(init), "--grad-checkpointing", "--max-steps", "3", "--save-every", "100")
    second = subprocess.run(
        [str(LORAKIT), *_flags(work, tmp_path / "dpo", *flags)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"from {init}" in second.stdout and "reference: the initial adapter, frozen as 'ref'" in second.stdout
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert summary["eval_before"]["margin"] == 0.0
    assert summary["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["eval_after"]["margin"] != 0.0
    assert {p.name: p.read_bytes() for p in init.iterdir()} == before
    final = "adapter/adapter_model.safetensors"
    ours, start = _tensors(tmp_path / "dpo" / final), _tensors(init / "adapter_model.safetensors")
    assert ours.keys() == start.keys()
    assert max(float((ours[k] - start[k]).abs().max()) for k in ours) > 1e-4  # the policy trained
