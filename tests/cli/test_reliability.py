"""Issue 28 through the real `lorakit train` (and `torchrun`): a full disk, a corrupted checkpoint,
two runs on one `--out`. Each failure is one line on stderr with exit code 2, never a traceback
(no complete checkpoint at all is refused in `tests/unit/test_checkpoint_manifest.py`).

The model is `tests/tiny_run.py`'s one-block LLaMA, so each process costs its start-up. The disk is
really full here: `metrics.jsonl` is a link to `/dev/full`, whose every write the kernel refuses
with ENOSPC (the in-process sweep over every write is `tests/unit/test_disk_faults.py`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.train.lock import LOCK_FILE, read_holder
from lorakit.train.run import train_run
from tests.cli.test_cli import ENV, LORAKIT
from tests.tiny_run import run_settings, threads_kept, tiny_data, tiny_model

pytestmark = pytest.mark.integration  # real lorakit and torchrun processes

TORCHRUN = Path(sys.executable).with_name("torchrun")
SETTINGS = {"eval_every": 4, "log_every": 3, "keep_checkpoints": 2}  # checkpoint 2 before the first metrics line


def _flags(model: Path, data: Path, out: Path, *extra: object) -> list[str]:
    """`lorakit train` flags for tests/tiny_run.py's run with SETTINGS."""
    run, lora, train = run_settings(model, data, out, **SETTINGS)
    flags = ["--model", run.model, "--data", run.data, "--out", run.out, "--samples", run.samples]
    flags += ["--eval-max-rows", run.eval_max_rows, "--seq-len", run.seq_len, "--threads", 1, "--no-progress"]
    flags += ["-r", lora.r, "--lora-alpha", lora.lora_alpha, "--lora-dropout", lora.lora_dropout]
    flags += ["--target", ",".join(lora.target_modules)]
    for name in ("max_steps", "batch_size", "lr", "warmup_steps", "save_every", "eval_every", "log_every", "seed"):
        flags += [f"--{name.replace('_', '-')}", getattr(train, name)]
    flags += ["--keep-checkpoints", train.keep_checkpoints]
    return [str(f) for f in (*flags, *extra)]


def _lorakit(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(LORAKIT), *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("lorakit train: error:")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, dict[str, bytes]]:
    """The tiny model and data, and the adapter files of the uninterrupted run (in this process)."""
    root = tmp_path_factory.mktemp("tiny")
    model, data = tiny_model(root / "model"), tiny_data(root / "data.jsonl")
    run, lora, train = run_settings(model, data, root / "ref", **SETTINGS)
    with threads_kept():
        train_run(run, lora, train, echo=lambda _line: None)
    adapter = {p.name: p.read_bytes() for p in (root / "ref" / "adapter").iterdir()}
    return model, data, adapter


def _adapter(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}


def _same(adapter: dict[str, bytes], reference: dict[str, bytes]) -> bool:
    """The same weights byte for byte, the same config (the CLI gives lora_alpha as 8.0, not 8)."""
    name = "adapter_config.json"
    return adapter.keys() == reference.keys() and all(
        adapter[k] == reference[k] if k != name else json.loads(adapter[k]) == json.loads(reference[k]) for k in adapter
    )


def test_a_full_disk_and_corrupted_checkpoints_through_lorakit_train(tiny, tmp_path):
    model, data, reference = tiny
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    full = _lorakit("train", *_flags(model, data, out))
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr and len(_error_lines(full.stderr)) == 1
    assert _error_lines(full.stderr)[0] == (
        f"lorakit train: error: cannot write {out / 'metrics.jsonl'}: No space left on device (ENOSPC); "
        "its earlier lines are kept; the newest complete checkpoint is step-2: once there is room, "
        f"`lorakit train --out {out} --resume` continues from it"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"] and not (out / "adapter").exists()
    assert not (out / LOCK_FILE).exists()

    (out / "metrics.jsonl").unlink()  # room again
    resumed = _lorakit("train", "--out", str(out), "--resume")  # the settings come from run_config.json
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} from step-2" in resumed.stdout
    assert _same(_adapter(out), reference)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [3, 4]

    # The latest checkpoint cut short: --resume falls back to step-2, says why in one warning line.
    weights = out / "checkpoints" / "step-4" / "adapter_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])
    again = _lorakit("train", "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr
    warned = [line for line in again.stderr.splitlines() if "incomplete" in line]
    assert warned == [
        f"lorakit: warning: checkpoint {out / 'checkpoints' / 'step-4'} is incomplete: adapter_model.safetensors "
        f"is 100 bytes, the manifest says {size:,}; resuming from step-2 instead; moved to "
        "checkpoints/step-4.incomplete"
    ]
    assert f"resuming {out} from step-2" in again.stdout and _same(_adapter(out), reference)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in ENV.items() if k not in ("MASTER_ADDR",)}
    head = [str(TORCHRUN), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    head += ["--master_port", str(_free_port()), "-m", "lorakit"]
    return subprocess.Popen([*head, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_on_one_out_the_second_is_refused_and_a_dead_runs_lock_is_taken_over(tiny, tmp_path):
    model, data, _ = tiny
    out = tmp_path / "run"
    first = subprocess.Popen(
        [str(LORAKIT), "train", *_flags(model, data, out, "--max-steps", "100000", "--save-every", "100000")],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while (read_holder(out / LOCK_FILE) or {}).get("pid") != first.pid:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run did not take the lock in 120 s"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # alive, holding its lock, and leaving the CPU to the others
        holder = read_holder(out / LOCK_FILE)
        assert holder["host"] == socket.gethostname() and "train" in holder["command"]
        # A second run, in one process and under torchrun (rank 0 asks, both ranks refuse).
        ranks = _torchrun("train", *_flags(model, data, out))
        second = _lorakit("train", *_flags(model, data, out))
        _, ranks_err = ranks.communicate(timeout=240)
        assert first.poll() is None  # still there, its lock untouched
        assert read_holder(out / LOCK_FILE)["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    message = (
        f"lorakit train: error: {out} is in use by a running lorakit training, PID {first.pid} on "
        f"{holder['host']} (started {holder['started']}): {holder['command']}; wait for it to finish or stop it, "
        "or choose another --out"
    )
    assert second.returncode == 2 and _error_lines(second.stderr) == [message], second.stderr
    assert "Traceback" not in second.stderr
    assert ranks.returncode != 0 and _error_lines(ranks_err) == [message, message], ranks_err[-3000:]

    # The first run was killed: its lock file stays, but no process holds it. The next run takes it
    # over with a warning, trains, and releases it. (Under torchrun, tests/cli/test_fsdp.py's runs
    # take and release it on rank 0.)
    assert read_holder(out / LOCK_FILE)["pid"] == first.pid
    third = _lorakit("train", *_flags(model, data, out, "--overwrite"))
    assert third.returncode == 0, third.stderr
    took = [line for line in third.stderr.splitlines() if "took over the lock" in line]
    assert took == [
        f"lorakit: warning: {out}: took over the lock left by PID {first.pid} on {holder['host']} "
        f"(started {holder['started']}), which no longer runs"
    ]
    assert not (out / LOCK_FILE).exists() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2", "step-4"]
