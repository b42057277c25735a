"""`lorakit train` stopped with Ctrl-C names the command that continues it, and that command alone
(`--out X --resume`, no other flag) continues the run with the settings it was started with —
here a packaged recipe plus flags — to the adapter of an uninterrupted run (issue 24)."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import list_checkpoints
from tests.cli.test_cli import ENV, LORAKIT
from tests.unit.test_reporting import assert_reports_equal_metrics

pytestmark = pytest.mark.integration  # the real `lorakit train`, interrupted and resumed

# The quickstart recipe (lr, warmup, alpha, dropout 0.05) with smaller sizes: what --resume must recall.
FLAGS = ("--config", "quickstart", "--max-steps", "24", "--seq-len", "32", "--batch-size", "2")
FLAGS += ("--eval-max-rows", "4", "--samples", "0", "--save-every", "1000", "--threads", "1")


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_ctrl_c_prints_the_command_that_resumes_to_the_uninterrupted_adapter(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    # The reference: --resume on a folder with nothing in it says so and starts the run from step 0.
    reference = subprocess.Popen(
        [str(LORAKIT), "train", *FLAGS, "--no-progress", "--resume", "--out", str(ref)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    victim = subprocess.Popen(
        [str(LORAKIT), "train", *FLAGS, "--out", str(run)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while _lines(run / "metrics.jsonl") < 3:
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline, "no training steps in 300 s"
        time.sleep(0.1)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err
    (command,) = re.findall(r"`(lorakit train [^`]*)`", err.splitlines()[-1])
    assert command == f"lorakit train --out {shlex.quote(str(run))} --resume"
    stopped = json.loads(_last_line(run / "metrics.jsonl"))["step"]
    assert 3 <= stopped < 24 and not (run / "adapter").exists()

    resumed = subprocess.run(
        [str(LORAKIT), *shlex.split(command)[1:]], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from step-{stopped}" in resumed.stdout
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    assert f"--resume: no checkpoint in {ref} (nothing has run there yet): starting the run from step 0" in out

    config = json.loads((run / "run_config.json").read_text())
    assert config["train"]["lr"] == 1e-3 and config["lora"]["lora_dropout"] == 0.05  # the recipe's, recalled
    assert config["train"]["max_steps"] == 24 and config["run"]["seq_len"] == 32
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 25))
    ours = load_file(run / "adapter" / "adapter_model.safetensors")
    theirs = load_file(ref / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6


def _last_line(path: Path) -> str:
    return path.read_text().splitlines()[-1]


# Packed rows and length-grouped batches (issue 27): each run is killed (SIGKILL) mid-epoch and
# resumed with `--out X --resume` alone; the order of an epoch's batches depends only on (seed,
# epoch), so the resumed run reads exactly the batches it would have read, and ends with the
# uninterrupted run's adapter, bit for bit. The packed run also reports to TensorBoard and MLflow,
# whose records the resume writes again from metrics.jsonl.
BUCKETED = ("--max-steps", "8", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--warmup-steps", "2")
BUCKETED += ("--lora-dropout", "0.05", "--save-every", "2", "--eval-max-rows", "4", "--samples", "0")
BUCKETED += ("--threads", "1", "--no-progress")


@pytest.mark.parametrize(
    "mode",
    [
        ("--packing", "--seq-len", "128", "--report-to", "tensorboard,mlflow"),
        ("--group-by-length", "--seq-len", "64"),
    ],
    ids=["packing", "group-by-length"],
)
def test_sigkill_then_resume_ends_with_the_uninterrupted_adapter_bit_for_bit(tmp_path, mode):
    run, ref = tmp_path / "run", tmp_path / "ref"
    flags = [*BUCKETED, *(m for m in mode if m not in ("--report-to", "tensorboard,mlflow"))]
    reference = subprocess.Popen(
        [str(LORAKIT), "train", *flags, "--out", str(ref)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    victim = subprocess.Popen(
        [str(LORAKIT), "train", *BUCKETED, *mode, "--out", str(run)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not any(step >= 4 for step, _ in list_checkpoints(run)):
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline, "no checkpoint at step 4 in 300 s"
        time.sleep(0.05)
    victim.kill()
    out, _ = victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (run / "adapter").exists()
    killed_at = list_checkpoints(run)[-1][0]
    assert 4 <= killed_at < 8
    if "--packing" in mode:
        # The packing numbers: E2E rows of 25-70 tokens, about two to a row of 128.
        (line,) = [x for x in out.splitlines() if x.startswith("packing: ")]
        examples, rows = (
            int(n.replace(",", ""))
            for n in re.match(r"packing: ([\d,]+) examples .* into ([\d,]+) rows", line).groups()
        )
        assert rows < examples / 1.5 and re.search(r"\d+\.\d% full", line)

    resumed = subprocess.run(
        [str(LORAKIT), "train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from step-{killed_at}" in resumed.stdout
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    ours = load_file(run / "adapter" / "adapter_model.safetensors")
    theirs = load_file(ref / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 2 * 30  # A and B of q and v in 30 blocks
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
    config = json.loads((run / "run_config.json").read_text())["train"]
    assert config["packing"] == ("--packing" in mode) and config["group_by_length"] == ("--group-by-length" in mode)
    if "--report-to" in mode:
        assert_reports_equal_metrics(run, "FINISHED")
