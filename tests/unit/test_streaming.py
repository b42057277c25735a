"""Streamed loading (issue 26): a causal LM built one tensor at a time equals transformers'
`from_pretrained` + `lorakit.quantize` bit for bit, never holds the full-precision model, and
names what is wrong with a bad checkpoint before it reads any weight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lorakit import quantization as Q
from lorakit.errors import ModelLoadError
from lorakit.export.gguf_layout import encode, llama_permute, tensor_names, write_gguf
from lorakit.models import cache as model_cache
from lorakit.models import ensure_cached, gguf_tensors, load_model, load_tokenizer, loading, packaged_gguf, streaming
from lorakit.models.gguf_tensors import GgufTensors
from lorakit.models.pretrained import model_from_dir
from lorakit.models.safetensors_files import SafetensorsFiles
from tests.conftest import REPO, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


# ----------------------------------------------------------------------------- helpers


def _save_tokenizer(directory: Path, vocab_size: int = 64) -> None:
    """A word-level tokenizer of `vocab_size` tokens: `load_model` returns one with every model."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w1").save_pretrained(directory)


def _saved(model: nn.Module, directory: Path, shard: str | None = None) -> Path:
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    _save_tokenizer(directory, model.config.vocab_size)
    return directory


def _reference(directory: Path, dtype: torch.dtype, scheme: str | None) -> nn.Module:
    """Today's load: transformers' `from_pretrained(dtype)`, then `lorakit.quantize`."""
    model = model_from_dir(directory, task="causal-lm", num_labels=2, dtype=dtype)
    return Q.quantize(model, scheme) if scheme else model


def _load_streamed(monkeypatch, spec, **kwargs):
    """`load_model`, checked to stream: transformers' `from_pretrained` path is made to fail meanwhile."""

    def refuse(*args, **kwargs):
        raise AssertionError("load_model went through from_pretrained instead of streaming")

    with monkeypatch.context() as patch:
        patch.setattr(loading, "model_from_dir", refuse)
        return load_model(spec, **kwargs)


def _same_tensor(expected: torch.Tensor, got: torch.Tensor, name: str) -> None:
    assert type(got) is type(expected), name
    assert got.dtype == expected.dtype and got.shape == expected.shape, name
    assert got.requires_grad == expected.requires_grad, name
    if type(expected).__name__ == "NF4Tensor":
        for part in NF4_PARTS:
            assert torch.equal(getattr(got, part), getattr(expected, part)), f"{name}.{part}"
        assert (got.block_size, got.scaler_block_size) == (expected.block_size, expected.scaler_block_size), name
    else:
        assert torch.equal(got, expected), name


def _assert_same_model(expected: nn.Module, got: nn.Module) -> None:
    """Same modules, parameters, buffers (non-persistent ones too), ties, modes, logits and
    generation config: the streamed model is the reference model."""
    assert [(p, type(m), m.training) for p, m in got.named_modules()] == [
        (p, type(m), m.training) for p, m in expected.named_modules()
    ]
    for kind in ("named_parameters", "named_buffers"):
        want = dict(getattr(expected, kind)(remove_duplicate=False))
        have = dict(getattr(got, kind)(remove_duplicate=False))
        assert list(have) == list(want), kind
        for name in want:
            _same_tensor(want[name], have[name], name)
        # Tied tensors are one object in both (and only those).
        groups = {}
        for name, tensor in want.items():
            groups.setdefault(id(tensor), []).append(name)
        for names in groups.values():
            assert len({id(have[n]) for n in names}) == 1, names
        assert len({id(t) for t in have.values()}) == len(groups), kind
    assert got.config.dtype == expected.config.dtype
    assert got.config._attn_implementation == expected.config._attn_implementation
    assert got.generation_config.to_dict() == expected.generation_config.to_dict()
    with torch.no_grad():
        assert torch.equal(got(IDS).logits, expected(IDS).logits)


# ----------------------------------------------------------------------------- safetensors


CASES = [
    (torch.float32, None),
    (torch.bfloat16, None),
    (torch.float32, "nf4"),
    (torch.float32, "bf16"),
    (torch.bfloat16, "nf4"),
]


