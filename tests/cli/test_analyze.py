"""`lorakit analyze` and `lorakit compress`: real processes on adapters saved from a tiny LLaMA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lorakit
from tests.conftest import randomize_adapters, tiny_llama

pytestmark = pytest.mark.integration  # the real `lorakit analyze` and `lorakit compress` commands

LORAKIT = Path(sys.executable).with_name("lorakit")


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(LORAKIT), *map(str, args)], capture_output=True, text=True, timeout=300, check=False)


def _adapter(folder: Path, r: int, seed: int) -> Path:
    model = tiny_llama()
    lorakit.inject(
        model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    )
    randomize_adapters(model, seed=seed)
    return lorakit.save_adapter(model, folder)


def test_analyze_and_compress_from_the_command_line(tmp_path: Path):
    a, b = _adapter(tmp_path / "a", 4, 1), _adapter(tmp_path / "b", 8, 2)
    done = _cli("analyze", a, "--compare", b, "--energy", 0.9, "--out", tmp_path / "report")  # ADAPTER positional
    assert done.returncode == 0, done.stderr
    assert "| q_proj | 2 | 4 |" in done.stdout and "suggested rank_pattern at 90%" in done.stdout
    data = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert len(data["modules"]) == 4 and data["energy"] == 0.9
    assert (tmp_path / "report" / "phi_v_proj.png").is_file()

    done = _cli("compress", a, "--rank", 2, "--out", tmp_path / "small")
    assert done.returncode == 0, done.stderr
    assert "ranks 2-2 over 4 modules" in done.stdout
    assert json.loads((tmp_path / "small" / "adapter_config.json").read_text())["r"] == 2

    done = _cli("compress", "--adapter", a, "--energy", 0.9)
    assert done.returncode == 2 and "--out is required" in done.stderr and "Traceback" not in done.stderr
    done = _cli("analyze", "--adapter", tmp_path / "nowhere")
    assert done.returncode == 2 and "nowhere" in done.stderr and "Traceback" not in done.stderr
