"""GGUF export on the packaged SmolLM2-135M (a LLaMA, loaded from its own Q4_1 GGUF file).

Read back with `gguf.GGUFReader` (the maintained package llama.cpp's own converters use) and, for
the merged model, with transformers' GGUF loader. ΔW is rebuilt from the file's tensors the way
llama.cpp computes it, (alpha / r) · B·A, un-permuted, and compared with lorakit's s·B·A.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.export.gguf import export_gguf
from lorakit.export.gguf_layout import llama_permute, llama_unpermute
from lorakit.export.gguf_lora import gguf_lora_tensors
from lorakit.export.gguf_merged import base_gguf_of
from lorakit.models import load_model
from lorakit.state import lora_layers
from tests.conftest import randomize_adapters, tiny_gpt2, tiny_llama

gguf = pytest.importorskip("gguf")  # the `cli` extra; .ci/run installs it

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
PROMPT = "name : The Eagle | Type : pub | food : French | area : riverside ||"


@pytest.fixture(scope="module")
def smollm():
    model, tokenizer, _ = load_model("smollm2-135m")
    return model, tokenizer


def _adapted(model, config: lorakit.LoraConfig, seed: int = 3):
    lorakit.inject(model, config, adapter_name="default")
    randomize_adapters(model, seed=seed, scale=0.05)
    return model


@pytest.fixture
def adapted(smollm):
    """SmolLM2 with an all-linear adapter whose scales llama.cpp cannot express as alpha / r:
    rsLoRA, and per-module ranks and alphas."""
    model, tokenizer = smollm
    config = lorakit.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=ALL_LINEAR,
        use_rslora=True,
        rank_pattern={"v_proj": 4},
        alpha_pattern={"down_proj": 4},
    )
    _adapted(model, config)
    try:
        yield model, tokenizer
    finally:
        lorakit.unload(model)


def _tensor(reader, name: str) -> torch.Tensor:
    t = next(t for t in reader.tensors if t.name == name)
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(data, copy=True)).float().reshape([int(d) for d in reversed(t.shape.tolist())])


@pytest.mark.parametrize(
    ("outtype", "qtype", "tol"), [("f32", "F32", 1e-6), ("f16", "F16", 2e-3), ("bf16", "BF16", 2e-2)]
)
def test_lora_adapter_round_trip(adapted, tmp_path: Path, outtype, qtype, tol):
    model, _ = adapted
    path = export_gguf(model, tmp_path / "adapter.gguf", outtype=outtype)
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    alpha = fields["adapter.lora.alpha"].contents()
    assert alpha == 16.0

    layers = dict(lora_layers(model))
    expected = set()
    for path_, _layer in layers.items():
        block, leaf = path_.split(".")[2], path_.rsplit(".", 1)[-1]
        stem = f"blk.{block}.{GGUF_NAMES[leaf]}.weight"
        expected |= {f"{stem}.lora_a", f"{stem}.lora_b"}
    assert {t.name for t in reader.tensors} == expected  # every adapted weight, nothing else
    assert {t.tensor_type.name for t in reader.tensors} == {qtype}

    worst = 0.0
    for path_, layer in layers.items():
        block, leaf = path_.split(".")[2], path_.rsplit(".", 1)[-1]
        stem = f"blk.{block}.{GGUF_NAMES[leaf]}.weight"
        A, B = _tensor(reader, f"{stem}.lora_a"), _tensor(reader, f"{stem}.lora_b")
        assert A.shape[0] == layer.adapters["default"].r and B.shape[1] == A.shape[0]
        delta = alpha / A.shape[0] * (B @ A)  # what llama.cpp computes
        if leaf in ("q_proj", "k_proj"):
            delta = llama_unpermute(delta, 9 if leaf == "q_proj" else 3)
        want = layer.delta_weight("default").float()
        worst = max(worst, float((delta - want).abs().max() / want.abs().max()))
    assert worst <= tol


def test_the_permutation_is_llama_cpps(smollm):
    """The packaged GGUF was written by llama.cpp's converter: its q/k weights are transformers'
    weights under `llama_permute` (and `llama_unpermute` inverts it)."""
    model, _ = smollm
    reader = gguf.GGUFReader(base_gguf_of(model))
    attn = model.model.layers[3].self_attn
    for leaf, heads, name in (("q_proj", 9, "attn_q"), ("k_proj", 3, "attn_k")):
        weight = getattr(attn, leaf).weight.detach().float()
        stored = _tensor(reader, f"blk.3.{name}.weight")
        torch.testing.assert_close(llama_permute(weight, heads), stored, atol=1e-6, rtol=0)
        assert not torch.equal(weight, stored)  # the permutation is not the identity
        torch.testing.assert_close(llama_unpermute(llama_permute(weight, heads), heads), weight, atol=0, rtol=0)


@pytest.mark.integration  # a whole merged GGUF of the packaged model, written and read back
def test_merged_gguf_loads_in_transformers_with_the_merged_logits(adapted, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = adapted
    source = base_gguf_of(model)
    path = export_gguf(model, tmp_path / "merged.gguf", format="gguf")
    reader, base = gguf.GGUFReader(path), gguf.GGUFReader(source)
    keys = {k for k in base.fields if not k.startswith("GGUF.")}
    assert {k for k in reader.fields if not k.startswith("GGUF.")} == keys
    for key in keys - {"general.architecture", "general.file_type"}:
        assert reader.fields[key].contents() == base.fields[key].contents(), key
    # Every projection adapted: 210 of the 211 matrices are F16 now, so the file is "mostly F16".
    assert base.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    adapted_names = {f"blk.{p.split('.')[2]}.{GGUF_NAMES[p.rsplit('.', 1)[-1]]}.weight" for p, _ in lora_layers(model)}
    stored = {t.name: t for t in base.tensors}
    assert [t.name for t in reader.tensors] == [t.name for t in base.tensors]
    for tensor in reader.tensors:
        if tensor.name in adapted_names:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F16
        else:  # copied as stored: the same type and bytes
            assert tensor.tensor_type == stored[tensor.name].tensor_type
            assert np.array_equal(tensor.data, stored[tensor.name].data), tensor.name

    # The logits, from an f32 file (so only float rounding separates it from the merged model): every
    # tensor, the base's Q4_1 and Q8_0 ones dequantised, is F32.
    exact = export_gguf(model, tmp_path / "merged-f32.gguf", format="gguf", outtype="f32")
    f32 = gguf.GGUFReader(exact)
    assert {t.tensor_type.name for t in f32.tensors} == {"F32"} and len(f32.tensors) == len(base.tensors)
    assert f32.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=exact.name, dtype=torch.float32).eval()
        got = loaded(ids).logits
        with lorakit.disable_adapters(model):
            base_logits = model(ids).logits
    assert float((want - base_logits).abs().max()) > 0.5  # the adapter changes the output
    assert float((got - want).abs().max()) < 2e-3
    assert tuple(lorakit.active_adapters(model)) == ("default",)  # the model itself was not merged
    assert not any(layer.merged for _, layer in lora_layers(model))


def _logits_with_weights_in_f16(model, ids: torch.Tensor) -> torch.Tensor:
    """The adapted model's logits with every matrix merged (W + ΔW) and rounded to f16, vectors kept
    in f32: what a whole-file f16 GGUF holds. The model is not changed."""
    layers = dict(lora_layers(model))
    weights = {}
    for name, param in model.named_parameters():
        if ".adapters." in name or param.ndim < 2:
            continue
        value = param.detach().float()
        owner = name.removesuffix(".base_layer.weight")
        if owner in layers:
            value = value + layers[owner].delta_weight("default").float()
        weights[name] = value.half().float()
    with torch.no_grad(), lorakit.disable_adapters(model):
        return torch.func.functional_call(model, weights, (ids,)).logits


@pytest.mark.integration  # a whole merged GGUF of the packaged model, written and read back
def test_merged_gguf_keeps_the_base_types_or_re_encodes_the_whole_file(smollm, tmp_path: Path):
    """The default keeps the Q4_1 base as stored (adapted matrices F16, general.file_type from what
    the file holds); --outtype f16 / bf16 dequantise and re-encode every tensor, norms staying F32."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm
    base = gguf.GGUFReader(base_gguf_of(model))
    stored = {t.name: t for t in base.tensors}
    _adapted(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    try:
        reader = gguf.GGUFReader(export_gguf(model, tmp_path / "auto.gguf", format="gguf"))
        assert [t.name for t in reader.tensors] == [t.name for t in base.tensors]
        for tensor in reader.tensors:
            if tensor.name.endswith(("attn_q.weight", "attn_v.weight")):
                assert tensor.tensor_type.name == "F16", tensor.name
            else:
                assert tensor.tensor_type == stored[tensor.name].tensor_type, tensor.name
                assert np.array_equal(tensor.data, stored[tensor.name].data), tensor.name
        counts = {kind: sum(t.tensor_type.name == kind for t in reader.tensors) for kind in ("Q4_1", "F16")}
        assert counts == {"Q4_1": 150, "F16": 60}
        # 150 of the 211 matrices are still Q4_1: llama.cpp's "mostly Q4_1", computed, not copied.
        assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1

        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            want = model(ids).logits
        rounded = _logits_with_weights_in_f16(model, ids)
        for outtype, kind, file_type in (
            ("f16", "F16", gguf.LlamaFileType.MOSTLY_F16),
            ("bf16", "BF16", gguf.LlamaFileType.MOSTLY_BF16),
        ):
            path = export_gguf(model, tmp_path / f"{outtype}.gguf", format="gguf", outtype=outtype)
            reader = gguf.GGUFReader(path)
            assert reader.fields["general.file_type"].contents() == file_type
            for tensor in reader.tensors:
                one_d = len(tensor.shape) == 1
                assert tensor.tensor_type.name == ("F32" if one_d else kind), tensor.name
        with torch.no_grad():
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f16.gguf", dtype=torch.float32).eval()
            got = loaded(ids).logits
    finally:
        lorakit.unload(model)
    # The f16 file holds the merged weights rounded to f16, and nothing else changes them.
    assert float((got - rounded).abs().max()) < 2e-3
    assert float((got - want).abs().max()) < 0.1  # f16 rounding of every matrix, on logits up to ~30


def test_file_type_is_what_most_matrices_are_as_llama_cpp_names_it():
    from lorakit.export.gguf_merged import _file_type

    T = gguf.GGMLQuantizationType
    matrix, vector = np.zeros((2, 4), np.uint8), np.zeros(4, np.float32)
    f16, f32 = np.zeros((2, 4), np.float16), np.zeros((2, 4), np.float32)
    norms = [(f"blk.{i}.attn_norm.weight", vector, None) for i in range(9)]  # 1-D: never counted
    assert _file_type([*norms, ("a", matrix, T.Q4_1), ("b", matrix, T.Q4_1), ("c", f16, None)]) == 3  # MOSTLY_Q4_1
    assert _file_type([*norms, ("a", matrix, T.Q4_1), ("c", f16, None), ("d", f16, None)]) == 1  # MOSTLY_F16
    assert _file_type([("c", f16, None), ("a", matrix, T.Q4_1)]) == 1  # a tie: the first in the file
    assert _file_type([*norms, ("a", f32, None)]) == gguf.LlamaFileType.ALL_F32
    assert _file_type([("a", matrix, T.Q4_K)]) == gguf.LlamaFileType.MOSTLY_Q4_K_M  # llama.cpp's loader table
    assert _file_type([("a", matrix, T.Q8_K)]) is None  # no llama.cpp file type: the key is left out
    assert _file_type(norms) is None


@pytest.mark.integration  # a whole merged GGUF of the packaged model, written and read back
def test_merged_gguf_in_q8_0(adapted, tmp_path: Path):
    model, _ = adapted
    path = export_gguf(model, tmp_path / "merged-q8.gguf", format="gguf", outtype="q8_0")
    reader = gguf.GGUFReader(path)
    layer = model.model.layers[0].self_attn.v_proj
    merged = (layer.base_layer.weight.detach() + layer.delta_weight("default")).float()
    stored = _tensor(reader, "blk.0.attn_v.weight")
    assert next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight").tensor_type.name == "Q8_0"
    assert float((stored - merged).abs().max()) <= float(merged.abs().max()) / 127  # one Q8_0 step
    # Only the adapted matrices are quantised: the base's Q8_0 embedding and F32 norms are as stored.
    types = {t.tensor_type.name for t in reader.tensors}
    assert types == {"Q8_0", "F32"} and reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def _unchanged(path: Path, before: bytes) -> bool:
    return path.read_bytes() == before and not [p for p in path.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "DoRA"),
        (lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "trained in full"),
        (lorakit.LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"), "biases"),
        (lorakit.LoraConfig(r=4, target_modules=["lm_head"]), "tied to the embeddings"),
    ],
    ids=["dora", "modules-to-save", "bias", "tied-head"],
)
def test_what_llama_cpp_cannot_carry_is_refused(smollm, tmp_path: Path, config, message):
    model, _ = smollm
    out = tmp_path / "adapter.gguf"
    out.write_bytes(b"an earlier file")
    _adapted(model, config)
    try:
        with pytest.raises(ConfigError, match=message) as err:
            export_gguf(model, out)
        assert "--format gguf" in str(err.value)  # it points to the merged export
    finally:
        lorakit.unload(model)
    assert _unchanged(out, b"an earlier file")


