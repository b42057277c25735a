"""The one switch of the speed paths: `disabled()` (or `LORAKIT_KERNELS=0`) forces the reference.

Each path asks `enabled(name)` in its eligibility check, so inside `with lorakit.kernels.disabled():`
every layer runs the plain tensor operations of `lorakit.layers` and `lorakit.functional`.
`forced()` is the opposite block, for what measures or pins a path itself (`tests/kernels`,
benchmarks comparing a path on and off): every path may run inside it, whatever the environment
or an enclosing `disabled()` says.
`disabled("gated_mlp")` turns off one path only (benchmarks compare a path on and off). The state
is process-wide (as `torch.backends` flags): a block affects every thread while it is open.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PATHS", "disabled", "enabled", "forced"]

PATHS = ("fused_linear", "gated_mlp", "masked_input", "merged_weight", "nf4_dequant", "nf4_quant", "stacked_rows")
"""The speed paths by name (see the `lorakit.kernels` docstring for what each does)."""

_ALL = "all"
# Names of the disabled paths ("all": every one). A frozenset, so that torch.compile guards on it
# as a constant. LORAKIT_KERNELS=0 is read once, when lorakit is imported.
_off: frozenset[str] = frozenset({_ALL}) if os.environ.get("LORAKIT_KERNELS", "1").strip() == "0" else frozenset()


def enabled(path: str) -> bool:
    """Whether speed path `path` (one of `PATHS`) may run."""
    return not _off or (_ALL not in _off and path not in _off)


@contextmanager
def disabled(*paths: str) -> Iterator[None]:
    """Run the reference path inside the block: every speed path, or only those named.

    Example:
        >>> with lorakit.kernels.disabled():
        ...     reference = model(ids).logits        # plain autograd, PEFT-like memory

    Args:
        *paths: names from `PATHS`; none means all of them.

    Raises:
        ValueError: an unknown path name (the message lists the names).
    """
    global _off
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise ValueError(f"unknown kernel path(s) {unknown}; the paths are {', '.join(PATHS)}")
    before = _off
    _off = before | (frozenset(paths) if paths else frozenset({_ALL}))
    try:
        yield
    finally:
        _off = before


@contextmanager
def forced() -> Iterator[None]:
    """Let every speed path run inside the block, even under `LORAKIT_KERNELS=0` or `disabled()`.

    A `disabled(...)` opened inside the block still turns paths off. The tests of the kernels
    themselves run in this block, so the suite passes (and still pins each path) when the rest of it
    runs on the reference with `LORAKIT_KERNELS=0`.
    """
    global _off
    before = _off
    _off = frozenset()
    try:
        yield
    finally:
        _off = before
