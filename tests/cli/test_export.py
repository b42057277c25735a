"""`lorakit export`: real processes on an adapter directory of the packaged SmolLM2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lorakit
from lorakit.models import load_model
from tests.conftest import randomize_adapters

pytestmark = pytest.mark.integration  # the real `lorakit export` command

gguf = pytest.importorskip("gguf")
LORAKIT = Path(sys.executable).with_name("lorakit")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    model, _, _ = load_model("smollm2-135m")
    for name, config in {
        "plain": lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
        "dora": lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
    }.items():
        lorakit.inject(model, config, adapter_name=name)
        randomize_adapters(model, scale=0.05)
        lorakit.save_adapter(model, root / name, adapter_name=name)
        lorakit.unload(model)
    return root


def _export(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LORAKIT), "export", *map(str, args)], umask=0o027, capture_output=True, text=True, timeout=300, check=False
    )


def test_export_writes_an_adapter_and_a_merged_model(adapters: Path, tmp_path: Path):
    done = _export("--adapter", adapters / "plain", "--out", tmp_path / "a.gguf")
    assert done.returncode == 0, done.stderr
    assert "llama.cpp LoRA adapter written to" in done.stdout
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert reader.fields["adapter.type"].contents() == "lora"
    assert len(reader.tensors) == 30 * 3 * 2
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}  # auto: f32 for an adapter

    # The merged model from the packaged Q4_1 GGUF: by default the base's tensors as stored, the
    # adapted q/k/v matrices F16, and general.file_type saying what most matrices are (still Q4_1).
    done = _export("--adapter", adapters / "plain", "--format", "gguf", "-o", tmp_path / "m.gguf")
    assert done.returncode == 0, done.stderr
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    merged = {t.name: t.tensor_type.name for t in reader.tensors}
    assert merged["blk.0.attn_q.weight"] == "F16" and merged["blk.0.attn_output.weight"] == "Q4_1"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    assert "general.file_type MOSTLY_Q4_1; tensors: 120 Q4_1, 90 F16, 61 F32, 1 Q8_0" in done.stdout

    # --outtype f16: the whole file re-encoded (the Q4_1 and Q8_0 tensors dequantised), norms F32.
    done = _export("--adapter", adapters / "plain", "--format", "gguf", "--outtype", "f16", "-o", tmp_path / "f.gguf")
    assert done.returncode == 0, done.stderr
    reader = gguf.GGUFReader(tmp_path / "f.gguf")
    assert {t.name: t.tensor_type.name for t in reader.tensors} == {
        name: "F32" if kind == "F32" else "F16" for name, kind in merged.items()
    }
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert "general.file_type MOSTLY_F16; tensors: 211 F16, 61 F32" in done.stdout
    # Written under umask 027: the mode a plain open() gives (0o640), as every file lorakit writes.
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == dict.fromkeys(
        ["a.gguf", "m.gguf", "f.gguf"], "0o640"
    )


def test_export_refusals_exit_2_with_one_line(adapters: Path, tmp_path: Path):
    out = tmp_path / "x.gguf"
    for args, message in (
        (("--adapter", adapters / "dora", "--out", out), "--format gguf"),
        (("--adapter", adapters / "plain"), "--out is required"),
        (("--adapter", adapters / "plain", "--out", out, "--outtype", "q8_0"), "f32, f16 or bf16"),
    ):
        done = _export(*args)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
