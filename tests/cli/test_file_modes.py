"""Every file and folder a real `lorakit` process writes has the mode a plain `open()` / `mkdir()`
gives under the user's umask: training (the model cache, adapter, checkpoints, metrics, plot, JSON),
`merge` (transformers' `save_pretrained`, whose safetensors writer makes 0o600 files) and `export`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
LORAKIT = Path(sys.executable).with_name("lorakit")
ENV = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
UMASK = 0o027  # neither umask 022's 0o644 nor the private 0o600: the mode can only come from the umask
FILE_MODE, FOLDER_MODE = 0o640, 0o750


def test_every_file_lorakit_writes_has_the_umasks_mode(tmp_path: Path):
    env = {**ENV, "LORAKIT_CACHE": str(tmp_path / "cache")}  # a fresh model cache, built by the first run
    run = tmp_path / "run"
    train = ("train", "--data", "e2e", "--max-steps", 2, "--seq-len", 32, "--batch-size", 2, "--save-every", 1)
    train += ("-r", 4, "--lora-dropout", 0.05, "--target", "q_proj,v_proj", "--eval-max-rows", 4)
    commands = [
        (*train, "--samples", 0, "--threads", 1, "--no-progress", "--out", run),
        ("merge", run, "--out", tmp_path / "merged"),
        ("export", run, "--format", "gguf", "--out", tmp_path / "gguf" / "merged.gguf"),
        ("export", run, "--out", tmp_path / "gguf" / "adapter.gguf"),
    ]
    for args in commands:
        done = subprocess.run(
            [str(LORAKIT), *map(str, args)], env=env, umask=UMASK, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, (args[0], done.stderr[-2000:])

    written = sorted(p for p in tmp_path.rglob("*") if not p.is_symlink())
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    for expected in ("merged/model.safetensors", "run/adapter/adapter_model.safetensors", "gguf/merged.gguf"):
        assert expected in names
    assert any(name.startswith("cache/") and name.endswith("model.safetensors") for name in names)
    assert any(name.startswith("run/checkpoints/step-") for name in names)
    wrong = {
        p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777)
        for p in written
        if p.stat().st_mode & 0o777 != (FOLDER_MODE if p.is_dir() else FILE_MODE)
    }
    assert not wrong, f"not {oct(FILE_MODE)} (files) / {oct(FOLDER_MODE)} (folders) under umask {oct(UMASK)}"
