"""Disk errors at any write (issue 28): a short training run, `merge`, `export` and `compress`, each
with one low-level write or fsync failing (ENOSPC or EIO, `tests/faults.py`).

A training run (`tests/tiny_run.py`: lock, run_config.json, metrics lines, two checkpoints, the
adapter, loss.png, summary.json — 70-odd calls) fails at a deterministic sample of its calls that
covers every kind of call on every file (`faults.sample`); `benchmarks/reliability.py --faults`
sweeps every one. What each fault must leave, and that `resume` then ends with the uninterrupted
run's adapter byte for byte, is `tests/train_faults.py`. The writers of merge, export and
compress fail at every one of their calls: an existing output stays byte for byte (a GGUF file) or
as it was (an empty `--out`), and nothing temporary is left.
"""

from __future__ import annotations

import copy
import errno
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.analysis.compress import compress
from lorakit.errors import FileWriteError
from lorakit.export import export_merged
from lorakit.export.gguf import export_gguf
from lorakit.models import load_tokenizer
from tests.conftest import randomize_adapters
from tests.faults import Faults, sample
from tests.tiny_run import threads_kept, tiny_data, tiny_model
from tests.train_faults import count_ops, fresh, inject, leftovers, reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return tiny_model(root / "model"), tiny_data(root / "data.jsonl")


@pytest.fixture(autouse=True)
def _threads():
    with threads_kept():  # train_run runs with threads=1
        yield


@pytest.mark.integration  # ~30 whole training runs and their resumes, in this process
def test_a_fault_at_any_kind_of_write_of_a_run_loses_nothing_and_resume_is_exact(tiny, tmp_path):
    model, data = tiny
    ref = reference(model, data, tmp_path / "ref")
    ops = count_ops(model, data, tmp_path / "count")
    chosen = sample(ops)
    labels = {op.label for op in ops}
    assert {op.label for op in chosen} == labels  # every kind of call on every file
    for needed in ("write lorakit.lock", "write metrics.jsonl", "write checkpoints/step-N/manifest.json",
                   "fsync adapter/adapter_config.json", "write loss.png", "fsync summary.json"):  # fmt: skip
        assert needed in labels
    outcomes = []
    for i, op in enumerate(chosen):
        code = errno.ENOSPC if i % 2 == 0 else errno.EIO
        outcomes.append(inject(op, model, data, fresh(tmp_path / "run"), ref, error=code))
    lost = [(o.op.index, o.op.label, o.error, o.lost) for o in outcomes if o.lost or not o.resumed]
    assert lost == [], lost
    assert len(outcomes) == len(chosen) >= 25


def _adapter(tmp_path: Path, model_dir: Path, seed: int) -> tuple[torch.nn.Module, Path]:
    """The tiny model with a random LoRA adapter (dropout 0.05), also saved to a directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=seed)
    folder = tmp_path / f"adapter-{seed}"
    lorakit.save_adapter(model, folder)
    return model, folder


def test_compress_failing_at_any_call_leaves_an_existing_empty_out_as_it_was(tiny, tmp_path):
    _, folder = _adapter(tmp_path, tiny[0], seed=1)
    out = tmp_path / "small"
    with Faults(tmp_path) as counting:
        compress(folder, tmp_path / "count", rank=2)
    ops = [op for op in counting.ops if op.path.startswith("count") or op.path.startswith(".count")]
    assert {op.label.split(" ")[0] for op in ops} == {"write", "fsync"}
    out.mkdir()
    for op in ops:
        with Faults(tmp_path, fail_at=op.index) as faults, pytest.raises(FileWriteError) as caught:
            compress(folder, out, rank=2)
        assert faults.injected is not None
        assert out.is_dir() and not any(out.iterdir())  # the empty --out, untouched
        assert leftovers(tmp_path) == [] and "ENOSPC" in str(caught.value)
        assert Path(caught.value.filename).is_relative_to(out)
        assert str(caught.value).endswith(f"; {out} is left empty, as it was")
    compress(folder, out, rank=2)  # and with room, it is written
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_export_failing_at_any_call_keeps_the_existing_gguf_file(tiny, tmp_path):
    first, _ = _adapter(tmp_path, tiny[0], seed=1)
    second, _ = _adapter(tmp_path, tiny[0], seed=2)
    out = tmp_path / "adapter.gguf"
    export_gguf(first, out)
    before = out.read_bytes()
    with Faults(tmp_path) as counting:
        export_gguf(second, tmp_path / "count.gguf")
    assert out.read_bytes() != (tmp_path / "count.gguf").read_bytes()  # the second export differs
    ops = counting.ops
    assert [op.label for op in ops] == ["fsync count.gguf", "fsync ./"]  # the gguf package writes its own bytes
    for op in ops[:1]:
        with Faults(tmp_path, fail_at=op.index, error=errno.EIO), pytest.raises(FileWriteError) as caught:
            export_gguf(second, out)
        assert out.read_bytes() == before and leftovers(tmp_path) == []
        assert str(caught.value).startswith(f"cannot write {out}: Input/output error (EIO); the previous adapter.gguf")


def test_merge_failing_at_any_call_writes_no_half_model(tiny, tmp_path):
    model, _ = _adapter(tmp_path, tiny[0], seed=1)
    tokenizer = load_tokenizer(str(tiny[0]))
    out = tmp_path / "merged"
    with Faults(tmp_path) as counting:
        export_merged(copy.deepcopy(model), tokenizer, tmp_path / "count")
    ops = counting.ops
    assert any(op.label == "fsync count/model.safetensors" for op in ops)
    for i, op in enumerate(ops[:-1]):  # before the rename
        if i % 2:
            out.mkdir(exist_ok=True)  # an empty --out given by the user stays as it was
        else:
            fresh(out)
        existed = out.exists()
        with Faults(tmp_path, fail_at=op.index) as faults, pytest.raises(FileWriteError) as caught:
            export_merged(copy.deepcopy(model), tokenizer, out)
        assert faults.injected is not None
        assert out.exists() == existed and (not existed or not any(out.iterdir()))
        assert leftovers(tmp_path) == [], leftovers(tmp_path)
        named = Path(caught.value.filename)
        assert named == out or named.parent == out, named
        kept = f"{out} is left empty, as it was" if existed else f"{out} was not created"
        assert str(caught.value).endswith(kept), caught.value
    plain = export_merged(copy.deepcopy(model), tokenizer, out)
    assert (plain / "model.safetensors").is_file()
