"""Packing and length grouping (`lorakit.data.packing`, `lorakit.train.packed`): the rows, their layout,
and the loss and every LoRA gradient of packed rows equal to the same examples unpacked, on the
packaged SmolLM2 — one batch, and a whole optimizer step over accumulated micro-batches."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

import lorakit
import lorakit.data as D
from lorakit.data.packing import (
    best_fit_decreasing,
    collate_packed,
    length_grouped_order,
    num_rows,
    packed_rows,
    packing_stats,
)
from lorakit.errors import ConfigError, DataError
from lorakit.models import load_model, load_tokenizer
from lorakit.train import TrainConfig, disable_grad_checkpointing, enable_grad_checkpointing, train_step
from lorakit.train.chunked_loss import model_loss_sum
from lorakit.train.config import RESUME_FREE_FIELDS
from lorakit.train.loss import count_targets
from lorakit.train.packed import check_packable, flattened, is_packed, model_inputs
from tests.conftest import tiny_llama

# max |packed − unpacked| ≤ BOUND × max |unpacked|, per tensor (the loss is one number).
BOUND = 1e-5


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def e2e(tokenizer) -> D.TokenizedDataset:
    """The bundled E2E sample, tokenised for SmolLM2 at seq_len 128 (rows of about 25 to 70 tokens)."""
    return D.tokenize_examples(D.load_examples("e2e"), tokenizer, 128)


@pytest.fixture(scope="module")
def smollm2() -> nn.Module:
    """The packaged SmolLM2 cut to 2 decoder blocks, LoRA on every linear layer, B drawn non-zero so
    every A has a gradient too. Without dropout: its masks are drawn over each layer's input, whose
    shape and element order differ between packed rows and unpacked rows, so no layout could draw
    the same masks as the other; the equality is of the computation, the masks aside."""
    model, _, _ = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.02)
    return model.train()


def _diverse(dataset: D.TokenizedDataset, count: int) -> list[int]:
    """`count` rows of the dataset spread over its range of lengths (shortest to longest)."""
    by_length = sorted(range(len(dataset)), key=lambda i: len(dataset.input_ids[i]))
    step = (len(by_length) - 1) / (count - 1)
    return [by_length[round(k * step)] for k in range(count)]


def _subset(dataset: D.TokenizedDataset, rows: list[int], seq_len: int | None = None) -> D.TokenizedDataset:
    """The given rows; every other one trained on all its tokens, as a `text` record is, so its first
    token has a label too (which packing must not predict from the example before it)."""
    return D.TokenizedDataset(
        [dataset.input_ids[i] for i in rows],
        [list(dataset.input_ids[i]) if k % 2 else dataset.labels[i] for k, i in enumerate(rows)],
        pad_id=dataset.pad_id,
        seq_len=seq_len or dataset.seq_len,
    )


def _loss_and_grads(model: nn.Module, batch: dict, loss: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    inputs = dict(batch)
    labels = inputs.pop("labels")
    summed = model_loss_sum(model, inputs, labels, loss=loss)
    summed.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return summed.detach(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------------- the rows
def test_best_fit_decreasing_by_hand():
    # Longest first: 5 opens row A (3 left); 4 opens B (4 left); 3 fills A (3 left is the best fit);
    # 3 goes to B (1 left); 2 opens C; 1 fills B.
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8, range(6)) == [[0, 2], [1, 3, 5], [4]]
    # Equal lengths are taken in the given order: swapping the two 3s swaps them in the rows.
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8, [0, 1, 3, 2, 4, 5]) == [[0, 3], [1, 2, 5], [4]]
    with pytest.raises(DataError, match="seq_len"):
        best_fit_decreasing([3, 9], 8, range(2))


def test_packed_rows_hold_every_example_once_and_their_number_is_the_same_every_epoch(e2e):
    lengths = [len(ids) for ids in e2e.input_ids]
    epochs = [packed_rows(e2e, seed=3, epoch=epoch) for epoch in range(3)]
    assert epochs[0] == packed_rows(e2e, seed=3, epoch=0)  # fixed by (seed, epoch)
    assert epochs[0] != epochs[1] and epochs[0] != packed_rows(e2e, seed=4, epoch=0)
    for rows in epochs:
        assert len(rows) == num_rows(e2e)
        assert sorted(i for row in rows for i in row) == list(range(len(e2e)))
        assert max(sum(lengths[i] for i in row) for row in rows) <= e2e.seq_len
        # The same row lengths every epoch: only which of equally long examples go where changes.
        assert sorted(sum(lengths[i] for i in row) for row in rows) == sorted(
            sum(lengths[i] for i in row) for row in epochs[0]
        )
    stats = packing_stats(e2e)
    assert stats.rows == num_rows(e2e) < len(e2e) / 2  # E2E rows are under half of 128 tokens
    assert stats.tokens == sum(lengths) and stats.fill == pytest.approx(sum(lengths) / (stats.rows * 128))
    assert f"into {stats.rows:,} rows of 128 tokens, {100 * stats.fill:.1f}% full" in str(stats)
    assert D.num_batches(e2e, 8, packing=True) == -(-stats.rows // 8)


def test_collate_packed_lays_out_positions_labels_and_padding():
    ids = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    dataset = D.TokenizedDataset(ids, [[-100, 12, 13], [21, 22], [-100, -100, 33, 34]], pad_id=0, seq_len=8)
    batch = collate_packed(dataset, [[0, 1], [2]])
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]  # padding continues
    # Each example's first label is -100 (21 would be predicted from 13, across the boundary).
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22], [-100, -100, 33, 34, -100]]
    assert count_targets(batch["labels"]) == count_targets(dataset.collate([0, 1, 2])["labels"]) == 5
    assert is_packed(batch) and not is_packed(dataset.collate([0, 1, 2]))
    assert not is_packed(collate_packed(dataset, [[0], [2]]))  # one example a row: nothing to keep apart


def test_model_inputs_per_attention_implementation():
    dataset = D.TokenizedDataset([[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[5, 6, 7], [8, 9], [10, 11, 12, 13]], 0, 8)
    batch = collate_packed(dataset, [[0, 1], [2]])
    model = tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    sdpa = model_inputs(model, batch)
    assert "attention_mask" not in sdpa and sdpa["use_cache"] is False
    assert torch.equal(sdpa["position_ids"], batch["position_ids"])
    model.config._attn_implementation = "flash_attention_2"  # the form is chosen from the config alone
    flash = model_inputs(model, batch)
    assert flash["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]  # the padding is gone
    assert flash["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert flash["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 11, 12, 13]]
    assert flash["cu_seq_lens_q"].tolist() == flash["cu_seq_lens_k"].tolist() == [0, 3, 5, 9]
    assert flash["cu_seq_lens_q"].dtype == torch.int32 and flash["max_length_q"] == flash["max_length_k"] == 4
    unpacked = dataset.collate([0, 1])
    assert model_inputs(model, unpacked) is unpacked


# ------------------------------------------------------------------------------- the equality
@pytest.mark.parametrize("loss", ["chunked", "full"])
def test_packed_batch_has_the_loss_and_gradients_of_the_same_examples_unpacked(smollm2, e2e, loss, both_paths):
    rows = _diverse(e2e, 10)
    dataset = _subset(e2e, rows, seq_len=192)  # rows of up to 192 tokens: three or more examples each
    packed = packed_rows(dataset, seed=0, epoch=0)
    assert any(len(row) >= 3 for row in packed) and len({len(r) for r in packed}) > 1
    batch = collate_packed(dataset, packed)
    assert batch["attention_mask"].eq(0).any()  # rows of different lengths: padding too
    expected_loss, expected = _loss_and_grads(smollm2, dataset.collate(range(len(rows))), loss)
    assert len(expected) == 2 * 7 * 2  # A and B of 7 linear layers in each of 2 blocks
    layouts = {"sdpa": model_inputs(smollm2, batch), "flash layout": flattened(batch)}
    for layout, inputs in layouts.items():
        got_loss, got = _loss_and_grads(smollm2, inputs, loss)
        assert abs(float(got_loss - expected_loss)) <= BOUND * abs(float(expected_loss)), layout
        worst = max(_relative(got[k], expected[k]) for k in expected)
        assert worst <= BOUND, f"{layout}: a gradient differs by {worst:.2g} of its size"


def test_packed_rows_under_gradient_checkpointing_keep_the_gradients(smollm2, e2e):
    """Each block recomputed in the backward gets the same block-diagonal mask and positions."""
    dataset = _subset(e2e, _diverse(e2e, 10), seq_len=192)
    batch = collate_packed(dataset, packed_rows(dataset, seed=0, epoch=0))
    expected_loss, expected = _loss_and_grads(smollm2, dataset.collate(range(10)), "chunked")
    enable_grad_checkpointing(smollm2)
    try:
        got_loss, got = _loss_and_grads(smollm2, model_inputs(smollm2, batch), "chunked")
    finally:
        disable_grad_checkpointing(smollm2)
    assert abs(float(got_loss - expected_loss)) <= BOUND * abs(float(expected_loss))
    assert max(_relative(got[k], expected[k]) for k in expected) <= BOUND


def test_without_the_packed_layout_attention_would_cross_examples(smollm2, e2e):
    """The equality above is not vacuous: the same packed row read as one sequence (its attention
    mask kept, so transformers does not look for packed positions) gives another loss."""
    dataset = _subset(e2e, _diverse(e2e, 6))
    batch = collate_packed(dataset, packed_rows(dataset, seed=0, epoch=0))
    unpacked = dataset.collate(range(6))
    with torch.no_grad():
        expected = model_loss_sum(smollm2, {k: v for k, v in unpacked.items() if k != "labels"}, unpacked["labels"])
        crossing = model_loss_sum(smollm2, {k: v for k, v in batch.items() if k != "labels"}, batch["labels"])
    assert abs(float(crossing - expected)) > 1e-3 * abs(float(expected))


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_accumulating_four_batches_of_two_is_one_batch_of_eight(smollm2, e2e, packing):
    dataset = _subset(e2e, _diverse(e2e, 40))
    small = list(D.iterate_batches(dataset, 2, seed=1, epoch=0, packing=packing))[:4]
    (big,) = list(D.iterate_batches(dataset, 8, seed=1, epoch=0, packing=packing))[:1]
    assert torch.equal(torch.cat([b["labels"][:, :4] for b in small]), big["labels"][:, :4])  # the same rows
    results = []
    for micro in (small, [big]):
        smollm2.zero_grad(set_to_none=True)
        step = train_step(smollm2, micro, None)
        results.append((step, {n: p.grad.clone() for n, p in smollm2.named_parameters() if p.requires_grad}))
        smollm2.zero_grad(set_to_none=True)
    (step_a, grads_a), (step_b, grads_b) = results
    assert step_a.loss == pytest.approx(step_b.loss, rel=BOUND)
    assert step_a.input_tokens == step_b.input_tokens == int(big["attention_mask"].sum())
    assert max(_relative(grads_a[k], grads_b[k]) for k in grads_b) <= BOUND
    # The step's loss is the mean over its trained tokens: the summed cross entropy / their count.
    with torch.no_grad():
        inputs = dict(model_inputs(smollm2, big))
        labels = inputs.pop("labels")
        total = float(model_loss_sum(smollm2, inputs, labels))
    assert step_b.loss == pytest.approx(total / count_targets(big["labels"]), rel=BOUND)


# ------------------------------------------------------------------------------ the model check
def test_check_packable_accepts_sdpa_and_eager(smollm2):
    check_packable(smollm2)
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    check_packable(model)
    check_packable(tiny_llama().to(torch.bfloat16))  # bf16 rounding is within the probe's bound


class _RunningMean(nn.Module):
    """A tiny causal LM that mixes every earlier token into each position (a running mean) and
    takes `position_ids` without keeping sequences apart."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.head = nn.Linear(4, 16)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        x = self.embed(input_ids)
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        return self.head(x.cumsum(dim=1) / steps)


