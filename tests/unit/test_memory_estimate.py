"""`lorakit.memory`: the preflight estimate, from a model's config alone, against the real thing.

Weights and the adapters' state are counted exactly, so they must equal the bytes of a real model
quantized with `lorakit.quantize` and of a real AdamW step. Activations are a model of what
autograd keeps: within 25% of what `saved_tensors_hooks` sees a real training forward save, and
of the peak of live tensors over a whole step (forward, loss, backward), with and without
gradient checkpointing.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, memory
from lorakit.errors import ConfigError
from lorakit.models.pretrained import dtype_kwargs
from lorakit.quantization import QuantizedLinear, quantized_bytes, stored_bytes
from lorakit.train import TrainConfig, build_optimizer
from lorakit.train.checkpointing import enable_grad_checkpointing
from lorakit.train.chunked_loss import model_loss_sum
from tests.conftest import tiny_gpt2, tiny_llama

VOCAB = 1000


def small_llama(dtype: torch.dtype = torch.float32, kv_heads: int = 4) -> LlamaForCausalLM:
    """The issue's measuring model: 4 layers, hidden 256 (SwiGLU 688), 4 heads."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def small_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=4, n_positions=512)
    return GPT2LMHeadModel(cfg)


def batch(rows: int, seq: int, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Random tokens, the first row padded at its end (as right-padded training batches are)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -10:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("scheme", [None, "nf4", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_weight_bytes_equal_the_real_models(make, dtype, scheme):
    # Built in `dtype` as from_pretrained builds it (rotary tables stay float32), with real weights.
    model = AutoModelForCausalLM.from_config(make().config, **dtype_kwargs(dtype))
    est = memory.estimate(model.config, quantize=scheme, dtype=dtype)
    if scheme is not None:
        lorakit.quantize(model, scheme)
    assert est.weight_bytes == quantized_bytes(model)
    assert est.buffers == sum(b.numel() * b.element_size() for b in model.buffers())
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear) and not m.stores_table]
    if scheme is not None and quantized:  # GPT-2's layers are Conv1D: quantize leaves them alone
        assert est.weights[f"linear ({scheme})"] == sum(stored_bytes(m.weight) for m in quantized)
    else:
        assert not any(kind in est.weights for kind in ("linear (nf4)", "linear (bf16)"))


def test_tied_weights_count_once():
    model = tiny_gpt2()  # lm_head.weight is wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight
    est = memory.estimate(model.config)
    assert est.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    assert "output head" not in est.weights


def test_nf4_refuses_what_it_cannot_block_before_anything_loads():
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=20, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2
    )  # q_proj 20×20 = 400 values, not a multiple of 64
    with pytest.raises(ConfigError, match=r"multiple of 64.*q_proj \(20×20\)"):
        memory.estimate(cfg, quantize="nf4")


# ----------------------------------------------------------------------------- adapters + optimizer
ADAPTERS = {
    "q,v": (LoraConfig(r=4, lora_dropout=0.05), None),
    "all-linear nf4": (LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.05), "nf4"),
    "bf16 adapters": (LoraConfig(r=4, target_modules="all-linear", adapter_dtype="bfloat16", lora_dropout=0.05), None),
    "dora": (LoraConfig(r=4, use_dora=True, lora_dropout=0.05), None),
    "saved head + biases": (
        LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], bias="all", lora_dropout=0.05),
        None,
    ),
}


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_adapter_state_equals_one_real_adamw_step(case):
    config, scheme = ADAPTERS[case]
    model = tiny_llama()
    est = memory.estimate(model.config, quantize=scheme, lora=config, batch_size=2, seq_len=16)
    if scheme is not None:
        lorakit.quantize(model, scheme)
    lorakit.inject(model, config).train()
    optimizer = build_optimizer(model, TrainConfig())
    inputs = batch(2, 16, vocab=model.config.vocab_size)
    model(**inputs).loss.backward()
    optimizer.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert est.trainable_parameters == sum(p.numel() for p in trainable)
    assert est.adapters == sum(p.numel() * p.element_size() for p in trainable)
    assert est.gradients == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert est.optimizer == sum(t.numel() * t.element_size() for t in state)


# ------------------------------------------------------------------------------------------ activations
def saved_bytes(model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """Bytes autograd saves in one training forward of the decoder (the head and loss apart): every
    storage a `saved_tensors_hooks` pack sees once, parameters and buffers left out."""
    weights = {
        t.untyped_storage().data_ptr()
        for t in (*model.parameters(), *model.buffers())
        if type(t) in (torch.Tensor, nn.Parameter)
    }
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if type(t) in (torch.Tensor, nn.Parameter):  # an NF4 weight is a parameter, not an activation
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    decoder = model.get_decoder()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return sum(seen.values())


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes of live tensor storages created inside the mode (an allocator's view:
    every op's new outputs count until their storage is freed; views of existing storages do not)."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.live = {t.untyped_storage().data_ptr(): 0 for t in existing if type(t) in (torch.Tensor, nn.Parameter)}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if type(t) is torch.Tensor and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
                    self.peak = max(self.peak, self.now)
        return out


def trained(make, config: LoraConfig, scheme: str | None) -> nn.Module:
    model = make()
    if scheme is not None:
        lorakit.quantize(model, scheme)
    return lorakit.inject(model, config).train()


ACTIVATIONS = {
    "llama q,v": (small_llama, LoraConfig(r=8, lora_dropout=0.05), None),
    "llama all-linear (gated-MLP node)": (
        small_llama,
        LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05),
        None,
    ),
    "llama all-linear nf4": (small_llama, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05), "nf4"),
    "llama bf16 q,v": (lambda: small_llama(torch.bfloat16), LoraConfig(r=8, lora_dropout=0.05), None),
    "llama GQA o,down": (
        lambda: small_llama(kv_heads=2),
        LoraConfig(r=8, target_modules=["o_proj", "down_proj"], lora_dropout=0.05),
        None,
    ),
    "gpt2 all-linear": (small_gpt2, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05), None),
}


