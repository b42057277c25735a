"""`lorakit.train.chunked_loss`: the causal-LM loss without the N×V logits equals the full path's
loss and every gradient, for each kind of output head, and never allocates an (N, V) tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForSequenceClassification

import lorakit
from lorakit import data as D
from lorakit.errors import ConfigError, TrainingError
from lorakit.evaluate import loss_on
from lorakit.train import TrainConfig, chunked_loss, fit, loss_sum, train_step
from lorakit.train.chunked_loss import chunk_tokens_for, chunked_head, model_loss_sum
from lorakit.train.config import RESUME_FREE_FIELDS
from tests.conftest import randomize_adapters, tiny_gpt2, tiny_llama

# Relative bounds: max |chunked − full| ≤ bound × max |full|, per tensor (a loss is one number).
FP32_BOUND = 1e-5
# bf16: the full path rounds the logits (and a LoRA head's update) to bf16 before the float32 cross
# entropy, the chunked path adds the update in float32; measured 2.4e-4 on the loss and 1.1e-2 on
# the worst gradient of the tiny models (LoRA on lm_head under autocast).
BF16_LOSS_BOUND, BF16_GRAD_BOUND = 1e-3, 2e-2


@pytest.fixture(autouse=True)
def _small_table_slices(monkeypatch):
    """A bf16-stored head is converted 7 vocabulary rows at a time: many slices over 64 tokens."""
    monkeypatch.setattr(chunked_loss, "TABLE_SLICE_ROWS", 7)


def _lora(**kwargs) -> dict:
    return {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, **kwargs}


# id -> (model, LoRA config or None for full fine-tuning, quantize: a scheme for the head too, or
# (scheme, include_head))
CASES = {
    "llama-qv": (tiny_llama, _lora(target_modules=["q_proj", "v_proj"]), None),
    "gpt2-tied-head": (tiny_gpt2, _lora(target_modules=["c_attn"]), None),
    "llama-lora-lm_head": (tiny_llama, _lora(target_modules=["q_proj", "v_proj", "lm_head"]), None),
    "gpt2-lora-on-tied-lm_head": (tiny_gpt2, _lora(target_modules=["c_attn", "lm_head"]), None),
    "llama-modules_to_save-lm_head": (
        tiny_llama,
        _lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        None,
    ),
    "gpt2-modules_to_save-lm_head": (tiny_gpt2, _lora(target_modules=["c_attn"], modules_to_save=["lm_head"]), None),
    # Every weight trains: the tied head's gradient must reach the input embedding.
    "gpt2-full-fine-tuning": (tiny_gpt2, None, None),
    "llama-quantized-head": (tiny_llama, _lora(target_modules=["q_proj", "v_proj"]), "bf16"),
    "llama-lora-on-quantized-head": (tiny_llama, _lora(target_modules=["q_proj", "lm_head"]), "bf16"),
    # NF4 linears with the embeddings and head stored beside them in bf16 (converted a slice at a time)
    "llama-nf4-bf16-head-table": (tiny_llama, _lora(target_modules=["q_proj", "v_proj"]), ("nf4", False)),
    "gpt2-bf16-tied-table": (tiny_gpt2, _lora(target_modules=["c_attn"]), ("nf4", False)),
    # A DoRA head is computed by the per-chunk checkpoint of its own call. Without dropout: that path
    # draws a chunk's masks over the chunk, not over the whole input as the full path does.
    "llama-dora-lm_head": (
        tiny_llama,
        _lora(target_modules=["q_proj", "lm_head"], use_dora=True, lora_dropout=0.0),
        None,
    ),
}


def _model(case: str, dtype: torch.dtype = torch.float32, vocab: int | None = None) -> nn.Module:
    make, config, quantized = CASES[case]
    model = make().to(dtype)
    if vocab is not None:  # tied heads stay tied
        model.resize_token_embeddings(vocab, mean_resizing=False)
    if quantized is not None:
        scheme, include_head = (quantized, True) if isinstance(quantized, str) else quantized
        lorakit.quantize(model, scheme, include_head=include_head)
    if config is not None:
        lorakit.inject(model, lorakit.LoraConfig(**config))
        randomize_adapters(model)  # B ≠ 0: every gradient is non-trivial
    return model.train()


def _labels(ids: torch.Tensor) -> torch.Tensor:
    """Targets everywhere but: row 0 none at all, row 1 one only at position 0 (never a target: no
    position predicts it), row 2 -100 in the middle, row 3 a masked prompt."""
    labels = ids.clone()
    labels[0] = -100
    labels[1, 1:] = -100
    labels[2, 3:6] = -100
    labels[3, :4] = -100
    return labels


def _batch(rows: int = 5, seq: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return ids, _labels(ids)


def _loss_and_grads(model, ids, labels, *, loss, chunk_tokens=None, label_smoothing=0.0, seed=7):
    """The summed loss and the gradient of every parameter and of the input embeddings, from one
    forward and backward with the RNG at `seed` (so both paths draw the same dropout masks)."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    torch.manual_seed(seed)
    summed = model_loss_sum(
        model, {"inputs_embeds": embeds}, labels, label_smoothing, loss=loss, chunk_tokens=chunk_tokens
    )
    summed.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return summed.detach(), {"inputs_embeds": embeds.grad.clone(), **grads}


