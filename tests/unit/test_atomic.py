"""`lorakit.atomic`: files and directories appear complete or not at all, with ordinary permissions."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit import atomic
from lorakit.errors import ConfigError, FileWriteError
from tests.faults import Faults


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


# ------------------------------------------------------------------ disk faults (issue 28)
# Every os.write / os.fsync under the folder is made to fail in turn (tests/faults.py): the old
# file or directory survives byte for byte, no temporary is left, and the error is a
# FileWriteError naming the file (a file inside a directory being built by its final path).
def _calls(folder: Path, write) -> list:
    with Faults(folder) as faults:
        write()
    return faults.ops


def test_write_file_failing_at_any_write_or_fsync_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    atomic.write_json(path, {"step": 1})
    before = path.read_bytes()
    ops = _calls(tmp_path, lambda: atomic.write_json(path, {"step": 2}))
    assert [op.label for op in ops] == ["write state.json", "fsync state.json", "fsync ./"]
    atomic.write_json(path, {"step": 1})
    for op in ops[:2]:  # before the rename: the old file stays
        with Faults(tmp_path, fail_at=op.index, error=errno.EIO), pytest.raises(FileWriteError) as caught:
            atomic.write_json(path, {"step": 2})
        assert path.read_bytes() == before and _leftovers(tmp_path) == ["state.json"]
        assert caught.value.errno == errno.EIO and caught.value.filename == str(path)
        assert str(caught.value) == f"cannot write {path}: Input/output error (EIO); the previous state.json is kept"
    with Faults(tmp_path, fail_at=3), pytest.raises(FileWriteError, match="its folder could not be synced"):
        atomic.write_json(path, {"step": 2})  # after the rename: the new file is whole
    assert json.loads(path.read_text()) == {"step": 2} and _leftovers(tmp_path) == ["state.json"]


def test_build_directory_failing_at_any_call_keeps_the_old_directory_or_makes_none(tmp_path):
    target = tmp_path / "out" / "adapter"

    def build(tmp: Path) -> None:
        atomic.write_text(tmp / "a.json", "new a")
        atomic.write_bytes(tmp / "b.bin", b"new b" * 1000)

    ops = _calls(tmp_path, lambda: atomic.build_directory(tmp_path / "count", build))
    assert len(ops) == 10  # 2 files x (write, fsync, folder fsync) + both again + the folder + the parent
    for replace in (False, True):
        if replace:
            atomic.build_directory(target, lambda tmp: (tmp / "a.json").write_text("old a"))
        for op in ops[:-1]:  # before the rename
            with Faults(tmp_path, fail_at=op.index), pytest.raises(FileWriteError) as caught:
                atomic.build_directory(target, build, replace=replace)
            if replace:
                assert _leftovers(target.parent) == ["adapter"] and _leftovers(target) == ["a.json"]
                assert (target / "a.json").read_text() == "old a"
                assert str(caught.value).endswith("; the previous adapter is kept")
            else:
                assert not (tmp_path / "out").exists()  # the parent it created is removed again
                assert str(caught.value).endswith(f"; {target} was not created")
            named = Path(caught.value.filename)
            assert named == target or named.parent == target, named  # never the temporary name
            assert "ENOSPC" in str(caught.value)


def test_a_failed_append_keeps_the_earlier_lines_and_leaves_no_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with atomic.open_append(path, truncate=True) as log:
        log.write('{"step": 1}\n')
        log.write('{"step": 2}\n')
        with Faults(tmp_path, fail_at=1), pytest.raises(FileWriteError, match="its earlier lines are kept"):
            log.write('{"step": 3, "loss": 1.25}\n')  # half of it reaches the disk, then ENOSPC
        log.write('{"step": 3}\n')
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_an_append_to_a_full_device_names_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.symlink_to("/dev/full")  # the kernel's own ENOSPC on every write
    with atomic.open_append(path, truncate=True) as log, pytest.raises(FileWriteError) as caught:
        log.write('{"step": 1}\n')
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value).startswith(f"cannot write {path}: No space left on device (ENOSPC)")


def test_clean_leftovers_removes_temporaries_and_puts_back_a_directory_moved_aside(tmp_path):
    (tmp_path / "adapter.json").write_text("kept")
    (tmp_path / ".adapter.json.ab12cd34.tmp").write_text("half")  # write_file killed
    (tmp_path / ".adapter.tmp-x1y2z3w4").mkdir()  # build_directory killed while building
    aside = tmp_path / ".model.old-4242-0a1b2c3d"  # killed between moving model aside and renaming
    aside.mkdir()
    (aside / "weights").write_text("old model")
    (tmp_path / ".summary.old-4242-00ff00ff").mkdir()  # its replacement arrived: removed
    (tmp_path / "summary").mkdir()
    (tmp_path / ".hidden").write_text("not ours")
    done = atomic.clean_leftovers(tmp_path)
    assert sorted(done) == [
        "removed .adapter.json.ab12cd34.tmp",
        "removed .adapter.tmp-x1y2z3w4",
        "removed .summary.old-4242-00ff00ff",
        "restored model",
    ]
    assert _leftovers(tmp_path) == [".hidden", "adapter.json", "model", "summary"]
    assert (tmp_path / "model" / "weights").read_text() == "old model"


def test_remove_directory_leaves_it_whole_or_gone_and_clean_leftovers_finishes_it(tmp_path, monkeypatch):
    folder = tmp_path / "step-2"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / name).write_text(name)

    def dies_midway(path, ignore_errors=False):
        next(Path(path).iterdir()).unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(shutil, "rmtree", dies_midway)
    with pytest.raises(SystemExit):
        atomic.remove_directory(folder)
    monkeypatch.undo()
    assert not folder.exists()
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".step-2.removing-")
    assert atomic.clean_leftovers(tmp_path) == [f"removed {left.name}"]
    assert not list(tmp_path.iterdir())
    atomic.remove_directory(folder)  # already gone: nothing to do
