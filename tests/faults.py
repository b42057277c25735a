"""Fault injection at the edge: the k-th low-level write or fsync under a folder raises an OSError.

lorakit writes every byte of its own through `os.write` and syncs every file and folder through
`os.fsync` (`lorakit.atomic`). `Faults(root, fail_at=k)` wraps those two functions of the `os`
module for the length of a `with` block and counts the calls whose file descriptor points under
`root` (read from `/proc/self/fd`); the k-th one fails like a full disk (ENOSPC, or EIO): a write
first writes half its bytes — as a write cut short by the disk does — then raises. Every other
call goes through untouched. With `fail_at=None` it only counts: `ops` lists every write and sync
of the block in order, each with its file (`label` names the file as the run means it, temporary
names and step numbers taken out), which is what a sweep over every k needs.

Third-party writers called inside `lorakit.atomic.build_directory` or `write_path`
(safetensors' Rust writer in `save_pretrained`, the `gguf` package) write with their own calls,
which are not seen here; their files are fsynced through `os.fsync`, so a fault still lands on
each of them there.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Faults", "Op", "label", "sample"]


@dataclass(frozen=True)
class Op:
    """One low-level call under the root: 1-based `index`, `kind` ("write" or "fsync") and the
    file's path relative to the root (a folder's ends with "/")."""

    index: int
    kind: str
    path: str

    @property
    def label(self) -> str:
        return f"{self.kind} {label(self.path)}"


# lorakit.atomic's temporary names: `.NAME.<8>.tmp` files, `.NAME.tmp-<8>` folders.
_TMP_FILE = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp$")
_TMP_DIR = re.compile(r"\.(.+)\.tmp-[a-z0-9_]{8}$")


def label(path: str) -> str:
    """The file a path means, whatever temporary name it is written under:
    `checkpoints/.step-4.tmp-x1y2z3w4/.adapter_model.safetensors.a1b2c3d4.tmp` ->
    `checkpoints/step-N/adapter_model.safetensors`."""
    parts = []
    for part in path.split("/"):
        for pattern in (_TMP_FILE, _TMP_DIR):
            match = pattern.fullmatch(part)
            if match:
                part = match.group(1)
        parts.append(re.sub(r"^step-\d+$", "step-N", part))
    return "/".join(parts)


class Faults:
    """Count (and make one of) the `os.write` / `os.fsync` calls on files under `root` fail.

    Args:
        root: only calls on files and folders under it count.
        fail_at: the 1-based index of the call that fails; None: none fails.
        error: the errno it fails with (ENOSPC, EIO, ...).

    Attributes:
        ops: every counted call, in order.
        injected: the call that failed, once it has.
    """

    def __init__(self, root: str | os.PathLike, fail_at: int | None = None, error: int = errno.ENOSPC) -> None:
        self.root = os.path.realpath(root)
        self.fail_at = fail_at
        self.error = error
        self.ops: list[Op] = []
        self.injected: Op | None = None
        self._saved: tuple[Any, Any] | None = None

    def __enter__(self) -> Faults:
        real_write, real_fsync = os.write, os.fsync
        self._saved = (real_write, real_fsync)

        def write(fd: int, data: Any) -> int:
            if self._fails("write", fd):
                view = memoryview(data).cast("B")
                if len(view) > 1:
                    real_write(fd, view[: len(view) // 2])  # the disk took part of it
                raise OSError(self.error, os.strerror(self.error))
            return real_write(fd, data)

        def fsync(fd: Any) -> None:
            if self._fails("fsync", fd if isinstance(fd, int) else fd.fileno()):
                raise OSError(self.error, os.strerror(self.error))
            return real_fsync(fd)

        os.write, os.fsync = write, fsync
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved is not None
        os.write, os.fsync = self._saved
        self._saved = None

    def _fails(self, kind: str, fd: int) -> bool:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False
        if target != self.root and not target.startswith(self.root + os.sep):
            return False
        relative = os.path.relpath(target, self.root)
        if os.path.isdir(target):
            relative += "/"
        op = Op(len(self.ops) + 1, kind, relative)
        self.ops.append(op)
        if op.index == self.fail_at:
            self.injected = op
            return True
        return False


def sample(ops: list[Op]) -> list[Op]:
    """A deterministic subset of `ops` that still covers every kind of call on every file: the
    first call of each label (step numbers taken out), the first call inside each later checkpoint
    (a fault with an earlier checkpoint that must survive), and the last call."""
    chosen: dict[int, Op] = {}
    seen: set[str] = set()
    steps: set[str] = set()
    for op in ops:
        step = re.search(r"\.step-(\d+)\.tmp-", op.path)
        if op.label not in seen or (step and step.group(1) not in steps):
            chosen[op.index] = op
        seen.add(op.label)
        if step:
            steps.add(step.group(1))
    chosen[ops[-1].index] = ops[-1]
    return [chosen[i] for i in sorted(chosen)]
