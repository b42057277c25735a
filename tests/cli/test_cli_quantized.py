"""`lorakit train --quantize nf4 --use-dora` (QDoRA), run for real on the packaged SmolLM2-135M,
and the commands that read such a run: `eval` rebuilds the NF4 base by default (`--quantize
auto`) or warns when told to use the full-precision one, `merge` writes the dequantized base plus
the adapter, PEFT loads the adapter on the full-precision base, and merging into another model
fails with one line, touching nothing.
"""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.models import ModelSource, load_model, load_source
from lorakit.quantization import quantization_of
from tests.cli.test_cli import BUNDLED, QUIET, Result, assert_one_error_line, cli, logits, printed, run

pytestmark = pytest.mark.integration  # the real `lorakit` command on an NF4 base

QDORA_FLAGS = ("--max-steps", 3, "--seq-len", 48, "--batch-size", 4, "--lr", 1e-2, "--warmup-steps", 1)
QDORA_FLAGS += ("-r", 8, "--lora-alpha", 16, "--target", "q_proj,v_proj", "--quantize", "nf4", "--use-dora")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cli-quantized")
    lines = (BUNDLED / "e2e_dev_sample.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (work / "dev16.jsonl").write_text("".join(lines[:16]), encoding="utf-8")
    (work / "bad").mkdir()
    (work / "bad" / "keep.txt").write_text("written before the run\n")
    return work


@pytest.fixture(scope="module")
def results(work) -> dict[str, Result]:
    """The QDoRA training run, then what reads it, two processes at a time."""
    run_dir, dev, bad = work / "run", work / "dev16.jsonl", work / "bad"
    trained = run(cli("train", "--data", "e2e", "--eval-data", dev, *QDORA_FLAGS, *QUIET, "--out", run_dir))
    later = {
        "eval": (cli("eval", "--adapter", run_dir, "--data", dev, "--seq-len", 48), ()),
        "eval-none": (cli("eval", "--adapter", run_dir, "--data", dev, "--seq-len", 48, "--quantize", "none"), ()),
        "merge": (cli("merge", "--adapter", run_dir, "--out", work / "merged"), ()),
        "merge-other-model": (
            # --out a new folder inside `bad`: the mismatch, found once the model loads, must leave no trace.
            cli("merge", "--model", "minilm-l6", "--task", "classification", "--adapter", run_dir, "--out", bad / "m"),
            (bad, run_dir),
        ),
    }
    with ThreadPoolExecutor(2) as pool:
        done = {key: pool.submit(run, argv, watch) for key, (argv, watch) in later.items()}
    return {"train": trained, **{key: future.result() for key, future in done.items()}}


@pytest.fixture(scope="module")
def trained(work, results) -> Path:
    proc = results["train"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work / "run"


@pytest.fixture(scope="module")
def batch(work) -> dict[str, torch.Tensor]:
    _, tokenizer, _ = load_model("smollm2-135m")
    rows = [json.loads(line) for line in (work / "dev16.jsonl").read_text().splitlines()[:2]]
    return dict(tokenizer([r["prompt"] + r["completion"] for r in rows], return_tensors="pt", padding=True))


@pytest.fixture(scope="module")
def on_nf4(trained) -> torch.nn.Module:
    """The run's adapter on the NF4 base it was trained on (`--quantize auto`), in this process."""
    model, _, _ = load_source(ModelSource(adapter=str(trained)))
    assert quantization_of(model) == "nf4"
    return model


@pytest.fixture(scope="module")
def full_precision() -> torch.nn.Module:
    model, _, _ = load_model("smollm2-135m")
    return model.eval()


def test_train_writes_a_peft_dora_adapter_that_records_its_nf4_base(trained, results):
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    with safe_open(str(trained / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata["lorakit.base_quantization"] == "nf4"
    magnitudes = [k for k in keys if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 60 and len(keys) == 3 * 60  # A, B and m for q and v in 30 layers
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.3


def test_eval_rebuilds_the_nf4_base_it_was_trained_on(results, trained):
    proc = results["eval"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "full-precision" not in proc.stderr
    summary = json.loads((trained / "summary.json").read_text())
    assert printed(proc.stdout)["loss"] == pytest.approx(summary["eval_loss_after"], abs=2e-4)


def test_eval_on_the_full_precision_base_warns_with_the_quantization_error(results):
    proc = results["eval-none"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    warning = next(line for line in proc.stderr.splitlines() if "full-precision" in line)
    assert "stored as nf4" in warning and "max |W − dequant(nf4(W))|" in warning
    loss = printed(proc.stdout)["loss"]
    assert abs(loss - printed(results["eval"].proc.stdout)["loss"]) > 1e-3  # another base, another loss


def test_merge_writes_the_dequantized_base_plus_the_adapter(results, work, on_nf4, full_precision, trained, batch):
    proc = results["merge"].proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged = AutoModelForCausalLM.from_pretrained(str(work / "merged"), local_files_only=True, dtype=torch.float32)
    merged_logits = logits(merged.eval(), batch)
    assert (merged_logits - logits(on_nf4, batch)).abs().max() <= 2e-3
    # Not merged into the original weights: those give the adapter another base.
    on_full = lorakit.load_adapter(copy.deepcopy(full_precision), trained / "adapter").eval()
    assert (merged_logits - logits(on_full, batch)).abs().max() > 5e-2


def test_peft_loads_the_adapter_on_the_full_precision_base(trained, full_precision, batch):
    ours = lorakit.load_adapter(copy.deepcopy(full_precision), trained / "adapter").eval()
    theirs = PeftModel.from_pretrained(copy.deepcopy(full_precision), str(trained / "adapter")).eval()
    assert (logits(ours, batch) - logits(theirs, batch)).abs().max() <= 1e-4


def test_merging_an_nf4_run_into_another_model_fails_and_touches_nothing(results, trained):
    result = results["merge-other-model"]
    assert_one_error_line(result.proc, "merge", "q_proj", "another base model", "bert.encoder")
    assert result.after == result.before
