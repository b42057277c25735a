"""Threads that share a machine (issue 28): passive OpenMP waiting set before torch loads, `--threads` everywhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lorakit.cli import build_parser, commands, main


def _policy_after(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_passive_waiting_is_opt_in() -> None:
    code = "import os, lorakit, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _policy_after(code) == "None"  # alone, spinning threads are faster (lorakit.threads)
    assert _policy_after(code, LORAKIT_SHARED_CPU="1") == "PASSIVE"


def test_a_users_policy_and_an_already_imported_torch_are_left_alone() -> None:
    code = "import os, lorakit, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _policy_after(code, OMP_WAIT_POLICY="ACTIVE", LORAKIT_SHARED_CPU="1") == "ACTIVE"
    torch_first = "import os, torch, lorakit; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _policy_after(torch_first, LORAKIT_SHARED_CPU="1") == "None"


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_takes_threads(name: str) -> None:
    args = build_parser().parse_args([name, "--threads", "3"])
    assert args.threads == 3
    if commands()[name].has_threads_field:
        return  # train and serve check their own field (TrainRun / ServeConfig) with their other settings
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([name, "--threads", "0"])
    assert exit_.value.code == 2


def test_threads_applies_before_a_command_runs(tmp_path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello there"}\n')
    before = torch.get_num_threads()
    try:
        target = 1 if before != 1 else 2
        assert main(["data", "preview", "--data", str(data), "--threads", str(target), "-n", "1"]) == 0
        assert torch.get_num_threads() == target
    finally:
        torch.set_num_threads(before)
