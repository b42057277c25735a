"""Threads that share a machine (issue 28): OpenMP waiting set before torch loads, `--threads` everywhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lorakit.cli import build_parser, commands, main
from lorakit.threads import SPIN_COUNT

SHOW = "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), lorakit.threads.wait_policy())"


def _policy_after(imports: str, **env: str) -> str:
    """What a fresh interpreter's environment says after `imports`, with only `env` of the variables set."""
    drop = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LORAKIT_SHARED_CPU")
    clean = {k: v for k, v in os.environ.items() if k not in drop} | env
    code = f"import os; {imports}; import lorakit.threads; {SHOW}"
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_idle_threads_spin_briefly_by_default_and_sleep_at_once_when_shared() -> None:
    # Brief spinning keeps a process alone near full speed and lets two share (lorakit.threads).
    assert _policy_after("import lorakit, torch") == f"None {SPIN_COUNT} spin {SPIN_COUNT}"
    assert _policy_after("import lorakit, torch", LORAKIT_SHARED_CPU="1") == "PASSIVE None PASSIVE"


def test_a_users_setting_and_an_already_imported_torch_are_left_alone() -> None:
    shared = {"LORAKIT_SHARED_CPU": "1"}
    assert _policy_after("import lorakit", OMP_WAIT_POLICY="ACTIVE", **shared) == "ACTIVE None ACTIVE"
    assert _policy_after("import lorakit", GOMP_SPINCOUNT="50", **shared) == "None 50 spin 50"
    assert _policy_after("import torch, lorakit", **shared) == "None None torch"
    assert _policy_after("import torch, lorakit") == "None None torch"


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
