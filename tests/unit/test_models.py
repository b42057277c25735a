"""lorakit.models on the real packaged models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import lorakit.models as models
from lorakit.errors import ConfigError, ModelLoadError
from lorakit.models import cache as model_cache


@pytest.fixture(scope="session")
def smollm():
    """The packaged default, loaded once (from the cache; converted first if the cache is cold)."""
    cached = models.ensure_cached("smollm2-135m")
    model, tokenizer, name = models.load_model()
    model.eval()
    return model, tokenizer, name, cached


def _greedy(model, tokenizer, question: str, new_tokens: int) -> str:
    messages = [{"role": "user", "content": question}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def test_packaged_model_generates_deterministically(smollm):
    model, tokenizer, _, _ = smollm
    first = _greedy(model, tokenizer, "What is the capital of France?", 8)
    second = _greedy(model, tokenizer, "What is the capital of France?", 8)
    assert first == second
    # A wrong dequantisation (e.g. q/k rows not un-permuted) produces fluent-looking garbage, not this.
    assert "Paris" in first


def test_packaged_model_identity_and_padding(smollm):
    model, tokenizer, name, cached = smollm
    assert name.endswith("/SmolLM2-135M-Instruct")
    assert model.name_or_path == name
    assert model.config.name_or_path == name
    assert tokenizer.pad_token is not None
    assert tokenizer.name_or_path == str(cached)
    # The cache is a plain checkpoint: no GGUF quantisation record survives.
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_cached_weights_equal_the_gguf_dequantised(smollm):
    import gguf

    model = smollm[0]
    reader = gguf.GGUFReader(str(models.packaged_gguf()))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight.detach(), expected)


def test_second_load_comes_from_the_cache(smollm, monkeypatch):
    cached = smollm[3]
    assert (cached / "model.safetensors").is_file()
    assert json.loads((cached / "lorakit-cache.json").read_text())["source"].endswith(".gguf")

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(model_cache, "_convert_gguf", no_conversion)
    _, tokenizer, name = models.load_model("smollm2-135m")
    assert tokenizer.name_or_path == str(cached)
    assert name == smollm[2]
    assert models.ensure_cached("smollm2-135m") == cached


def test_local_directory_loads_under_its_path(smollm):
    cached = smollm[3]
    model, _, name = models.load_model(str(cached), dtype=torch.bfloat16)
    assert name == str(cached.resolve())
    assert model.dtype == torch.bfloat16
    assert type(model).__name__ == type(smollm[0]).__name__


def test_packaged_encoder_for_classification():
    model, tokenizer, name = models.load_model("minilm-l6", task="classification", num_labels=3)
    assert name == "sentence-transformers/all-MiniLM-L6-v2"
    batch = tokenizer(["a fine film", "a dull one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)


def test_packaged_encoder_without_a_head_for_other_tasks():
    model, _, _ = models.load_model("minilm-l6")
    assert not hasattr(model, "classifier")
    assert hasattr(model, "encoder")


@pytest.mark.parametrize("spec", ["no-such-model", "someorg/some-model"], ids=["alias", "hub-id"])
def test_unknown_model_lists_what_is_accepted(spec):
    with pytest.raises(ModelLoadError) as info:
        models.load_model(spec)
    message = str(info.value)
    assert repr(spec) in message
    for expected in ("'smollm2-135m'", "'minilm-l6'", "config.json", ".gguf"):
        assert expected in message
    assert isinstance(info.value, OSError)
    if "/" in spec:
        assert "never downloads" in message


def test_directory_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"without config\.json"):
        models.load_model(tmp_path)
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"not a \.gguf file"):
        models.load_model(weights)


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown task"):
        models.load_model("minilm-l6", task="seq2seq")


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_gguf_with_a_wrong_magic_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError) as info:
        models.load_model(broken)
    assert str(broken) in str(info.value)
    assert _leftovers(tmp_path / "cache") == []


def test_truncated_gguf_is_named_and_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    truncated = tmp_path / "truncated.gguf"
    with models.packaged_gguf().open("rb") as source:
        truncated.write_bytes(source.read(64 * 1024))  # valid header, tensors cut off
    with pytest.raises(ModelLoadError) as info:
        models.load_model(truncated)
    assert str(truncated) in str(info.value)
    assert "corrupt" in str(info.value)
    assert _leftovers(tmp_path / "cache") == []


def test_gguf_cache_is_reused_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 12)
    calls: list[Path] = []

    def fake_convert(gguf_path: Path, out: Path) -> str:
        calls.append(gguf_path)
        (out / "config.json").write_text(json.dumps({"size": gguf_path.stat().st_size}))
        return "org/tiny"

    monkeypatch.setattr(model_cache, "_convert_gguf", fake_convert)
    first = models.ensure_cached(source)
    assert models.ensure_cached(source) == first
    assert len(calls) == 1
    assert model_cache.resolve(source)[1] == "org/tiny"
    source.write_bytes(b"GGUF" + b"\0" * 40)  # a different file at the same path
    assert models.ensure_cached(source) == first
    assert len(calls) == 2
    assert json.loads((first / "config.json").read_text())["size"] == source.stat().st_size
    assert _leftovers(tmp_path / "cache") == [first.name]  # the stale copy is gone, no temp dirs left


def test_the_model_cache_gets_the_umasks_mode(tmp_path, monkeypatch):
    # safetensors' writer makes 0o600 files; the cache must hold what a plain open() would give.
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 12)

    def private_convert(gguf_path: Path, out: Path) -> str:
        (out / "model.safetensors").write_bytes(b"{}")
        (out / "model.safetensors").chmod(0o600)
        return "org/tiny"

    monkeypatch.setattr(model_cache, "_convert_gguf", private_convert)
    previous = os.umask(0o027)
    try:
        cached = models.ensure_cached(source)
    finally:
        os.umask(previous)
    assert oct((cached / "model.safetensors").stat().st_mode & 0o777) == "0o640"
    assert oct(cached.stat().st_mode & 0o777) == "0o750"