def _assert_relatively_close(chunked: torch.Tensor, full: torch.Tensor, bound: float, what: str) -> None:
    diff = (chunked.float() - full.float()).abs().max().item()
    scale = full.float().abs().max().item()
    assert diff <= bound * scale, (
        f"{what}: max |chunked - full| = {diff:.3g}, {diff / max(scale, 1e-30):.3g} of max |full|"
    )


def _assert_same(model, ids, labels, *, bound_loss, bound_grad, **kwargs) -> None:
    chunked, chunked_grads = _loss_and_grads(model, ids, labels, loss="chunked", **kwargs)
    full, full_grads = _loss_and_grads(model, ids, labels, loss="full", **kwargs)
    assert chunked_grads.keys() == full_grads.keys()
    _assert_relatively_close(chunked, full, bound_loss, "loss")
    for name, grad in full_grads.items():
        assert grad.abs().max() > 0, f"{name}: a zero gradient would make the comparison trivial"
        _assert_relatively_close(chunked_grads[name], grad, bound_grad, name)


# ------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000], ids=["chunk1", "chunk7", "chunk-over-N"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_every_gradient_equal_the_full_path(case, chunk_tokens):
    model = _model(case)
    assert chunked_head(model) is model.get_output_embeddings()  # the chunked path does run
    ids, labels = _batch()
    _assert_same(model, ids, labels, bound_loss=FP32_BOUND, bound_grad=FP32_BOUND, chunk_tokens=chunk_tokens)


@pytest.mark.parametrize("case", list(CASES))
def test_label_smoothing_is_cross_entropys(case):
    model = _model(case)
    ids, labels = _batch()
    _assert_same(model, ids, labels, bound_loss=FP32_BOUND, bound_grad=FP32_BOUND, chunk_tokens=7, label_smoothing=0.1)


@pytest.mark.parametrize("case", ["llama-lora-lm_head", "llama-modules_to_save-lm_head", "gpt2-tied-head"])
def test_bf16_within_the_stated_bound(case):
    model = _model(case, torch.bfloat16)
    ids, labels = _batch()
    _assert_same(model, ids, labels, bound_loss=BF16_LOSS_BOUND, bound_grad=BF16_GRAD_BOUND, chunk_tokens=7)


@pytest.mark.parametrize("case", ["llama-lora-lm_head", "gpt2-modules_to_save-lm_head"])
def test_bf16_autocast_within_the_stated_bound(case):
    model = _model(case)
    ids, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same(model, ids, labels, bound_loss=BF16_LOSS_BOUND, bound_grad=BF16_GRAD_BOUND, chunk_tokens=7)


