"""Atomic writes: a file or a whole directory appears complete or not at all.

Every file lorakit writes (adapters, checkpoints, metrics, JSON reports, plots, merged models, the
model cache) goes through here:

- `write_file` (and `write_bytes`, `write_text`, `write_json`): a temporary file in the same
  folder, written, flushed and fsynced, renamed over the target, the folder fsynced;
  `write_path` does the same for a writer that wants a file name (the `gguf` package's).
- `build_directory`: a temporary sibling directory filled by a callback, every file and folder in
  it fsynced, renamed to the target, the parent fsynced.
- `open_append`: a log written a whole record at a time (`metrics.jsonl`): each `write` appends all
  of its text or, on an error, nothing (the file is cut back to where it was).

A crash at any moment leaves the old file (or no directory) or the new one, never a partial one,
and no temporary file (nor a parent folder `build_directory` created) behind after an error; what
a kill leaves (`.NAME.*.tmp`, `.NAME.tmp-*`, `.NAME.old-*`) `clean_leftovers` removes, putting back
a directory that was moved aside to be replaced when its replacement never arrived. Files
get the permissions a plain `open()` or `mkdir()` would give them (those of the file replaced, or
`default_mode`: 0o666/0o777 less the umask), not the private 0o600/0o700 of `tempfile` — nor those
of a writer that makes its files private, as safetensors' `save_file` (0o600, so transformers'
`save_pretrained` too) does: every file and folder a `build_directory` callback leaves gets
`default_mode` before the rename.

A write that fails (a full disk, an I/O error: any `OSError`) raises `FileWriteError` naming the
file — inside a directory being built, by the path it would have had — and the OS error, and
saying what was kept. The bytes lorakit writes itself go through `os.write` and every sync through
`os.fsync`, one call each, so a test can make any one of them fail (`tests/faults.py` wraps the
two); third-party writers inside a `build_directory` callback or `write_path` (safetensors' Rust
writer in `save_pretrained`, the `gguf` package) write with their own calls, and their files'
failures surface at the fsync made here.

`check_target` refuses an output path that a write would fail on or must not replace; commands
call it before the slow part (loading a model), so a refused command writes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from lorakit.errors import ConfigError, FileWriteError, LorakitError

__all__ = [
    "AppendFile",
    "build_directory",
    "check_target",
    "clean_leftovers",
    "default_mode",
    "fsync_path",
    "open_append",
    "remove_directory",
    "write_bytes",
    "write_file",
    "write_json",
    "write_path",
    "write_text",
]


def check_target(path: str | os.PathLike, *, directory: bool = False, empty: bool = False, flag: str = "--out") -> Path:
    """Refuse an output path that a write would fail on or must not replace, before anything is written.

    Commands call it before they load a model (the function that writes calls it again), so a
    refused output costs nothing and changes nothing.

    Args:
        path: the file (replaced if it exists) or directory to write.
        directory: `path` is a directory (files are written into it, created if missing).
        empty: the directory is built whole (`build_directory`): it must not exist, or be empty.
        flag: how the message names the path.

    Returns:
        `path`, as a Path.

    Raises:
        ConfigError: a directory where a file is written; a file where a directory is; a non-empty
            directory with `empty`; a file among the folders above `path`; a folder the process may
            not write in.
    """
    path = Path(path)
    shown = f"{flag} {str(path)!r}"
    if path.is_dir():
        if not directory:
            raise ConfigError(f"{shown} is a directory; give the file to write; nothing was written")
        if empty and any(path.iterdir()):
            raise ConfigError(f"{shown} exists and is not empty; nothing was written")
    elif directory and (path.exists() or path.is_symlink()):
        raise ConfigError(f"{shown} exists and is not a directory; nothing was written")
    # The folder the write creates files in (a directory built whole is a sibling renamed into place).
    folder = path if directory and not empty and path.is_dir() else path.parent
    while not folder.exists():  # the nearest folder that exists: the missing ones are created
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{shown}: {str(folder)!r} is a file, not a folder; nothing was written")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{shown}: no permission to write in {str(folder)!r}; nothing was written")
    return path


def write_file(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write `path` atomically: `write(f)` fills a temporary file, which is fsynced and renamed.

    Args:
        path: the file to create or replace; its folder must exist.
        write: called once with the temporary file, opened for binary writing (buffered; its bytes
            reach the file through `os.write`).

    Returns:
        The path.

    Raises:
        FileWriteError: the file could not be written; the old one (if any) is kept, and the
            temporary file removed.
    """
    path = Path(path)
    mode = _mode_for(path)
    kept = _kept_note(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        f = io.BufferedWriter(_RawFile(fd))
        fd = -1  # the file object owns it now
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(err, path, kept) from None
        raise
    _sync_folder(path)
    return path


def write_path(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write `path` atomically with a writer that wants a file name rather than an open file.

    `write(tmp)` creates the temporary file `tmp` beside `path`; it is then given the mode
    `write_file` gives, fsynced and renamed over `path`, the folder fsynced. On any error the
    temporary file is removed and `path` is untouched.

    Args:
        path: the file to create or replace; its folder must exist.
        write: called once with the temporary file's path (the file exists, empty).

    Returns:
        The path.

    Raises:
        FileWriteError: the file could not be written (the old one, if any, is kept).
    """
    path = Path(path)
    mode = _mode_for(path)
    kept = _kept_note(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(err, path, kept) from None
        raise
    _sync_folder(path)
    return path


def write_error(err: OSError, path: Path, kept: str) -> OSError:
    """`err` as a `FileWriteError` naming `path` and saying what was `kept` (a `FileWriteError`
    from a write inside a directory being built is named again by `path`; any other error lorakit
    raised on purpose comes back as it is)."""
    if isinstance(err, LorakitError) and not isinstance(err, FileWriteError):
        return err
    code = err.errno
    reason = getattr(err, "reason", None)
    if reason is None and code is not None and err.strerror:
        reason = f"{err.strerror} ({errno.errorcode.get(code, code)})"
    elif reason is None:
        reason = str(err) or type(err).__name__
    error = FileWriteError(f"cannot write {path}: {reason}; {kept}")
    error.errno, error.strerror, error.filename = code, err.strerror, str(path)
    error.reason = reason  # type: ignore[attr-defined]
    return error


def _kept_note(path: Path) -> str:
    """What a failed write of `path` leaves: the old file, or nothing."""
    return f"the previous {path.name} is kept" if path.exists() else "nothing was written"


def _sync_folder(path: Path) -> None:
    """fsync the folder of `path`, just renamed into place."""
    try:
        fsync_path(path.parent)
    except OSError as err:
        raise write_error(err, path, "it is in place, but its folder could not be synced") from None


class _RawFile(io.RawIOBase):
    """An open file descriptor for `io.BufferedWriter`: every byte goes out through `os.write`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return os.write(self._fd, data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self._fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def truncate(self, size: int | None = None) -> int:
        size = self.tell() if size is None else size
        os.ftruncate(self._fd, size)
        return size

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


class AppendFile:
    """A log file (`metrics.jsonl`) written one whole record at a time (`open_append`).

    Each `write` appends all of its text with `os.write` or, when the disk refuses part of it,
    cuts the file back to where it was and raises `FileWriteError`: a failed record never leaves a
    torn line, and the records before it are kept. Nothing is buffered, so `flush` does nothing.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, text: str) -> int:
        """Append `text` whole, or nothing (raises `FileWriteError`). Returns its length."""
        data = text.encode("utf-8")
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:
            with contextlib.suppress(OSError):  # a device (/dev/full) cannot be cut back
                os.ftruncate(self._fd, start)
            raise write_error(err, self.path, "its earlier lines are kept") from None
        return len(text)

    def flush(self) -> None:
        """Nothing to do: each `write` reached the file."""

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> AppendFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_append(path: str | os.PathLike, *, truncate: bool = False) -> AppendFile:
    """Open `path` for whole-record appends (`AppendFile`), created if missing.

    Args:
        path: the log file; its folder must exist.
        truncate: start it empty (a fresh run's log).

    Raises:
        FileWriteError: it cannot be opened for writing.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
    try:
        fd = os.open(path, flags, default_mode())
    except OSError as err:
        raise write_error(err, path, "nothing was written") from None
    return AppendFile(path, fd)


def _mode_for(path: Path) -> int:
    """The mode a rewritten `path` gets: the replaced file's, else what a plain `open()` would give."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return default_mode()


def default_mode(*, directory: bool = False) -> int:
    """The mode a new file (0o666) or folder (0o777) gets from a plain `open()` or `mkdir()`: less the umask.

    Args:
        directory: the mode of a folder rather than of a file.

    Returns:
        The permission bits, e.g. 0o644 (a file) and 0o755 (a folder) under umask 022.
    """
    return (0o777 if directory else 0o666) & ~_umask()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `write_file`)."""
    return write_file(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` as UTF-8 to `path` atomically (see `write_file`)."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write `data` as JSON (non-JSON values through `str`) with a final newline, atomically."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def build_directory(
    target: str | os.PathLike,
    build: Callable[[Path], Any],
    *,
    replace: bool = False,
    keep_existing: Callable[[Path], bool] | None = None,
) -> Path:
    """Create directory `target` atomically: `build(tmp)` fills a temporary sibling that is renamed.

    Args:
        target: the directory to create; its parent is created if missing (and removed again if
            nothing could be built).
        build: fills the temporary directory it is given (write plain files: the whole tree is
            given `default_mode` and fsynced before the rename).
        replace: if `target` already exists, replace it (it is moved aside, then deleted once the
            new one is in place). Otherwise an existing `target` is an error, unless...
        keep_existing: ...this returns True for it: then another writer finished first with a
            complete copy, ours is discarded and theirs kept (a cache filled concurrently).

    Returns:
        The target path.

    Raises:
        FileExistsError: `target` exists and neither `replace` nor `keep_existing` allows it.
        FileWriteError: a file could not be written (named by the path it would have had in
            `target`); the previous `target`, if any, is kept.
    """
    target = Path(target)
    created = _make_folders(target.parent)
    try:
        return _build(target, build, replace, keep_existing)
    except BaseException:
        for folder in created:  # innermost first; a folder another writer filled meanwhile stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones created, innermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)  # another writer may create it meanwhile
    return missing


def _build(
    target: Path, build: Callable[[Path], Any], replace: bool, keep_existing: Callable[[Path], bool] | None
) -> Path:
    if not target.exists():
        kept = f"{target} was not created"
    elif target.is_dir() and not any(target.iterdir()):
        kept = f"{target} is left empty, as it was"
    else:
        kept = f"the previous {target.name} is kept"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    aside: Path | None = None
    try:
        try:
            tmp.chmod(default_mode(directory=True))  # mkdtemp's 0o700 would make the result private
            build(tmp)
            _give_default_modes(tmp)
            for path in sorted(tmp.rglob("*"), reverse=True):  # files, then their folders
                fsync_path(path)
            fsync_path(tmp)
        except OSError as err:
            raise write_error(err, _inside(target, tmp, err), kept) from None
        if replace and target.exists():
            aside = target.with_name(f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except OSError as err:
            if aside is not None:  # put the old directory back: nothing is lost
                os.rename(aside, target)
                aside = None
            # Linux refuses to rename onto an existing non-empty directory.
            if keep_existing is not None and target.is_dir() and keep_existing(target):
                return target
            if target.exists():
                raise FileExistsError(f"{target} already exists; nothing was written") from None
            raise write_error(err, target, kept) from None
        _sync_folder(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    return target


def _inside(target: Path, tmp: Path, err: OSError) -> Path:
    """The path in `target` of the file `err` names inside the temporary `tmp` (else `target`)."""
    name = getattr(err, "filename", None)
    if name:
        try:
            return target / Path(name).relative_to(tmp)
        except ValueError:
            pass
    return target


# `.NAME.<8>.tmp` (mkstemp), `.NAME.tmp-<8>` (mkdtemp), `.NAME.old-<pid>-<8 hex>` (moved aside),
# `.NAME.removing-<pid>-<8 hex>` (`remove_directory`).
_LEFTOVER = re.compile(
    r"\.(?P<name>.+?)(?:\.[a-z0-9_]{8}\.tmp|\.tmp-[a-z0-9_]{8}|(?P<old>\.old-\d+-[0-9a-f]{8})|\.removing-\d+-[0-9a-f]{8})"
)


def remove_directory(path: str | os.PathLike) -> None:
    """Delete directory `path` so that a kill at any moment leaves it whole or gone: renamed first
    (one atomic step) to a hidden `.NAME.removing-…` that `clean_leftovers` removes, then deleted.
    A directory deleted in place can be left with some of its files (checkpoint rotation did, twice
    in the 20 kills of benchmarks/reliability.py). A `path` already gone is not an error."""
    path = Path(path)
    doomed = path.with_name(f".{path.name}.removing-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def clean_leftovers(folder: str | os.PathLike) -> list[str]:
    """Remove what killed writes left in `folder`: temporary files and directories of `write_file`,
    `write_path` and `build_directory`, a directory `remove_directory` had begun to delete, and a
    directory `build_directory(replace=True)` moved aside
    — which is put back instead when its replacement never arrived (a kill between the two renames).

    Only names of exactly those forms are touched.

    Returns:
        What was done, one entry per leftover (`removed NAME`, `restored NAME`).
    """
    folder = Path(folder)
    done: list[str] = []
    if not folder.is_dir():
        return done
    for path in sorted(folder.iterdir()):
        match = _LEFTOVER.fullmatch(path.name)
        if match is None:
            continue
        original = folder / match.group("name")
        if match.group("old") and not original.exists():
            os.rename(path, original)
            done.append(f"restored {original.name}")
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        done.append(f"removed {path.name}")
    return done


def _give_default_modes(root: Path) -> None:
    """chmod every regular file and folder under `root` to `default_mode`: the callback's writers
    may have made them private (safetensors' `save_file` creates 0o600 files, `mkdtemp` 0o700
    folders). Symbolic links are left alone: chmod would follow them."""
    file_mode, folder_mode = default_mode(), default_mode(directory=True)
    for folder, folders, files in os.walk(root):
        for name in folders:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode)
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.chmod(path, file_mode)


# What fsync of a directory raises on filesystems that cannot do it: not a failed write.
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory (directories where the filesystem allows it).

    Raises:
        OSError: the sync failed (with `filename` set to `path`); a directory's only when its
            filesystem supports syncing one.
    """
    path = Path(path)
    is_dir = path.is_dir()
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if is_dir and err.errno in _NO_DIRECTORY_FSYNC:
            return
        if err.errno is not None and not err.filename:
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