@pytest.mark.parametrize("shard", [None, "3KB"], ids=["one-file", "sharded"])
@pytest.mark.parametrize(("dtype", "scheme"), CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_streamed_model_equals_from_pretrained_then_quantize(tmp_path, monkeypatch, make, dtype, scheme, shard):
    directory = _saved(make(), tmp_path / "model", shard)
    if shard:
        assert len(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]) > 1
        assert len(list(directory.glob("*.safetensors"))) > 2
    model, tokenizer, name = _load_streamed(monkeypatch, directory, dtype=dtype, quantize=scheme)
    _assert_same_model(_reference(directory, dtype, scheme), model)
    assert name == str(directory.resolve()) == model.config.name_or_path == model.name_or_path
    assert tokenizer.pad_token == "w1"  # the EOS token, as for every causal LM
    if make is tiny_gpt2:  # tied head; GPT-2's Conv1D layers are not nn.Linear, so `quantize` leaves them
        assert model.lm_head.weight is model.transformer.wte.weight
        # ... and stores only the tied table in bf16 (read in bf16: no float32 copy)
        stored = scheme is not None and dtype == torch.float32  # a 16-bit table is left as it is
        assert stored == (type(model.transformer.wte) is Q.QuantizedEmbedding)
        assert Q.quantization_of(model) == ("bf16" if stored else None)
    else:
        assert Q.quantization_of(model) == scheme


def test_packaged_model_streams_from_its_cache_as_from_pretrained_then_quantize(monkeypatch):
    """bf16 (NF4's bits are pinned on the tiny models above; quantizing 106M weights twice is slow)."""
    cached = ensure_cached("smollm2-135m")
    model, tokenizer, name = _load_streamed(monkeypatch, "smollm2-135m", quantize="bf16")
    _assert_same_model(_reference(cached, torch.float32, "bf16"), model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert name == "HuggingFaceTB/SmolLM2-135M-Instruct" and tokenizer.name_or_path == str(cached)


def test_a_checkpoint_saved_from_the_bare_model_loads_under_the_heads_prefix(tmp_path, monkeypatch):
    """transformers accepts `layers.0...` for `model.layers.0...`; so does the streaming loader."""
    full = tiny_llama()
    directory = _saved(full, tmp_path / "model")
    weights = load_file(directory / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in weights.items()}, directory / "model.safetensors")
    model, _, _ = _load_streamed(monkeypatch, directory)
    _assert_same_model(_reference(directory, torch.float32, None), model)


def test_progress_is_redrawn_while_one_tensor_takes_long(tmp_path, capsys, monkeypatch):
    """The bar names the tensor being read and is redrawn every REFRESH_SECONDS even while that
    tensor takes long (here: one read slowed to 0.6 s, the bar redrawn every 0.05 s)."""
    directory = _saved(tiny_llama(), tmp_path / "model")
    capsys.readouterr()  # transformers' own bar for the writing
    load_model(directory, progress=False)
    assert capsys.readouterr().err == ""
    files = SafetensorsFiles(directory)
    read = files.read

    def slow_read(key, dtype):
        if key == "model.norm.weight":
            time.sleep(0.6)
        return read(key, dtype)

    monkeypatch.setattr(files, "read", slow_read)
    monkeypatch.setattr(streaming, "REFRESH_SECONDS", 0.05)
    model = streaming.build_empty(AutoConfig.from_pretrained(directory), torch.float32)
    streaming.fill(model, files, progress=True)
    frames = capsys.readouterr().err.split("\r")
    assert sum("model.norm.weight" in frame for frame in frames) >= 4  # not only the one frame after it
    assert any("tensor" in frame for frame in frames)


# ----------------------------------------------------------------------------- GGUF


def _write_gguf(model: nn.Module, arch: str, path: Path, outtype: str, raw: dict | None = None) -> Path:
    """`model` as llama.cpp writes it: its names, LLaMA's q/k rows permuted, matrices in `outtype`
    (norms and biases in F32), the hyper-parameters transformers reads back; no tokenizer. `raw`:
    GGUF name -> (bytes, type) written instead of a tensor."""
    config = model.config
    names = tensor_names(arch, config)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    tensors = []
    for key, value in model.state_dict().items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        leaf = key.rsplit(".", 2)[-2]
        if arch == "llama" and leaf in heads and key.endswith(".weight"):
            value = llama_permute(value, heads[leaf])
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        stored = (raw or {}).get(name) or encode(value, outtype if value.ndim == 2 else "f32")
        tensors.append((name, *stored))

    def metadata(writer):
        writer.add_name("tiny")
        writer.add_vocab_size(config.vocab_size)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)

    return write_gguf(path, arch, metadata, tensors)


def _tiny(arch: str) -> nn.Module:
    """Hidden 64 (Q8_0 packs rows in blocks of 32), 4 heads over 2 key-value heads (k is permuted by
    the key-value heads), untied head; Qwen2 has q/k/v biases. Intermediate 256: one block of the
    K-quant types per row of ffn_down."""
    torch.manual_seed(0)
    shape = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**shape)).eval()


