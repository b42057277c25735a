"""A corrupted latest checkpoint (issue 28): every checkpoint carries `manifest.json` (each file's
size and SHA-256, written last); `resume` verifies it, falls back to the newest complete checkpoint
with a warning naming the file and what is wrong (the bad one set aside as `step-N.incomplete`),
and refuses with a `CheckpointError` naming every problem when none is complete. A checkpoint
written before manifests (trainer state version 1) resumes unverified, with a warning."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import CheckpointError
from lorakit.train import fit, list_checkpoints
from lorakit.train.checkpoint import MANIFEST, resumable, verify
from tests.unit.test_train import batches, cfg, lora_llama, metric_lines, token_data

ADAPTER = "adapter/adapter_model.safetensors"


class _Crash(Exception):
    pass


def _config():
    return cfg(max_steps=6, save_every=2, batch_size=2, warmup_steps=1)  # checkpoints 2, 4 (and 6)


def _data():
    ids, labels = token_data(rows=8)
    return batches(ids, labels, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(an uninterrupted run, a run stopped after step 5 with checkpoints 2 and 4), dropout 0.05."""
    root = tmp_path_factory.mktemp("runs")
    fit(lora_llama(dropout=0.05), _data(), _config(), root / "whole", batches_per_epoch=4)

    def crash(step, record):
        if step == 5:
            raise _Crash

    with pytest.raises(_Crash):
        fit(lora_llama(dropout=0.05), _data(), _config(), root / "stopped", batches_per_epoch=4, on_step=crash)
    return root / "whole", root / "stopped"


def _resume(out: Path):
    torch.manual_seed(999)  # a new process's RNG: everything must come from the checkpoint
    return fit(lora_llama(dropout=0.05, init_seed=7), _data(), _config(), out, batches_per_epoch=4, resume=True)


def _same_adapter(a: Path, b: Path) -> bool:
    x, y = load_file(a / ADAPTER), load_file(b / ADAPTER)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_the_manifest_lists_every_file_with_its_size_and_sha256(runs):
    step = runs[1] / "checkpoints" / "step-4"
    manifest = json.loads((step / MANIFEST).read_text())
    files = sorted(p.name for p in step.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == files and manifest["step"] == 4
    for name in files:
        data = (step / name).read_bytes()
        assert manifest["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((step / "trainer_state.json").read_text())["version"] == 2
    assert verify(step).complete and verify(step).problem is None


def _truncate(step: Path) -> str:
    path = step / "trainer_state.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    return f"trainer_state.safetensors is {size // 2:,} bytes, the manifest says {size:,}"


def _edit(step: Path) -> str:
    path = step / "trainer_state.json"
    text = path.read_text()
    start = text.index('"last_loss": ') + len('"last_loss": ')
    digit = "1" if text[start] != "1" else "2"
    path.write_text(text[:start] + digit + text[start + 1 :])  # same size, still a valid trainer state
    assert json.loads(path.read_text())["step"] == 4
    return "trainer_state.json does not match its checksum in the manifest (edited or damaged)"


def _delete(step: Path) -> str:
    (step / "adapter_model.safetensors").unlink()
    return "adapter_model.safetensors is missing"


def _no_manifest(step: Path) -> str:
    (step / MANIFEST).unlink()
    return "manifest.json is missing"


def _bad_manifest(step: Path) -> str:
    (step / MANIFEST).write_text('{"format": "lorakit-checkpoint-manifest", "files": ')
    return "manifest.json is unreadable"


@pytest.mark.parametrize("damage", [_truncate, _edit, _delete, _no_manifest, _bad_manifest])
def test_resume_falls_back_to_the_newest_complete_checkpoint_and_ends_exact(runs, tmp_path, damage):
    whole, stopped = runs
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    problem = damage(out / "checkpoints" / "step-4")
    with pytest.warns(UserWarning) as caught:
        result = _resume(out)
    said = [str(w.message) for w in caught if "incomplete" in str(w.message)]
    assert len(said) == 1, said
    assert said[0].startswith(f"checkpoint {out / 'checkpoints' / 'step-4'} is incomplete: {problem}")
    assert said[0].endswith("resuming from step-2 instead; moved to checkpoints/step-4.incomplete")
    assert result.resumed_from == 2 and result.steps == 6
    assert (out / "checkpoints" / "step-4.incomplete").is_dir()  # kept for a look
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]  # step-4 written again (keep_checkpoints 2)
    assert _same_adapter(out, whole)
    assert [m["loss"] for m in metric_lines(out)] == [m["loss"] for m in metric_lines(whole)]


def test_resume_refuses_when_no_checkpoint_is_complete_and_moves_nothing(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs[1], out)
    truncated = _truncate(out / "checkpoints" / "step-4")
    missing = _no_manifest(out / "checkpoints" / "step-2")
    with pytest.raises(CheckpointError) as caught:
        _resume(out)
    assert f"step-4: {truncated}; step-2: {missing}" in str(caught.value)
    assert str(caught.value).startswith(f"cannot resume {out}: no checkpoint is complete")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert not (out / "adapter").exists()


def test_a_checkpoint_from_before_manifests_resumes_unverified_with_a_warning(runs, tmp_path):
    whole, stopped = runs
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    step = out / "checkpoints" / "step-4"
    (step / MANIFEST).unlink()
    state = json.loads((step / "trainer_state.json").read_text())
    (step / "trainer_state.json").write_text(json.dumps({**state, "version": 1}, indent=1, sort_keys=True))
    with pytest.warns(UserWarning, match="written before lorakit kept checkpoint manifests") as caught:
        result = _resume(out)
    assert [str(w.message) for w in caught if "step-4" in str(w.message)] == [
        f"checkpoint {step} was written before lorakit kept checkpoint manifests (manifest.json): not verified"
    ]
    assert result.resumed_from == 4 and _same_adapter(out, whole)


def test_resumable_reads_only(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs[1], out)
    _delete(out / "checkpoints" / "step-4")
    with pytest.warns(UserWarning, match="adapter_model.safetensors is missing; resuming from step-2 instead$"):
        assert resumable(out) == out / "checkpoints" / "step-2"
    assert (out / "checkpoints" / "step-4").is_dir()  # not set aside without set_aside


def test_a_kill_while_an_old_checkpoint_is_deleted_leaves_it_whole_or_gone(tmp_path, monkeypatch):
    """Deleting `step-2` (rotation past keep_checkpoints) dies after its first file: no `step-2`
    missing files is left to be found, and the hidden remains are cleared on resume."""
    from lorakit import atomic
    from lorakit.train import checkpoint

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step-{step}").mkdir(parents=True)
        for name in ("adapter_model.safetensors", "trainer_state.json", MANIFEST):
            (root / f"step-{step}" / name).write_text("x")

    def dies_midway(path, ignore_errors=False):
        next(Path(path).iterdir()).unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", dies_midway)
    with pytest.raises(SystemExit):
        atomic.remove_directory(root / "step-2")  # how save_checkpoint rotates it out
    monkeypatch.undo()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4]
    assert not (root / "step-2").exists()
    assert any(p.name.startswith(".step-2") for p in root.iterdir())
    checkpoint.remove_partial(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-4"]
