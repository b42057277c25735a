"""CPU threads that share a machine well: OpenMP threads that sleep instead of spinning, `--threads`.

torch's CPU kernels run on OpenMP threads, and GNU OpenMP's idle threads busy-wait for the next
parallel region by default. Two processes, each with as many threads as the machine has cores,
then spend their time spinning against each other: measured on 2 shared cores, a 64×576×1536
matmul ran at 12 iterations/s per process (two processes) instead of ~380 with passive waiting.
But passive waiting costs a process alone: `benchmarks/sharing.py` (batch 2×64 steps) measured
1.84 steps/s alone with spinning against 1.05 with passive waiting, and 0.30 against 0.92 each
for two concurrent processes. So it is opt-in: with `LORAKIT_SHARED_CPU=1` in the environment,
lorakit sets `OMP_WAIT_POLICY=PASSIVE` before torch is first imported (only then does OpenMP read
it), unless the user set a value. A program that imported torch before lorakit keeps torch's
setting. Setting `OMP_WAIT_POLICY=PASSIVE` yourself does the same.

Every `lorakit` command takes `--threads N` (torch's intra-op threads; default: torch's, one per
core). See docs/results.md, "Sharing the machine".
"""

from __future__ import annotations

import os
import sys

__all__ = ["WAIT_POLICY", "passive_waiting", "set_threads"]

WAIT_POLICY = "PASSIVE"


def passive_waiting() -> bool:
    """With `LORAKIT_SHARED_CPU=1`: ask OpenMP for sleeping idle threads, if torch is not imported
    yet and the user chose no policy.

    Returns:
        Whether the policy this process's OpenMP reads is passive.
    """
    if os.environ.get("LORAKIT_SHARED_CPU") == "1" and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == WAIT_POLICY


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads (None: leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


passive_waiting()
