"""CPU threads that share a machine well: OpenMP threads that spin briefly, then sleep; `--threads`.

torch's CPU kernels run on OpenMP threads, and GNU OpenMP's idle threads busy-wait for the next
parallel region (300,000 spins with no policy set; practically forever with
`OMP_WAIT_POLICY=ACTIVE`). Two processes, each with as many threads as the machine has cores, then
spend their time spinning against each other. `benchmarks/sharing.py` on 2 cores (`lorakit train`,
batch 2x64; docs/results.md, "Sharing the machine"): spinning, 1.85-1.91 steps/s alone but 0.37-0.44
each for two processes; passive waiting (sleep at once), 0.92-1.01 each for two but 1.05-1.37 alone;
1,000 spins then sleep, 1.66-1.77 alone and 0.87-0.89 each for two.

So lorakit's default is `GOMP_SPINCOUNT=1000`, set before torch is first imported (only then does
OpenMP read it), unless the user chose `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` themselves. With
`LORAKIT_SHARED_CPU=1` it sets `OMP_WAIT_POLICY=PASSIVE` instead (the most a busy machine can
get); `OMP_WAIT_POLICY=ACTIVE` gives a process alone its last few percent. A program that imported
torch before lorakit keeps torch's setting. Other OpenMP runtimes (LLVM's, Intel's) ignore
`GOMP_SPINCOUNT`.

Every `lorakit` command takes `--threads N` (torch's intra-op threads; default: torch's, one per
core).
"""

from __future__ import annotations

import os
import sys

__all__ = ["SPIN_COUNT", "WAIT_POLICY", "passive_waiting", "set_threads", "wait_policy"]

WAIT_POLICY = "PASSIVE"
SPIN_COUNT = "1000"


def wait_policy() -> str:
    """Set lorakit's OpenMP waiting before torch loads, unless the user chose one.

    Returns:
        What this process's OpenMP reads: `"PASSIVE"`, `"ACTIVE"`, `"spin <N>"`, or `"torch"`
        when torch was imported before lorakit and the user set nothing.
    """
    env = os.environ
    user_chose = "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env
    if not user_chose and "torch" not in sys.modules:
        if env.get("LORAKIT_SHARED_CPU") == "1":
            env["OMP_WAIT_POLICY"] = WAIT_POLICY
        else:
            env["GOMP_SPINCOUNT"] = SPIN_COUNT
    policy = env.get("OMP_WAIT_POLICY", "").upper()
    if policy:
        return policy
    if "GOMP_SPINCOUNT" in env:
        return f"spin {env['GOMP_SPINCOUNT']}"
    return "torch"


def passive_waiting() -> bool:
    """Whether the policy this process's OpenMP reads is passive (idle threads sleep at once)."""
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == WAIT_POLICY


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads (None: leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


wait_policy()