class _NoPositions(_RunningMean):
    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return super().forward(input_ids)


def test_check_packable_refuses_a_model_whose_attention_crosses_examples():
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match=r"does not keep packed examples apart.*train without packing"):
        check_packable(_RunningMean())
    with pytest.raises(ConfigError, match="does not take position_ids"):
        check_packable(_NoPositions())


def test_check_packable_leaves_the_model_mode_and_rng_as_they_were():
    model = tiny_llama().train()
    state = torch.random.get_rng_state()
    check_packable(model)
    assert model.training and torch.equal(torch.random.get_rng_state(), state)
    assert isinstance(model, LlamaForCausalLM)


# -------------------------------------------------------------------------- grouping by length
def test_length_grouped_order_sorts_within_mega_batches_and_leads_with_the_longest():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(1000)]
    order = length_grouped_order(lengths, 4, seed=0, epoch=0)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, 4, seed=0, epoch=0)
    assert order != length_grouped_order(lengths, 4, seed=0, epoch=1)
    assert lengths[order[0]] == max(lengths)
    mega = 50 * 4  # min(1000 // 16, 50) batches of 4
    for start in range(0, 1000, mega):
        group = [lengths[i] for i in order[start : start + mega]][1:]  # the first may be the swapped-in longest
        assert group == sorted(group, reverse=True)

    def padding(order: list[int]) -> int:
        return sum(
            max(lengths[i] for i in order[k : k + 4]) * 4 - sum(lengths[i] for i in order[k : k + 4])
            for k in range(0, len(order), 4)
        )

    shuffled = list(range(1000))
    random.Random("lorakit-batches:0:0").shuffle(shuffled)
    assert padding(order) < padding(shuffled) / 10


