"""`lorakit.train.lock.run_lock` in one process (two real processes and torchrun:
`tests/cli/test_reliability.py`): the holder is named, a dead holder's lock is taken over with a
warning, a lock file that cannot be written stops the run, and nothing is left behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from lorakit.errors import FileWriteError, RunLockedError
from lorakit.train.lock import LOCK_FILE, read_holder, run_lock
from tests.faults import Faults


def test_the_holder_is_named_and_a_second_lock_is_refused(tmp_path):
    out = tmp_path / "new" / "run"
    with run_lock(out) as path:
        holder = read_holder(path)
        assert holder["pid"] == os.getpid() and holder["command"] == " ".join(sys.argv)
        refused = rf"PID {os.getpid()} on {holder['host']} \(started"
        with pytest.raises(RunLockedError, match=refused), run_lock(out):
            pass
        assert read_holder(path) == holder  # the refused attempt changed nothing
    assert not (tmp_path / "new").exists()  # the folders it made, empty again, are removed


def test_a_dead_processes_lock_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: its flock went with it
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": "elsewhere", "started": "earlier"}))
    said = rf"took over the lock left by PID {pid} on elsewhere \(started earlier\)"
    with pytest.warns(UserWarning, match=said), run_lock(tmp_path) as path:
        assert read_holder(path)["pid"] == os.getpid()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call", [1, 2])  # the write of the holder, its fsync
def test_a_lock_file_that_cannot_be_written_stops_before_anything_else(tmp_path, call):
    out = tmp_path / "run"
    with Faults(tmp_path, fail_at=call, error=errno.EIO), pytest.raises(FileWriteError) as caught, run_lock(out):
        pytest.fail("the run went on without its lock")
    assert str(caught.value).startswith(f"cannot write {out / LOCK_FILE}: Input/output error (EIO)")
    assert not out.exists()