def _streamed_gguf(path: Path, dtype: torch.dtype, scheme: str | None) -> nn.Module:
    """What `load_model` does with a `.gguf` file, short of its tokenizer (these files have none)."""
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    model = streaming.build_empty(config, dtype)
    tensors = GgufTensors(path)
    tensors.bind(list(model.state_dict()), config)
    return streaming.fill(model, tensors, quantize=scheme)


def _transformers_gguf(path: Path, dtype: torch.dtype, scheme: str | None) -> nn.Module:
    """transformers' own GGUF load (the whole model dequantised), then `lorakit.quantize`."""
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return Q.quantize(model, scheme) if scheme else model


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_tensors_stream_as_transformers_reads_them(tmp_path, arch, outtype):
    path = _write_gguf(_tiny(arch), arch, tmp_path / f"tiny-{outtype}.gguf", outtype)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types == {"F32", outtype.upper()} or outtype == "f32"
    # fp32 + nf4: the embeddings and head are read straight into bf16 (`tables_to_store`)
    for dtype, scheme in [(torch.float32, None), (torch.float32, "nf4"), (torch.bfloat16, "nf4")]:
        _assert_same_model(_transformers_gguf(path, dtype, scheme), _streamed_gguf(path, dtype, scheme))
    # A read in bf16 (cast a few rows at a time, or whole after putting q/k rows in order) is the
    # float32 read cast, for every tensor; the row steps are made small so that there are many.
    tensors = GgufTensors(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_tensors, "_CHUNK_BYTES", 64)
        for key in sorted(tensors.keys()):
            assert torch.equal(tensors.read(key, torch.bfloat16), tensors.read(key, torch.float32).to(torch.bfloat16))


@pytest.mark.integration  # the whole packaged model through transformers' GGUF reader and lorakit's, twice: ~45 s
def test_packaged_gguf_file_streams_with_a_cached_header(tmp_path, monkeypatch):
    """The packaged Q4_1/Q8_0 file loaded as a user's `.gguf` path: the weights stream from the
    file, the config and tokenizer are cached once (and only after the weights loaded)."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    source = packaged_gguf()
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(source)).tensors}
    assert types == {"Q4_1", "Q8_0", "F32"}
    model, tokenizer, name = _load_streamed(monkeypatch, source, dtype=torch.bfloat16, quantize="bf16")
    _assert_same_model(_transformers_gguf(source, torch.bfloat16, "bf16"), model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].endswith("-header")  # config and tokenizer only: no weights
    header = tmp_path / "cache" / cached[0]
    assert not list(header.glob("*.safetensors")) and Path(tokenizer.name_or_path) == header
    again, _, _ = load_model(source, dtype=torch.bfloat16, quantize="bf16")  # from the cached header
    _assert_same_model(model, again)
    assert load_tokenizer(source).name_or_path == tokenizer.name_or_path  # the header's, not a weight cache
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_a_gguf_architecture_lorakit_does_not_read_streams_from_the_dequantised_cache(tmp_path, monkeypatch):
    """Any other architecture transformers reads is dequantised into the cache once (transformers'
    conversion, replaced here by what it writes: the plain checkpoint), then streamed from there."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    path = _write_gguf(_tiny("llama"), "llama", tmp_path / "tiny.gguf", "f32")
    monkeypatch.setattr(gguf_tensors, "STREAMED_ARCHITECTURES", {})
    converted = []

    def convert(source: Path, out: Path) -> None:
        converted.append(source)
        _saved(_tiny("llama"), out)

    monkeypatch.setattr(model_cache, "_convert_gguf", convert)
    model, tokenizer, name = _load_streamed(monkeypatch, path)
    assert converted == [path.resolve()] and name == str(path.resolve())
    assert Path(tokenizer.name_or_path).parent == tmp_path / "cache"
    _assert_same_model(_transformers_gguf(path, torch.float32, None), model)


# ----------------------------------------------------------------------------- bad input


def _files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.rglob("*"))}


