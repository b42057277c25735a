"""Summed sequence log-probabilities (`lorakit.train.logprobs`): the chunked path against the model's
own logits (values and every gradient, 1e-5 relative, a frozen and a LoRA-adapted head, kernels on
and off), packed rows against padded rows, and no (N, V) tensor on the chunked path."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.data.preference import pack_sequences
from lorakit.train import chunked_loss
from lorakit.train.logprobs import sequence_logprobs
from lorakit.train.packed import model_inputs
from tests.conftest import randomize_adapters, tiny_llama
from tests.unit.test_chunked_loss import _LargestTensor

BOUND = 1e-5  # max |chunked − full| ≤ BOUND × max |full|, per tensor


def _model(targets) -> torch.nn.Module:
    model = tiny_llama()
    if targets == "nf4-table":  # NF4 linears, the embeddings and the head stored in bf16 beside them
        lorakit.quantize(model, "nf4")
        targets = ["q_proj", "v_proj"]
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=targets))
    randomize_adapters(model)
    return model.train()


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """4 sequences of 5 to 9 tokens, right-padded; a masked prompt of 2 to 4 tokens each."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (4, 9), generator=gen)
    lengths = [9, 5, 7, 6]
    mask = torch.zeros_like(ids)
    labels = ids.clone()
    for row, (n, prompt) in enumerate(zip(lengths, [2, 4, 3, 2], strict=True)):
        mask[row, :n] = 1
        labels[row, n:] = -100
        labels[row, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _sums_and_grads(model, batch, weights, *, loss, chunk_tokens=None, packed=False, seed=7):
    """Σ weights·sums and the gradient of every trained parameter, from one forward and backward
    with the RNG at `seed` (both paths draw the same dropout masks)."""
    model.zero_grad(set_to_none=True)
    index = None
    inputs = dict(batch)
    if packed:
        inputs = pack_sequences(batch, 16)
        index = inputs.pop("sequence_index")
        inputs = model_inputs(model, inputs)
    labels = inputs.pop("labels")
    torch.manual_seed(seed)
    result = sequence_logprobs(
        model, inputs, labels, sequence_index=index, sequences=4, loss=loss, chunk_tokens=chunk_tokens
    )
    (result.sums * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return result, grads


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.detach(), b.detach()
    diff, scale = float((a - b).abs().max()), float(b.abs().max())
    assert diff <= BOUND * scale, f"{what}: {diff:.3g} of {scale:.3g}"


@pytest.mark.parametrize("chunk_tokens", [3, None], ids=["chunk3", "one-chunk"])
@pytest.mark.parametrize(
    "targets",
    [["q_proj", "v_proj", "gate_proj"], ["q_proj", "v_proj", "lm_head"], "nf4-table"],
    ids=["frozen-head", "lora-head", "bf16-table-head"],
)
def test_sums_and_every_gradient_equal_the_full_logits(both_paths, monkeypatch, targets, chunk_tokens):
    monkeypatch.setattr(chunked_loss, "TABLE_SLICE_ROWS", 7)  # a stored table: many slices of the 64 rows
    model, batch = _model(targets), _batch()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # each sequence's sum gets its own gradient
    chunked, chunked_grads = _sums_and_grads(model, batch, weights, loss="chunked", chunk_tokens=chunk_tokens)
    full, full_grads = _sums_and_grads(model, batch, weights, loss="full")
    # The sums by hand from the full logits: log_softmax, gathered at each scored label.
    with torch.no_grad():
        torch.manual_seed(7)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].log_softmax(-1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    scored = batch["labels"][:, 1:] != -100
    assert torch.allclose(full.sums, (logp * scored).sum(1), rtol=1e-6, atol=1e-5)
    assert full.counts.tolist() == scored.sum(1).tolist() == [7, 1, 4, 4]
    _close(chunked.sums, full.sums, "sums")
    assert torch.equal(chunked.counts, full.counts)
    assert chunked_grads.keys() == full_grads.keys() and len(full_grads) > 0
    for name, grad in full_grads.items():
        assert grad.abs().max() > 0, name
        _close(chunked_grads[name], grad, name)


def test_packed_rows_give_the_padded_sums_and_gradients():
    """Without dropout: the masks are drawn over each layer's input, whose shape differs between
    packed and padded rows, so no layout could draw the other's masks; equality is of the computation."""
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    randomize_adapters(model)
    model.train()
    batch, weights = _batch(seed=2), torch.tensor([0.5, 1.0, -1.0, 2.0])
    padded, padded_grads = _sums_and_grads(model, batch, weights, loss="chunked")
    packed, packed_grads = _sums_and_grads(model, batch, weights, loss="chunked", packed=True)
    assert pack_sequences(batch, 16)["input_ids"].shape[0] < 4  # really packed
    _close(packed.sums, padded.sums, "sums")
    assert torch.equal(packed.counts, padded.counts)
    for name, grad in padded_grads.items():
        _close(packed_grads[name], grad, name)


def test_the_chunked_path_never_allocates_an_n_by_v_tensor():
    model = tiny_llama()
    model.resize_token_embeddings(256, mean_resizing=False)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    model.train()
    ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :2] = -100
    n = int((labels[:, 1:] != -100).sum())
    largest = {}
    for loss in ("chunked", "full"):
        model.zero_grad(set_to_none=True)
        with _LargestTensor() as probe:
            sequence_logprobs(model, {"input_ids": ids}, labels, loss=loss, chunk_tokens=7).sums.sum().backward()
        largest[loss] = probe.largest
    assert largest["full"] >= n * 256 > largest["chunked"], largest