@pytest.mark.parametrize("case", list(ACTIVATIONS))
def test_saved_activations_within_a_quarter_of_what_autograd_saves(case):
    make, config, scheme = ACTIVATIONS[case]
    model = trained(make, config, scheme)
    dtype = make().dtype  # the model's compute dtype (a quantized model's tables are bf16)
    inputs = batch(2, 128)
    est = memory.estimate(make().config, quantize=scheme, lora=config, batch_size=2, seq_len=128, dtype=dtype)
    measured = saved_bytes(model, inputs)
    assert est.activations.saved == pytest.approx(measured, rel=0.25), (est.activations, measured)


@pytest.mark.parametrize("loss", ["chunked", "full"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["whole", "checkpointed"])
@pytest.mark.parametrize("target", ["q,v", "all-linear"])
def test_step_peak_within_a_quarter_of_the_live_tensors(target, checkpointing, loss):
    """Activations and loss together: the peak of live tensors over forward, loss and backward."""
    config = LoraConfig(r=8, target_modules=None if target == "q,v" else "all-linear", lora_dropout=0.05)
    model = trained(small_llama, config, None)
    if checkpointing:
        enable_grad_checkpointing(model)
    inputs = batch(2, 128)
    est = memory.estimate(
        model.config, lora=config, batch_size=2, seq_len=128, grad_checkpointing=checkpointing, loss=loss
    )
    tracker = LiveBytes([*model.parameters(), *model.buffers(), *inputs.values()])
    features = {k: v for k, v in inputs.items() if k != "labels"}
    with tracker:
        model_loss_sum(model, features, inputs["labels"], loss=loss).backward()
    expected = est.activations.peak(checkpointing, est.loss[loss])
    assert expected == pytest.approx(tracker.peak, rel=0.25), (est.activations, est.loss, tracker.peak)


def test_checkpointing_and_chunks_lower_the_estimate_as_measured():
    """The ordering the choices promise, on a SmolLM2-like shape at 8×512 (estimate only)."""
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    config = LoraConfig(r=16, target_modules="all-linear", lora_dropout=0.05)
    est = memory.estimate(cfg, lora=config, batch_size=8, seq_len=512)
    assert est.activations.total(True) < 0.5 * est.activations.total(False)
    assert est.loss["chunked"] < 0.1 * est.loss["full"]
    assert est.total_for(True, "chunked") < est.total_for(False, "chunked") < est.total_for(False, "full")


# ------------------------------------------------------------------------------------------ available memory
def test_available_memory_reads_the_machine_and_the_override(monkeypatch):
    monkeypatch.delenv(memory.AVAILABLE_MEMORY_ENV, raising=False)
    total = (
        int(
            next(
                line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
            ).split()[1]
        )
        * 1024
    )
    assert 0 < memory.available_memory() <= total
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    assert memory.available_memory("cuda") == free  # no CUDA device: unknown, not an error
    for given, expected in (("123456", 123456), ("16G", 16 * 2**30), ("1.5 GiB", 3 * 2**29), ("512m", 512 * 2**20)):
        monkeypatch.setenv(memory.AVAILABLE_MEMORY_ENV, given)
        assert memory.available_memory() == expected
        assert memory.available_memory("cuda") == expected  # the override wins everywhere
    monkeypatch.setenv(memory.AVAILABLE_MEMORY_ENV, "plenty")
    with pytest.raises(ConfigError, match="LORAKIT_AVAILABLE_MEMORY='plenty' is not a size"):
        memory.available_memory()


def test_the_report_says_whether_it_fits():
    est = memory.estimate(tiny_llama().config, quantize="nf4", batch_size=4, seq_len=32)
    lines = memory.report(est, est.total + 1)
    assert lines[0] == "memory estimate for training, batch 4 × 32 tokens, linear layers as nf4:"
    assert [line.split()[0] for line in lines[1:8]] == [
        "weights",
        "adapters",
        "activations",
        "loss",
        "runtime",
        "total",
        "available",
    ]
    assert lines[-1].startswith(f"fits: the estimate, {memory.format_bytes(est.total)}, is 100% of the available")
    assert memory.report(est, None)[-1] == f"available RAM is unknown: the estimate is {memory.format_bytes(est.total)}"
    short = memory.report(est, est.total - 1)[-1]
    assert short.startswith("does not fit") and "--grad-checkpointing" in short and "--quantize nf4" not in short
    assert "a smaller --batch-size" in short


def test_bad_options_are_refused_together():
    with pytest.raises(ConfigError) as err:
        memory.estimate(tiny_llama().config, quantize="int8", batch_size=0, seq_len=-1, loss="sum")
    for name in ("batch_size", "seq_len", "quantize", "loss"):
        assert name in str(err.value)