@pytest.mark.parametrize("mode", ["packing", "group_by_length"])
def test_a_resumed_epoch_reads_exactly_the_remaining_batches(e2e, mode):
    options = {mode: True}
    whole = list(D.iterate_batches(e2e, 8, seed=5, epoch=2, **options))
    assert len(whole) == D.num_batches(e2e, 8, packing=mode == "packing")
    for start in (0, 1, len(whole) // 2, len(whole) - 1, len(whole)):
        rest = list(D.iterate_batches(e2e, 8, seed=5, epoch=2, start=start, **options))
        assert len(rest) == len(whole) - start
        for a, b in zip(rest, whole[start:], strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if mode == "group_by_length":
        plain = list(D.iterate_batches(e2e, 8, seed=5, epoch=2))
        assert sum(b["attention_mask"].eq(0).sum() for b in whole) < sum(b["attention_mask"].eq(0).sum() for b in plain)


# ---------------------------------------------------------------------------------- settings
def test_settings_packing_and_grouping_change_the_run_and_reporting_does_not():
    with pytest.raises(ConfigError, match="packing and group_by_length do not combine"):
        TrainConfig(packing=True, group_by_length=True)
    with pytest.raises(ConfigError, match="report_to"):
        TrainConfig(report_to=["wandb"])
    with pytest.raises(ConfigError, match="twice"):
        TrainConfig(report_to=["mlflow", "mlflow"])
    assert "packing" not in RESUME_FREE_FIELDS and "group_by_length" not in RESUME_FREE_FIELDS
    saved = TrainConfig().to_dict()
    assert TrainConfig(packing=True).resume_differences(saved) == ["packing: checkpoint False, now True"]
    assert TrainConfig(report_to=["tensorboard"]).resume_differences(saved) == []


def test_classification_data_cannot_be_packed():
    tokenizer = load_tokenizer("minilm-l6")
    dataset = D.tokenize_classification(["a b", "c"], None, [0, 1], tokenizer, 16)
    with pytest.raises(ConfigError, match="cannot be packed"):
        D.num_batches(dataset, 2, packing=True)
    with pytest.raises(ConfigError, match="cannot be packed"):
        next(D.iterate_batches(dataset, 2, seed=0, epoch=0, packing=True))
