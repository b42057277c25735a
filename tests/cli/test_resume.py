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
from safetensors.torch import load_file

from tests.cli.test_cli import ENV, LORAKIT

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
