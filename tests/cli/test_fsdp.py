"""FSDP2: `torchrun --nproc_per_node 2 -m lorakit train --strategy fsdp` on the packaged SmolLM2-135M.

Real processes, the real CLI, a real model and E2E rows from ../shared/data. Dropout 0, so a run is
the same function of the data on any number of ranks: 2-rank FSDP must equal one process and 2-rank
DDP; a rank killed with SIGKILL stops the job; `--resume` (2 ranks, or 1 process) ends where an
uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.integration  # FSDP ranks under torchrun and the real `lorakit` command

LORAKIT = Path(sys.executable).with_name("lorakit")
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 6
FLAGS = (
    "--max-steps", STEPS, "--batch-size", 4, "--grad-accum", 2, "--seq-len", 48, "--lora-dropout", 0,
    "--save-every", 2, "--lr", 1e-3, "--warmup-steps", 1, "--samples", 0, "--threads", 1, "--no-progress",
)  # fmt: skip
TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _command(ranks: int, data: Path, out: Path, *extra: object) -> list[str]:
    train = ["train", "--data", data / "train.csv", "--eval-data", data / "dev.csv", *FLAGS, "--out", out, *extra]
    if ranks == 1:
        return [str(LORAKIT), *map(str, train)]
    head = [str(TORCHRUN), "--nnodes", "1", "--nproc_per_node", str(ranks)]
    head += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "lorakit"]
    return [*head, *map(str, train)]


def _start(ranks: int, data: Path, out: Path, *extra: object) -> subprocess.Popen:
    return subprocess.Popen(
        _command(ranks, data, out, *extra),
        env=_env(),
        cwd=data,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, (out + err)[-5000:]
    return out


def _tensors(path: Path) -> dict:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _max_diff(a: Path, b: Path) -> float:
    x, y = _tensors(a / "adapter_model.safetensors"), _tensors(b / "adapter_model.safetensors")
    assert sorted(x) == sorted(y)
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Uninterrupted runs: one process, 2-rank FSDP, 2-rank DDP (the same flags and data)."""
    root = tmp_path_factory.mktemp("fsdp")
    rows = (SHARED_DATA / "e2e" / "trainset.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "train.csv").write_text("".join(rows[:41]), encoding="utf-8")  # header + 40 rows
    dev = (SHARED_DATA / "e2e" / "devset.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "dev.csv").write_text("".join(dev[:5]), encoding="utf-8")
    single = _start(1, root, root / "single")
    fsdp = _start(2, root, root / "fsdp", "--strategy", "fsdp")
    _finish(fsdp)
    _finish(single)
    _finish(_start(2, root, root / "ddp", "--strategy", "ddp"))
    return root


def test_two_rank_fsdp_equals_one_process_and_ddp(runs):
    fsdp, single, ddp = runs / "fsdp" / "adapter", runs / "single" / "adapter", runs / "ddp" / "adapter"
    assert _max_diff(fsdp, single) <= 1e-5
    assert _max_diff(fsdp, ddp) <= 1e-5
    b = _tensors(fsdp / "adapter_model.safetensors")
    assert max(float(t.abs().max()) for k, t in b.items() if "lora_B" in k) > 1e-3  # it trained
    # The same files a single-process run writes: the adapter config too.
    assert json.loads((fsdp / "adapter_config.json").read_text()) == json.loads(
        (single / "adapter_config.json").read_text()
    )
    losses = [json.loads(x)["loss"] for x in (runs / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    single_losses = [json.loads(x)["loss"] for x in (runs / "single" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and max(abs(a - b) for a, b in zip(losses, single_losses, strict=True)) <= 1e-5

    # The checkpoints are sharded: one file per rank, beside a whole PEFT adapter.
    checkpoint = runs / "fsdp" / "checkpoints" / f"step-{STEPS}"
    shards = sorted(p.name for p in (checkpoint / "shards").iterdir())
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards)
    assert _max_diff(checkpoint, fsdp) == 0.0
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["strategy"] == "fsdp"
    assert not any(k.startswith("param.") for k in _tensors(checkpoint / "trainer_state.safetensors"))
    # Each rank's file holds its own rows of every trainable tensor: half of the whole.
    whole = sum(t.numel() for t in _tensors(fsdp / "adapter_model.safetensors").values())
    per_rank = [
        sum(t.numel() for k, t in _tensors(checkpoint / "shards" / name).items() if k.startswith("model."))
        for name in shards
    ]
    assert sum(per_rank) == whole and max(per_rank) <= whole * 0.51
    assert not list((runs / "fsdp" / "checkpoints").glob(".*"))  # no staging or temporary leftovers


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found.extend(int(c) for c in children)
    return found


def test_sigkill_of_a_rank_stops_the_job_and_resume_matches(runs):
    out = runs / "killed"
    job = _start(2, runs, out, "--strategy", "fsdp")
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoints" / "step-2").is_dir():
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers = _children(job.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    try:
        _, err = job.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("the surviving rank did not stop within 120 s of its peer's SIGKILL")
    assert job.returncode != 0
    assert "SIGKILL" in err or "exitcode  : -9" in err, err[-3000:]
    assert not (out / "adapter").exists()
    copy = runs / "killed-copy"
    shutil.copytree(out, copy)

    # Resume on the same 2 ranks: the adapter of the uninterrupted run.
    _finish(_start(2, runs, out, "--strategy", "fsdp", "--resume"))
    assert _max_diff(out / "adapter", runs / "fsdp" / "adapter") <= 1e-6

    # Resume the same checkpoint in one process: the shards are read whole, and the run ends the same.
    _finish(_start(1, runs, copy, "--resume"))
    assert _max_diff(copy / "adapter", runs / "fsdp" / "adapter") <= 1e-5


def test_a_one_process_checkpoint_resumes_on_two_fsdp_ranks(runs):
    out = runs / "single-then-fsdp"
    shutil.copytree(runs / "single", out)
    # As if the one-process run had been killed after step 4: its last checkpoint and outputs gone.
    shutil.rmtree(out / "checkpoints" / f"step-{STEPS}")
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    _finish(_start(2, runs, out, "--strategy", "fsdp", "--resume"))
    assert _max_diff(out / "adapter", runs / "single" / "adapter") <= 1e-5
    assert (out / "checkpoints" / f"step-{STEPS}" / "shards").is_dir()  # from there on, sharded
