"""`lorakit.atomic`: files and directories appear complete or not at all, with ordinary permissions."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit import atomic
from lorakit.errors import ConfigError


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _fill(directory: Path, text: str) -> None:
    (directory / "weights.txt").write_text(text)
    (directory / "marker.json").write_text("{}")


def test_build_directory_renames_a_complete_directory(tmp_path):
    target = tmp_path / "cache" / "model"
    assert atomic.build_directory(target, lambda tmp: _fill(tmp, "ours")) == target
    assert (target / "weights.txt").read_text() == "ours"
    assert _leftovers(tmp_path / "cache") == ["model"]


def test_build_directory_keeps_a_concurrent_writers_copy(tmp_path):
    target = tmp_path / "cache" / "model"

    def build(tmp: Path) -> None:
        _fill(tmp, "ours")
        target.mkdir()  # another process finishes first, while we are still writing
        _fill(target, "theirs")

    assert atomic.build_directory(target, build, keep_existing=lambda p: (p / "marker.json").is_file()) == target
    assert (target / "weights.txt").read_text() == "theirs"
    assert _leftovers(tmp_path / "cache") == ["model"]


def test_build_directory_refuses_an_existing_target_unless_told_to_replace_it(tmp_path):
    target = tmp_path / "out"
    atomic.build_directory(target, lambda tmp: _fill(tmp, "first"))
    with pytest.raises(FileExistsError, match="already exists; nothing was written"):
        atomic.build_directory(target, lambda tmp: _fill(tmp, "second"))
    assert (target / "weights.txt").read_text() == "first"
    atomic.build_directory(target, lambda tmp: _fill(tmp, "second"), replace=True)
    assert (target / "weights.txt").read_text() == "second"
    assert _leftovers(tmp_path) == ["out"]  # neither the temporary nor the replaced copy is left


def test_build_directory_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "cache" / "model"

    def build(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.build_directory(target, build)
    assert _leftovers(tmp_path) == []  # nor the parent folder it created for the target


def test_build_directory_keeps_the_parent_folders_that_were_there(tmp_path):
    (tmp_path / "cache").mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        atomic.build_directory(tmp_path / "cache" / "new" / "model", _fail)
    assert _leftovers(tmp_path) == ["cache"] and _leftovers(tmp_path / "cache") == []


def _fail(tmp: Path) -> None:
    raise RuntimeError("disk full")


@pytest.mark.parametrize(
    ("where", "kind", "message"),
    [
        ("full", {"directory": True, "empty": True}, "exists and is not empty"),
        ("file.txt", {"directory": True}, "exists and is not a directory"),
        ("full", {}, "is a directory; give the file to write"),
        ("file.txt/out", {"directory": True}, "'{root}/file.txt' is a file, not a folder"),
        ("file.txt/a/b.gguf", {}, "'{root}/file.txt' is a file, not a folder"),
    ],
)
def test_check_target_refuses_what_a_write_would_fail_on(tmp_path, where, kind, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "kept.txt").write_text("kept")
    (tmp_path / "file.txt").write_text("kept")
    with pytest.raises(ConfigError, match=r"^--out '") as err:
        atomic.check_target(tmp_path / where, **kind)
    assert message.format(root=tmp_path) in str(err.value) and "nothing was written" in str(err.value)
    assert _leftovers(tmp_path) == ["file.txt", "full"]


def _as_unprivileged(call) -> str:
    """What `call()` raises, as 'Type: message', run by a user without root's override of file
    permissions: this process when it is not root, else a forked child switched to `nobody`."""

    def outcome() -> str:
        try:
            call()
        except Exception as err:  # reported to the parent
            return f"{type(err).__name__}: {err}"
        return "no error"

    if os.geteuid() != 0:
        return outcome()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, report, leave without running any of pytest's exit code
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, outcome().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    return said


def test_check_target_refuses_a_folder_it_may_not_write_in():
    root = Path(tempfile.mkdtemp())  # under /tmp, so that `nobody` can reach it when we are root
    try:
        root.chmod(0o755)
        (root / "locked").mkdir(mode=0o555)
        said = _as_unprivileged(lambda: atomic.check_target(root / "locked" / "out", directory=True, empty=True))
        assert said.startswith("ConfigError: --out '"), said
        assert f"no permission to write in '{root}/locked'" in said and "nothing was written" in said
        assert _leftovers(root) == ["locked"] and _leftovers(root / "locked") == []
    finally:
        shutil.rmtree(root)


def test_check_target_takes_what_a_write_can_create(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "analysis.json").write_text("{}")
    assert atomic.check_target(tmp_path / "empty", directory=True, empty=True) == tmp_path / "empty"
    atomic.check_target(tmp_path / "new" / "deeper", directory=True, empty=True)
    atomic.check_target(tmp_path / "full", directory=True)  # files are written into it
    atomic.check_target(tmp_path / "full" / "analysis.json")  # a file is replaced
    atomic.check_target(tmp_path / "new" / "model.gguf")
    assert _leftovers(tmp_path) == ["empty", "full"]  # checking creates nothing


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic.write_json(path, {"step": 1})

    def boom(_fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_json(path, {"step": 2})
    monkeypatch.undo()
    assert path.read_text() == '{\n  "step": 1\n}\n'
    assert _leftovers(tmp_path) == ["state.json"]


def _private_writers(directory: Path) -> None:
    """What a build callback may leave: safetensors' 0o600 file (as `save_pretrained` writes it), a
    0o700 folder holding a 0o600 file, and a link to a file outside the directory."""
    save_file({"w": torch.zeros(2)}, str(directory / "model.safetensors"))
    (directory / "shards").mkdir(mode=0o700)
    (directory / "shards" / "part.bin").write_bytes(b"x")
    os.chmod(directory / "shards" / "part.bin", 0o600)
    (directory / "outside").symlink_to(directory.parent / "outside.txt")


@pytest.mark.parametrize(
    ("umask", "file_mode", "folder_mode"),
    [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
    ids=["umask-022", "umask-077"],
)
def test_every_file_and_folder_gets_what_open_and_mkdir_give_under_the_umask(tmp_path, umask, file_mode, folder_mode):
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o604)
    old = os.umask(umask)
    try:
        assert atomic._umask() == umask  # read from /proc without changing it
        assert (atomic.default_mode(), atomic.default_mode(directory=True)) == (file_mode, folder_mode)
        atomic.write_text(tmp_path / "a.txt", "x")
        atomic.write_path(tmp_path / "b.gguf", lambda tmp: tmp.write_bytes(b"GGUF"))
        atomic.build_directory(tmp_path / "d", _private_writers)
        with open(tmp_path / "plain.txt", "w") as f:  # what lorakit's files must match
            f.write("x")
        os.mkdir(tmp_path / "plain")
        assert os.umask(umask) == umask  # lorakit's writes left the process umask as they found it
    finally:
        os.umask(old)
    assert atomic._umask() == old  # and _umask reads the current one
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "plain").stat().st_mode & 0o777 == folder_mode
    d = tmp_path / "d"
    for path in (tmp_path / "a.txt", tmp_path / "b.gguf", d / "model.safetensors", d / "shards" / "part.bin"):
        assert path.stat().st_mode & 0o777 == file_mode, path
    for path in (d, d / "shards"):
        assert path.stat().st_mode & 0o777 == folder_mode, path
    assert outside.stat().st_mode & 0o777 == 0o604  # a link's target is not ours to change


def test_write_path_replaces_atomically_keeps_the_mode_and_cleans_up(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic.write_path(target, fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]

    atomic.write_path(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o640  # the replaced file's mode, as write_file keeps it
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