def test_bad_requests_are_refused_and_nothing_is_written(smollm, tmp_path: Path):
    out = tmp_path / "x.gguf"
    gpt2 = tiny_gpt2()
    _adapted(gpt2, lorakit.LoraConfig(r=4, target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        export_gguf(gpt2, out)

    model, _ = smollm
    _adapted(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    try:
        with pytest.raises(ConfigError, match="f32, f16 or bf16"):
            export_gguf(model, out, outtype="q8_0")
        with pytest.raises(ConfigError, match="no lorakit adapter named 'other'"):
            export_gguf(model, out, adapter_name="other")
        # A base GGUF whose weights are not the model's: refused, naming the gap.
        weight = model.model.layers[0].self_attn.q_proj.base_layer.weight
        with torch.no_grad():
            weight.add_(1e-3)
        try:
            with pytest.raises(ConfigError, match="differs from"):
                export_gguf(model, out, format="gguf")
        finally:
            with torch.no_grad():
                weight.sub_(1e-3)
    finally:
        lorakit.unload(model)
    assert not out.exists() and not list(tmp_path.iterdir())

    plain = tiny_llama()  # a LLaMA that was not loaded from a GGUF file
    _adapted(plain, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="convert_hf_to_gguf"):
        export_gguf(plain, out, format="gguf")
    alpha, tensors = gguf_lora_tensors(plain)  # but its adapter exports
    assert alpha == 8 and len(tensors) == 4


LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(
    not LLAMA_CPP,
    reason="llama-cpp-python is not installed: PyPI has only its source, which builds llama.cpp (about 20 min "
    "on 2 cores), too long for .ci/run; it was built and this test run by hand (see the issue note)",
)
def test_llama_cpp_runs_the_adapter_and_the_merged_model(smollm, tmp_path: Path):  # pragma: no cover - optional
    """llama.cpp's own runtime: the base GGUF with the adapter GGUF, and the merged GGUF, against lorakit.

    llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations, so even the base model's
    logits differ from lorakit's (the dequantized weights in fp32): that gap is the yardstick. The
    adapter must move llama.cpp's logits as it moves lorakit's, adding no error of its own."""
    import numpy as np
    from llama_cpp import Llama

    from lorakit.generate import Decoding, generate

    model, tokenizer = smollm
    _adapted(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]))
    try:
        adapter = export_gguf(model, tmp_path / "adapter.gguf")
        merged = export_gguf(model, tmp_path / "merged.gguf", format="gguf")
        base = str(base_gguf_of(model))
        runs = {
            "adapter": Llama(model_path=base, lora_path=str(adapter), n_ctx=256, verbose=False, logits_all=True),
            "merged": Llama(model_path=str(merged), n_ctx=256, verbose=False, logits_all=True),
            "base": Llama(model_path=base, n_ctx=256, verbose=False, logits_all=True),
        }
        ids = tokenizer(PROMPT).input_ids
        logits = {}
        for name, llm in runs.items():
            llm.eval(ids)
            logits[name] = np.array(llm.scores[: len(ids)])
            llm.reset()
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
            with lorakit.disable_adapters(model):
                ours_base = model(torch.tensor([ids])).logits[0].numpy()
        yardstick = np.abs(logits["base"] - ours_base).max()
        effect = np.abs(ours - ours_base).max()
        assert effect > 3 * yardstick  # the adapter matters more than the runtimes' numerics
        assert np.abs(logits["adapter"] - logits["base"]).max() > effect / 2  # llama.cpp applied it
        for name in ("adapter", "merged"):
            assert np.abs(logits[name] - ours).max() < 1.5 * yardstick, name
            assert (logits[name].argmax(-1) == ours.argmax(-1)).mean() >= 0.9, name

        prompts = [PROMPT, "The capital of France is", "def fibonacci(n):"]
        texts = generate(model, tokenizer, prompts, Decoding(max_new_tokens=8))
        for prompt, text in zip(prompts, texts, strict=True):
            a = runs["adapter"](prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"].split()
            b = runs["merged"](prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"].split()
            assert a[:2] == b[:2], (prompt, a, b)
            assert a[0] == b[0] == text.split()[0], (prompt, a, b, text)
    finally:
        lorakit.unload(model)


@pytest.mark.integration  # a whole merged GGUF of the packaged model, written and read back
def test_merged_gguf_from_a_transformers_directory(tmp_path: Path):
    """A base loaded from a transformers directory: the whole GGUF is written (hyper-parameters,
    BPE vocabulary, merges, special tokens, chat template), and transformers reads back the same
    tokenizer and the merged model's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.models import ensure_cached

    folder = ensure_cached("smollm2-135m")
    model, tokenizer, name = load_model(str(folder))
    assert base_gguf_of(model) is None  # not from a GGUF file
    _adapted(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"]))
    path = export_gguf(model, tmp_path / "merged.gguf", format="gguf", outtype="f32")
    reader = gguf.GGUFReader(path)
    source = gguf.GGUFReader(base_gguf_of(load_model("smollm2-135m")[0]))
    assert len(reader.tensors) == len(source.tensors)  # the same tensors as llama.cpp's own conversion
    assert {t.name for t in reader.tensors} == {t.name for t in source.tensors}
    for key in (
        "llama.block_count",
        "llama.attention.head_count_kv",
        "llama.rope.freq_base",
        "tokenizer.chat_template",
    ):
        assert reader.fields[key].contents() == source.fields[key].contents(), key
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert loaded_tokenizer(prompt).input_ids == tokenizer(prompt).input_ids
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=2e-3, rtol=0)
    assert name == str(folder)
