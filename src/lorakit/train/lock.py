"""The run lock: one training run at a time in an output directory.

`run_lock(out, info)` holds an exclusive `fcntl.flock` on `out/lorakit.lock` for as long as the run
goes on (under torchrun, rank 0 holds it and every rank learns whether it got it). The file says who
holds it — PID, host, start time, command line, as JSON — so a second run is refused with a
`RunLockedError` naming that process. The kernel drops a flock when its process ends, however it
ends, so a lock file left by a process that was killed is no lock: the next run takes it over, with a
warning naming the process that left it. Released at exit (the file removed, then unlocked; a run
that took a lock on a file someone just removed tries again, so two runs never both hold one).

The lock file is rewritten in place (it cannot be renamed over: the lock belongs to its inode), the
one file lorakit writes without `lorakit.atomic`'s temporary-and-rename; its content is only a
description of the holder, and a failed write of it stops the run before anything else is written.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lorakit.atomic import default_mode, write_error
from lorakit.errors import FileWriteError, RunLockedError
from lorakit.train.distributed import DistInfo, all_gather_bytes

__all__ = ["LOCK_FILE", "read_holder", "run_lock"]

LOCK_FILE = "lorakit.lock"
_AGREE_BYTES = 2048  # the longest refusal message every rank receives from rank 0


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, info: DistInfo | None = None) -> Iterator[Path]:
    """Hold the run lock of `out` for the `with` block (rank 0; every rank raises if it is refused).

    Args:
        out: the run's output directory (created if missing, with its parents; those created here
            are removed again on release if they are still empty).
        info: this process's place in the job (None: a single process). A collective when several
            ranks take part: call it on every rank.

    Yields:
        The lock file's path.

    Raises:
        RunLockedError: another live process holds the lock (its PID, host and start time named).
        FileWriteError: the lock file cannot be written.
    """
    info = info or DistInfo()
    out = Path(out)
    path = out / LOCK_FILE
    fd, created = -1, []
    failure: RunLockedError | FileWriteError | None = None
    if info.is_main:
        try:
            folder = out
            while not folder.exists():
                created.append(folder)  # innermost first
                folder = folder.parent
            out.mkdir(parents=True, exist_ok=True)
            fd = _acquire(path)
        except RunLockedError as err:
            failure = err
        except OSError as err:
            failure = write_error(err, path, "nothing was written")  # type: ignore[assignment]
        if failure is not None:
            _remove_empty(created)
    failure = _agree(failure, info)
    if failure is not None:
        raise failure
    try:
        yield path
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)
            _remove_empty(created)  # a run refused before writing leaves no folder


def _remove_empty(folders: list[Path]) -> None:
    """rmdir each of `folders` (innermost first) that is empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def read_holder(path: str | os.PathLike) -> dict[str, Any] | None:
    """What a lock file says about its holder (`pid`, `host`, `started`, `command`), or None."""
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _acquire(path: Path) -> int:
    """Lock `path` (creating it) and write our description into it; return the open descriptor."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, default_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd)
            os.close(fd)
            raise RunLockedError(_in_use(path.parent, holder)) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:  # released and removed meanwhile: again
                os.close(fd)
                continue
        except FileNotFoundError:
            os.close(fd)
            continue
        try:
            previous = _read_fd(fd)
            if previous and previous.get("pid") != os.getpid():
                warnings.warn(
                    f"{path.parent}: took over the lock left by {_describe(previous)}, which no longer runs",
                    stacklevel=4,
                )
            _write_fd(fd, json.dumps(_holder()) + "\n")
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)
            raise
        return fd


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _read_fd(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 1 << 16, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _write_fd(fd: int, text: str) -> None:
    """Replace the lock file's content in place (through `os.write`, then `os.fsync`)."""
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    view = memoryview(text.encode("utf-8"))
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _describe(holder: dict[str, Any]) -> str:
    return f"PID {holder.get('pid', '?')} on {holder.get('host', '?')} (started {holder.get('started', '?')})"


def _in_use(out: Path, holder: dict[str, Any] | None) -> str:
    who = _describe(holder) if holder else "another process (it has not written its PID yet)"
    command = f": {holder['command']}" if holder and holder.get("command") else ""
    return (
        f"{out} is in use by a running lorakit training, {who}{command}; "
        "wait for it to finish or stop it, or choose another --out"
    )


def _agree(failure: RunLockedError | FileWriteError | None, info: DistInfo) -> Exception | None:
    """Rank 0's outcome on every rank (a collective when several ranks take part): None, or the
    error to raise — rank 0's own, the same kind and message on the others."""
    if not info.enabled:
        return failure
    kinds: list[type[Exception] | None] = [None, RunLockedError, FileWriteError]
    data = str(failure).encode("utf-8")[:_AGREE_BYTES] if failure is not None else b""
    buffer = torch.zeros(_AGREE_BYTES + 3, dtype=torch.uint8)
    buffer[0] = kinds.index(type(failure) if failure is not None else None)
    buffer[1], buffer[2] = len(data) // 256, len(data) % 256
    if data:
        buffer[3 : 3 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    first = all_gather_bytes(buffer, info)[0]
    kind = kinds[int(first[0])]
    if kind is None or info.is_main:
        return failure
    length = int(first[1]) * 256 + int(first[2])
    return kind(bytes(first[3 : 3 + length].tolist()).decode("utf-8", errors="replace"))
