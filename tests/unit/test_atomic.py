"""`lorakit.atomic`: files and directories appear complete or not at all, with ordinary permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorakit import atomic


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
    assert _leftovers(tmp_path / "cache") == []


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


def test_new_files_and_directories_get_the_umasks_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
        atomic.build_directory(tmp_path / "d", lambda tmp: (tmp / "f").write_text("y"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


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
