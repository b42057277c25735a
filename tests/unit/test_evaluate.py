"""`lorakit.evaluate`: the loss batched by length equals the per-row hand sum, `max_mrs`/`max_rows`
limit what is scored (the loss included), and a bad file is reported by `prepare`, before a model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lorakit import data as D
from lorakit.errors import ConfigError, DataError
from lorakit.evaluate import Evaluation, evaluate, loss_on, prepare
from lorakit.models import load_tokenizer
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _tiny_dataset(rows: int = 7) -> D.TokenizedDataset:
    gen = torch.Generator().manual_seed(0)
    ds = D.TokenizedDataset([], [], pad_id=0, seq_len=32)
    for i in range(rows):
        n = 4 + (5 * i) % 11  # lengths 4..14, out of order
        ids = torch.randint(1, 64, (n,), generator=gen).tolist()
        ds.input_ids.append(ids)
        ds.labels.append([-100] * (n // 2) + ids[n // 2 :])
    return ds


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loss_batched_by_length_equals_the_per_row_hand_sum(batch_size):
    model, ds = tiny_llama(), _tiny_dataset()
    total = count = 0.0
    with torch.no_grad():
        for ids, labels in zip(ds.input_ids, ds.labels, strict=True):
            logits = model(torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    assert loss_on(model, ds, batch_size) == pytest.approx(total / count, rel=1e-5)


def test_max_mrs_limits_the_loss_rows_and_max_rows_caps_them(tokenizer):
    examples = D.load_examples("e2e-dev", tokenizer=tokenizer)
    first_two = list(dict.fromkeys(ex.group for ex in examples))[:2]
    refs = sum(ex.group in first_two for ex in examples)
    data = prepare(Evaluation(max_mrs=2, seq_len=64), tokenizer)
    assert data.mrs == 2 and len(data.dataset) == refs and data.items == []
    assert len(prepare(Evaluation(max_mrs=2, max_rows=1, seq_len=64), tokenizer).dataset) == 1
    model = tiny_llama()
    model.resize_token_embeddings(len(tokenizer))
    result = evaluate(model, tokenizer, Evaluation(max_mrs=2, seq_len=64, progress=False))
    assert (result["rows"], result["mrs"]) == (refs, 2)


def test_prepare_reports_a_bad_file_and_bad_sizes(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 2"):
        prepare(Evaluation(data=str(bad)), tokenizer)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(DataError, match="max_mrs"):
        prepare(Evaluation(data=str(plain), max_mrs=3), tokenizer)
    with pytest.raises(ConfigError, match=r"max_rows must be an integer >= 1.*got 0"):
        Evaluation(max_rows=0)
