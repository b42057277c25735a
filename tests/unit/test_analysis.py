"""`lorakit.analysis`: ΔW's spectrum from the r×r core, φ, the amplification factor, compression.

Each measure is checked against a hand computation on explicit matrices (ΔW formed, full SVDs),
and on adapters saved from real (tiny) transformers models; the compressed adapter loads in
lorakit and in PEFT with the same function.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.analysis import (
    amplification,
    analyze,
    compress,
    delta_svd,
    effective_rank,
    read_factors,
    right_singular_vectors,
    subspace_similarity,
    write_analysis,
)
from lorakit.analysis.factors import ModuleFactors
from lorakit.errors import ConfigError
from tests.conftest import randomize_adapters, tiny_llama


def _factors(d=12, k=10, r=4, s=0.5, seed=0) -> ModuleFactors:
    g = torch.Generator().manual_seed(seed)
    return ModuleFactors(
        "m.q_proj", torch.randn(r, k, generator=g).double(), torch.randn(d, r, generator=g).double(), s
    )


@pytest.mark.parametrize("s", [0.5, -2.0])
def test_delta_svd_equals_the_svd_of_the_formed_delta(s):
    f = _factors(s=s)
    delta = s * f.B @ f.A
    svd = delta_svd(f)
    torch.testing.assert_close(svd.S, torch.linalg.svdvals(delta)[: f.rank], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.V.T, delta, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(f.rank, dtype=torch.float64), atol=1e-10, rtol=0)
    assert svd.frobenius == pytest.approx(float(torch.linalg.matrix_norm(delta)))


def test_effective_rank_counts_the_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert effective_rank(s, 0.5) == 1  # 9/14 = 0.64
    assert effective_rank(s, 0.9) == 2  # 13/14 = 0.93
    assert effective_rank(s, 0.99) == 3
    assert effective_rank(s, 1.0) == 3
    assert effective_rank(torch.zeros(3), 0.9) == 0


def test_phi_by_hand():
    eye = torch.eye(5, dtype=torch.float64)
    same = subspace_similarity(eye[:, :3], eye[:, :3])
    assert torch.allclose(same.diagonal(), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(subspace_similarity(eye[:, :2], eye[:, 2:4]), torch.zeros(2, 2, dtype=torch.float64))
    # U1 = e1, U2 = (e1 + e2)/√2, e3: φ(1,1) = 1/2, φ(1,2) = 1/2 / 1, φ(1, 2) counts e1's overlap with both.
    u2 = torch.stack([(eye[0] + eye[1]) / math.sqrt(2), eye[2]], 1)
    phi = subspace_similarity(eye[:, :1], u2)
    torch.testing.assert_close(phi, torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 30, generator=g), torch.randn(8, 30, generator=g)
    phi = subspace_similarity(right_singular_vectors(a), right_singular_vectors(b))
    assert phi.shape == (4, 8) and bool(((phi >= 0) & (phi <= 1 + 1e-12)).all())
    torch.testing.assert_close(phi, subspace_similarity(right_singular_vectors(b), right_singular_vectors(a)).T)


def test_amplification_by_hand():
    # W = diag(10, 5, 1, 0.1, ...): ΔW along W's third direction has ‖UᵀWV‖ = 1, W's own top-1 is 10.
    W = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.1, 0.1, 0.1], dtype=torch.float64))
    f = ModuleFactors(
        "m.q_proj", torch.eye(6, dtype=torch.float64)[2:3] * 3, torch.eye(6, dtype=torch.float64)[:, 2:3], 2.0
    )
    numbers = amplification(W, delta_svd(f))
    assert numbers["delta_frobenius"] == pytest.approx(6.0)
    assert numbers["w_on_delta"] == pytest.approx(1.0)
    assert numbers["w_on_w"] == pytest.approx(10.0)
    assert numbers["factor"] == pytest.approx(6.0)
    assert numbers["w_on_random"] < 10.0


def _saved(tmp_path: Path, name: str, config: lorakit.LoraConfig, seed: int = 3) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama()
    lorakit.inject(model, config)
    randomize_adapters(model, seed=seed)
    lorakit.save_adapter(model, tmp_path / name)
    return tmp_path / name, model


def test_read_factors_match_the_model(tmp_path: Path):
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                rank_pattern={"v_proj": 2})  # fmt: skip
    folder, model = _saved(tmp_path, "a", config)
    _, modules = read_factors(folder)
    layers = dict(lorakit.state.lora_layers(model))
    assert [m.path for m in modules] == list(layers)
    for m in modules:
        delta = m.scaling * m.B @ m.A
        torch.testing.assert_close(delta.float(), layers[m.path].delta_weight("default").float(), atol=1e-6, rtol=1e-5)


def test_analyze_writes_the_documented_json(tmp_path: Path):
    first, model = _saved(tmp_path, "r4", lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    second, _ = _saved(tmp_path, "r8", lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 7)
    base = tiny_llama()
    result = analyze(first, compare=second, base=base, energy=0.9)
    files = write_analysis(result, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert {p.name for p in files} >= {"analysis.json", "spectrum.png", "phi_q_proj.png", "phi_v_proj.png"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in files if p.suffix == ".png")
    entry = data["modules"]["model.layers.0.self_attn.q_proj"]
    assert entry["rank"] == 4 and len(entry["singular_values"]) == 4
    assert set(entry["effective_rank"]) == {"0.9", "0.99"}
    assert len(entry["phi"]) == 4 and len(entry["phi"][0]) == 8  # r1 × r2
    layer = model.model.layers[0].self_attn.q_proj
    want = torch.linalg.svdvals(layer.delta_weight("default").double())[:4]
    torch.testing.assert_close(torch.tensor(entry["singular_values"], dtype=torch.float64), want, atol=1e-6, rtol=1e-5)
    amp = entry["amplification"]
    W = base.model.layers[0].self_attn.q_proj.weight.detach().double()
    assert amp["w_on_w"] == pytest.approx(float(torch.linalg.svdvals(W)[:4].square().sum().sqrt()))
    assert amp["factor"] == pytest.approx(amp["delta_frobenius"] / amp["w_on_delta"])
    assert set(data["suggested_rank_pattern"]) == set(data["modules"])
    assert set(data["layer_types"]) == {"q_proj", "v_proj"}


def test_compress_keeps_the_best_rank_k_update_and_loads_in_lorakit_and_peft(tmp_path: Path):
    peft = pytest.importorskip("peft")
    config = lorakit.LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"])
    folder, model = _saved(tmp_path, "r6", config)
    report = compress(folder, tmp_path / "r2", rank=2)
    assert report["parameters"][1] < report["parameters"][0] and report["bytes"][1] < report["bytes"][0]
    small = tiny_llama()
    lorakit.load_adapter(small, tmp_path / "r2")
    for path, layer in lorakit.state.lora_layers(small):
        full = dict(lorakit.state.lora_layers(model))[path].delta_weight("default").double()
        u, s, vh = torch.linalg.svd(full)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]  # Eckart–Young
        torch.testing.assert_close(layer.delta_weight("default").double(), best, atol=1e-5, rtol=1e-4)
        assert report["modules"][path]["kept"] == 2
    # PEFT loads the same file with the same function.
    ids = torch.arange(12).reshape(2, 6) % 64
    reference = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "r2")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, small(input_ids=ids).logits, atol=1e-5, rtol=1e-5)

    # All the energy: the same adapter function, with per-module ranks where ΔW has fewer directions.
    exact = compress(folder, tmp_path / "all", energy=1.0)
    assert all(m["relative_error"] < 1e-6 for m in exact["modules"].values())
    again = tiny_llama()
    lorakit.load_adapter(again, tmp_path / "all")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_compress_refusals_write_nothing(tmp_path: Path):
    folder, _ = _saved(tmp_path, "a", lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    dora, _ = _saved(tmp_path, "d", lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    for kwargs, message in (
        ({}, "exactly one"),
        ({"energy": 0.9, "rank": 2}, "exactly one"),
        ({"energy": 1.5}, "energy must be"),
        ({"rank": 0}, "rank must be"),
    ):
        with pytest.raises(ConfigError, match=message):
            compress(folder, tmp_path / "out", **kwargs)
    with pytest.raises(ConfigError, match="DoRA"):
        compress(dora, tmp_path / "out", rank=2)
    with pytest.raises(ConfigError, match="not empty"):
        compress(folder, busy, rank=2)
    assert not (tmp_path / "out").exists() and [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="energy must be"):
        analyze(folder, energy=0.0)