@pytest.fixture
def sharded(tmp_path, monkeypatch):
    """A sharded tiny LLaMA, with an empty model cache (so a test sees anything written there)."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return _saved(tiny_llama(), tmp_path / "model", "3KB")


def _refused(directory: Path, *expected: str) -> None:
    before = _files(directory.parent)
    with pytest.raises(ModelLoadError) as info:
        load_model(directory, quantize="nf4")
    for text in expected:
        assert text in str(info.value), str(info.value)
    assert _files(directory.parent) == before  # nothing written, no cache


def test_a_missing_shard_is_named(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    _refused(sharded, str(shard), "not in")


def test_a_truncated_shard_is_named(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    _refused(sharded, str(shard), "truncated")


def test_a_tensor_of_another_shape_than_the_config_makes_is_named_with_both_shapes(sharded):
    config = json.loads((sharded / "config.json").read_text())
    config["vocab_size"] = 80
    (sharded / "config.json").write_text(json.dumps(config))
    _refused(sharded, "model.embed_tokens.weight", "(64, 16)", "(80, 16)", "lm_head.weight")


def test_a_missing_tensor_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    directory = _saved(tiny_llama(), tmp_path / "model")
    weights = load_file(directory / "model.safetensors")
    del weights["model.layers.1.post_attention_layernorm.weight"]
    save_file(weights, directory / "model.safetensors")
    _refused(directory, "model.layers.1.post_attention_layernorm.weight", "lacks")


def test_a_gguf_type_the_gguf_package_cannot_dequantise_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    q8_k = gguf.GGMLQuantizationType.Q8_K  # gguf 0.19 cannot dequantise it
    block, size = gguf.GGML_QUANT_SIZES[q8_k]
    raw = {"blk.0.ffn_down.weight": (np.zeros((64, 256 // block * size), np.uint8), q8_k)}
    path = _write_gguf(_tiny("llama"), "llama", tmp_path / "q8k.gguf", "f32", raw)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, quantize="nf4")
    assert all(text in str(info.value) for text in ("Q8_K", "blk.0.ffn_down.weight", str(path)))
    assert not (tmp_path / "cache").exists()


def test_a_truncated_gguf_tensor_is_named(tmp_path):
    path = _write_gguf(_tiny("llama"), "llama", tmp_path / "tiny.gguf", "f32")
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ModelLoadError, match=r"(truncated|corrupt)") as info:
        GgufTensors(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- memory


# The child's peak is the kernel's high-water mark of its resident memory (VmHWM), reset just
# before the load through /proc/self/clear_refs: `ru_maxrss` would not do, as the kernel folds the
# forked copy of the parent's memory (pytest's, hundreds of MB after other tests) into it at exec.
_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    import transformers
    from transformers.models.llama import modeling_llama  # imported by the load; counted before it
    from lorakit.quantized import _nf4_module, stored_bytes
    from lorakit.models import load_model, load_tokenizer
    _nf4_module()
    load_tokenizer(sys.argv[1])  # the tokenizer machinery's imports, counted before the load
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    model, _, _ = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]), quantize=sys.argv[3], progress=False)
    peak = status("VmHWM")
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    print(json.dumps({"before": before, "peak": peak, "final": sum(stored_bytes(t) for t in tensors)}))
    """
)


def _random_llama(directory: Path, layers: int, hidden: int, intermediate: int) -> dict[str, int]:
    """A LLaMA of seeded random bf16 weights written as ~100 MB safetensors shards, never held
    whole; returns the largest tensor and the largest linear weight in float32 bytes."""
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    )
    directory.mkdir()
    config.save_pretrained(directory)
    _save_tokenizer(directory, 32000)
    shapes = {
        "model.embed_tokens.weight": (32000, hidden),
        "lm_head.weight": (32000, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, count = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, count
        name = f"model-{count:05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, count = {}, 0, count + 1

    for name, shape in shapes.items():
        shard[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size > 100 * 2**20:
            flush()
    if shard:
        flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"largest": max(int(np.prod(s)) for s in shapes.values()) * 4}


@pytest.mark.parametrize(
    ("layers", "hidden", "intermediate", "dtype", "scheme"),
    [(8, 1024, 4096, "float32", "bf16"), (4, 512, 1024, "float32", "nf4")],
    ids=["8x1024-bf16", "4x512-nf4"],
)
def test_peak_memory_is_the_final_model_plus_one_float32_tensor_plus_the_stated_overhead(
    tmp_path, layers, hidden, intermediate, dtype, scheme
):
    sizes = _random_llama(tmp_path / "model", layers, hidden, intermediate)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "model"), dtype, scheme],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    bound = seen["final"] + sizes["largest"] + streaming.FIXED_OVERHEAD_BYTES
    used = seen["peak"] - seen["before"]
    mib = {k: round(v / 2**20) for k, v in {**seen, "used": used, "bound": bound}.items()}
    print(f"\n{layers}x{hidden} {scheme} (MiB): {mib}")
    assert used <= bound