@pytest.mark.parametrize("case", ["llama-lora-lm_head", "gpt2-full-fine-tuning", "llama-dora-lm_head"])
def test_a_batch_without_targets_gives_zero_and_a_zero_gradient_to_every_trained_parameter(case):
    # DDP expects a gradient for every parameter that trains, even from a batch that counts nothing.
    model = _model(case)
    ids, _ = _batch()
    loss, grads = _loss_and_grads(model, ids, torch.full_like(ids, -100), loss="chunked", chunk_tokens=7)
    assert loss.item() == 0.0
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained <= grads.keys()
    assert all(g.abs().max() == 0 for g in grads.values())


# ------------------------------------------------------------------------------ train_step
def test_train_step_chunked_equals_full(both_paths):
    """One optimizer step over two micro-batches (clipping on, dropout on q, v and the LoRA lm_head)."""
    ids, labels = _batch(rows=6)
    micro = [{"input_ids": ids[:3], "labels": labels[:3]}, {"input_ids": ids[3:], "labels": labels[3:]}]
    after = {}
    for loss in ("chunked", "full"):
        model = _model("llama-lora-lm_head")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        torch.manual_seed(3)
        result = train_step(model, micro, optimizer, max_grad_norm=1.0, loss=loss, chunk_tokens=5)
        after[loss] = (result, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    (chunked, chunked_params), (full, full_params) = after["chunked"], after["full"]
    assert chunked.loss == pytest.approx(full.loss, rel=FP32_BOUND)
    assert chunked.grad_norm == pytest.approx(full.grad_norm, rel=FP32_BOUND)
    initial = {n: p for n, p in _model("llama-lora-lm_head").named_parameters() if p.requires_grad}
    for name, value in full_params.items():
        # Compare the updates (value − initial): the parameters themselves are dominated by their start.
        _assert_relatively_close(chunked_params[name] - initial[name], value - initial[name], FP32_BOUND, name)


def test_chunked_is_fits_default_full_its_reference_and_either_resumes_the_other(tmp_path):
    assert TrainConfig().loss == "chunked"
    # Only rounding differs, so a run may be resumed with the other loss.
    assert "loss" in RESUME_FREE_FIELDS
    assert TrainConfig(loss="full").resume_differences(TrainConfig().to_dict()) == []
    ids, labels = _batch(rows=4)
    largest = {}
    for loss in ("chunked", "full"):
        model = _model("llama-qv")
        cfg = TrainConfig(max_steps=1, batch_size=4, save_every=None, loss=loss)
        with _LargestTensor() as probe:
            fit(
                model,
                lambda e, s: iter([{"input_ids": ids, "labels": labels}]),
                cfg,
                tmp_path / loss,
                batches_per_epoch=1,
            )
        largest[loss] = probe.largest
    logits = ids.numel() * 64  # the batch's (rows, seq, vocab) logits
    assert largest["full"] >= logits > largest["chunked"], largest


# ------------------------------------------------------------------------------------ memory
class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("case", ["llama-lora-lm_head", "gpt2-full-fine-tuning", "llama-modules_to_save-lm_head"])
def test_the_chunked_path_never_allocates_an_n_by_v_tensor_and_the_full_path_does(case):
    # A vocabulary of 256, so that N×V (96×256) is more than any other tensor of the step (GPT-2's
    # MLP is (16·8)×64, the head's weight and its gradient 256×16).
    model = _model(case, vocab=256)
    ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :2] = -100
    n, vocab = int((labels[:, 1:] != -100).sum()), model.config.vocab_size
    largest = {}
    for loss in ("chunked", "full"):
        model.zero_grad(set_to_none=True)
        with _LargestTensor() as probe:
            model_loss_sum(model, {"input_ids": ids}, labels, loss=loss, chunk_tokens=7).backward()
        largest[loss] = probe.largest
    assert largest["full"] >= n * vocab, largest  # the probe sees the logits where they exist
    assert largest["chunked"] < n * vocab, largest


