"""Measuring inside a child: burn-in, then a timed loop; the peak memory over it; compile counters.

Timing follows nanoGPT's bench.py: burn-in steps, then a timed loop where every step is bracketed
by device synchronisation (on CPU there is nothing to synchronise). Memory on CPU is the process's
peak resident set size (VmHWM) from after the first warm-up step to the end of the timed steps:
the kernel's peak counter is reset there (`/proc/self/clear_refs`, "5"), so model loading and
one-off first-step work (compiling) do not count, but everything the steps keep resident
(weights, optimiser state, gradients) and each step's transient peak (activations) do. On CUDA
it is `torch.cuda.max_memory_allocated` over the same span.
"""

from __future__ import annotations

import argparse
import gc
import re
import resource
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _flags import Row


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def reset_peak(device: str) -> bool:
    """Reset the peak-memory counter; False if the kernel refused (then the peak includes set-up)."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib(device: str) -> float:
    """Peak memory since `reset_peak`: CUDA allocated bytes, else the process's VmHWM, in MiB."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)\s+kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        return process_peak_mib()


def process_peak_mib() -> float:
    """Peak RSS of the whole process since it started (ru_maxrss, kB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step: Callable[[], Any], device: str, warmup: int, steps: int) -> list[float]:
    """Run `warmup` untimed steps, then `steps` timed ones, each bracketed by a device sync.

    Returns:
        The timed steps' durations in seconds.
    """
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def measure(step: Callable[[], Any], args: argparse.Namespace) -> dict[str, Any]:
    """Time `step` after burn-in and return the standard result of a child.

    The first warm-up step is timed on its own (`first_step_s`: lazy initialisation, or compile
    time under torch.compile); the peak-memory counter is reset after it, so one-off costs of the
    first step (tracing, compiling) are not counted, while everything the steps keep (optimiser
    state, gradients) and every step's transient peak is.

    Args:
        step: one step (forward, or forward + backward + optimiser).
        args: the parsed flags (device, warmup, steps).
    """
    result: dict[str, Any] = {}
    warmup = args.warmup
    if warmup > 0:
        t0 = time.perf_counter()
        step()
        sync(args.device)
        result["first_step_s"] = time.perf_counter() - t0
        warmup -= 1
    result["peak_since_setup"] = reset_peak(args.device)
    result["timings"] = {"step": time_steps(step, args.device, warmup, args.steps)}
    result["peak_mib"] = peak_mib(args.device)
    result["process_peak_mib"] = process_peak_mib()
    return result


def maybe_compile(model, row: Row, args: argparse.Namespace):
    """`torch.compile(model)` for rows with `params["compile"]` (and ≥ 2 warm-up steps), else `model`."""
    if not row.params.get("compile"):
        return model
    import torch
    import torch._dynamo

    torch._dynamo.reset()
    args.warmup = max(args.warmup, 2)  # the compiling step, then one compiled step
    return torch.compile(model)


def measure_row(step: Callable[[], Any], args: argparse.Namespace, row: Row) -> dict[str, Any]:
    """`measure`, plus dynamo's graph/graph-break counts for compiled rows.

    A compiled row that fails (in compiling or running) returns `{"error": ...}` with the
    exception, so the table shows it instead of the benchmark crashing.
    """
    compiled = bool(row.params.get("compile"))
    try:
        result = measure(step, args)
    except Exception as exc:
        if not compiled:
            raise
        traceback.print_exc()
        return {"error": f"torch.compile failed: {short_error(exc)}"}
    if compiled:
        from torch._dynamo.utils import counters

        breaks = dict(counters["graph_break"])
        result["graph_breaks"] = sum(breaks.values())
        result["break_reasons"] = [f"{n}× {reason}" for reason, n in list(breaks.items())[:10]]
        result["unique_graphs"] = counters["stats"].get("unique_graphs", 0)
    return result


def short_error(exc: BaseException) -> str:
    """One line: exception type and the first line of its message (clipped)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text[:300]
