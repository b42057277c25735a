"""Atomic writes: a file or a whole directory appears complete or not at all.

Every file lorakit writes (adapters, checkpoints, metrics, JSON reports, plots, merged models, the
model cache) goes through here:

- `write_file` (and `write_bytes`, `write_text`, `write_json`): a temporary file in the same
  folder, written, flushed and fsynced, renamed over the target, the folder fsynced;
  `write_path` does the same for a writer that wants a file name (the `gguf` package's).
- `build_directory`: a temporary sibling directory filled by a callback, every file and folder in
  it fsynced, renamed to the target, the parent fsynced.

A crash at any moment leaves the old file (or no directory) or the new one, never a partial one,
and no temporary file (nor a parent folder `build_directory` created) behind after an error. Files
get the permissions a plain `open()` or `mkdir()` would give them (those of the file replaced, or
`default_mode`: 0o666/0o777 less the umask), not the private 0o600/0o700 of `tempfile` — nor those
of a writer that makes its files private, as safetensors' `save_file` (0o600, so transformers'
`save_pretrained` too) does: every file and folder a `build_directory` callback leaves gets
`default_mode` before the rename.

`check_target` refuses an output path that a write would fail on or must not replace; commands
call it before the slow part (loading a model), so a refused command writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from lorakit.errors import ConfigError

__all__ = [
    "build_directory",
    "check_target",
    "default_mode",
    "fsync_path",
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
        write: called once with the temporary file, opened for binary writing.

    Returns:
        The path.
    """
    path = Path(path)
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
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
    """
    path = Path(path)
    mode = _mode_for(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    aside: Path | None = None
    try:
        tmp.chmod(default_mode(directory=True))  # mkdtemp's 0o700 would make the result private
        build(tmp)
        _give_default_modes(tmp)
        for path in sorted(tmp.rglob("*"), reverse=True):  # files, then their folders
            fsync_path(path)
        fsync_path(tmp)
        if replace and target.exists():
            aside = target.with_name(f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except OSError:
            if aside is not None:  # put the old directory back: nothing is lost
                os.rename(aside, target)
                aside = None
            # Linux refuses to rename onto an existing non-empty directory.
            if keep_existing is not None and target.is_dir() and keep_existing(target):
                return target
            if target.exists():
                raise FileExistsError(f"{target} already exists; nothing was written") from None
            raise
        fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    return target


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


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory (directories where the filesystem allows it)."""
    path = Path(path)
    is_dir = path.is_dir()
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    try:
        if is_dir:
            with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
                os.fsync(fd)
        else:
            os.fsync(fd)
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