def test_evaluation_loss_is_chunked_and_equals_the_full_path():
    model, ds = tiny_llama(), D.TokenizedDataset([], [], pad_id=0, seq_len=32)
    gen = torch.Generator().manual_seed(0)
    for i in range(6):
        ids = torch.randint(1, 64, (6 + i,), generator=gen).tolist()
        ds.input_ids.append(ids)
        ds.labels.append([-100] * 3 + ids[3:])
    largest = {}
    values = {}
    for loss in ("chunked", "full"):
        with _LargestTensor() as probe:
            values[loss] = loss_on(model, ds, batch_size=6, loss=loss)
        largest[loss] = probe.largest
    assert values["chunked"] == pytest.approx(values["full"], rel=FP32_BOUND)
    logits = 6 * 11 * 64  # the padded batch's (rows, seq, vocab) logits
    assert largest["full"] >= logits > largest["chunked"], largest


# --------------------------------------------------------------------------- where it steps aside
def test_classification_labels_take_the_logits():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    model = LlamaForSequenceClassification(config).eval()
    ids, labels = torch.randint(1, 64, (4, 6)), torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        expected = loss_sum(model(input_ids=ids).logits, labels)
        assert model_loss_sum(model, {"input_ids": ids}, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_compiled_hooked_and_logit_transforming_models_take_the_full_path():
    model = tiny_llama()
    assert chunked_head(model) is model.lm_head
    assert chunked_head(torch.compile(model)) is None  # compiled lazily: nothing compiles here
    compiled = tiny_llama()
    compiled.compile()
    assert chunked_head(compiled) is None
    softcapped = tiny_llama()
    softcapped.config.final_logit_softcapping = 30.0
    assert chunked_head(softcapped) is None

    hooked = _model("llama-lora-lm_head").eval()
    handle = hooked.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    assert chunked_head(hooked) is None
    ids, labels = _batch()
    with torch.no_grad():
        expected = loss_sum(hooked(input_ids=ids).logits, labels)
        assert model_loss_sum(hooked, {"input_ids": ids}, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    handle.remove()
    assert chunked_head(hooked) is hooked.lm_head


class _ScaledLogits(nn.Module):
    """A causal LM whose forward changes its head's output, where no config field says so."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(64, 8), nn.Linear(8, 64)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids)) * 2


def test_a_model_that_changes_its_heads_output_is_refused_and_restored():
    model = _ScaledLogits()
    ids, labels = _batch()
    with pytest.raises(TrainingError, match="loss='full'"):
        model_loss_sum(model, {"input_ids": ids}, labels)
    assert "forward" not in vars(model.head)  # the bypass is undone
    expected = loss_sum(model(ids), labels)
    assert model_loss_sum(model, {"input_ids": ids}, labels, loss="full").item() == expected.item()


# ------------------------------------------------------------------------------------- input
def test_a_bad_loss_setting_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"loss must be one of 'chunked', 'full', got 'fused'"):
        TrainConfig(loss="fused")
    model = _model("llama-qv")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, labels = _batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    with pytest.raises(ConfigError, match=r"'chunked', 'full'.*chunk_tokens must be an integer >= 1"):
        train_step(model, [{"input_ids": ids, "labels": labels}], optimizer, loss="fused", chunk_tokens=0)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_label_outside_the_vocabulary_is_named():
    model = _model("llama-qv")
    ids, labels = _batch()
    labels[4, 5] = 64
    with pytest.raises(TrainingError, match=r"label 64 is outside the vocabulary .*0 to 63"):
        model_loss_sum(model, {"input_ids": ids}, labels)


def test_the_default_chunk_holds_tens_of_megabytes_of_logits():
    assert chunk_tokens_for(49_152) == 341 and chunk_tokens_for(32_000) == 524
    assert round(341 * 49_152 * 4 / 2**20) == 64  # MiB of float32 logits
    assert chunk_tokens_for(10**9) == 1
