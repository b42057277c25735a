"""Preference pairs (`lorakit.data.preference`) read from real files and tokenised with SmolLM2's own
tokenizer and chat template: which tokens are scored, truncation and drops, identical pairs, the
concatenated batch, packing, and each bad record named."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lorakit.data import IGNORE_INDEX
from lorakit.data.preference import (
    iterate_pair_batches,
    load_pairs,
    pack_sequences,
    preference_lines,
    split_pairs,
    tokenize_pairs,
)
from lorakit.errors import ConfigError, DataError
from lorakit.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def chat(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def scored(ids: list[int], labels: list[int]) -> list[int]:
    return [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]


def test_conversational_pairs_score_only_the_answer_through_its_end_of_turn_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [chat("Name a colour.", "Blue.", "I refuse to answer that.")])
    (pair,) = load_pairs(path, tokenizer=tok)
    ds = tokenize_pairs([pair], tok, 512)
    for ids, labels, answer in (
        (ds.chosen_ids[0], ds.chosen_labels[0], "Blue."),
        (ds.rejected_ids[0], ds.rejected_labels[0], "I refuse to answer that."),
    ):
        # The whole sequence is the template's rendering of prompt + answer, tokenised once.
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": answer}], tokenize=False
        )
        assert tok.decode(ids) == rendered
        # Scored: the answer's tokens and <|im_end|>, nothing of the prompt, not the newline after it.
        assert tok.decode(scored(ids, labels)) == answer + "<|im_end|>"
    # The prompt shown for samples ends with the assistant header.
    assert pair.prompt.endswith("<|im_start|>assistant\n") and "Name a colour." in pair.prompt


def test_string_pairs_are_plain_prompt_and_completion_with_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}])
    ds = tokenize_pairs(load_pairs(path, tokenizer=tok), tok, 64)
    assert tok.decode(ds.chosen_ids[0]) == "2 + 2 = 4" + tok.eos_token
    assert scored(ds.chosen_ids[0], ds.chosen_labels[0]) == tok(" 4")["input_ids"] + [tok.eos_token_id]
    assert scored(ds.rejected_ids[0], ds.rejected_labels[0]) == tok(" 5")["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_tables_hold_pairs_too(tmp_path, tok, suffix):
    rows = [{"prompt": f"Say {w}.", "chosen": w, "rejected": "no"} for w in ("red", "green", "blue")]
    path = tmp_path / f"p.{suffix}"
    if suffix == "csv":
        path.write_text(
            "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)
        )
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    pairs = load_pairs(path, tokenizer=tok)
    assert [(p.chosen.completion, p.rejected.completion) for p in pairs] == [(r["chosen"], "no") for r in rows]
    assert "record 2" in pairs[1].origin or "line 3" in pairs[1].origin


def test_truncation_drops_pairs_that_lose_an_answer_and_counts_identical_pairs(tmp_path, tok):
    long_prompt = "word " * 200
    records = [
        chat("Hi.", "Hello there.", "Go away."),
        chat(long_prompt, "Fine.", "Bad."),  # the prompt alone fills seq_len: both answers cut away
        chat("Short?", "Yes. " * 40, "No."),  # only the chosen sequence is cut, the pair keeps both answers
        chat("Same?", "Same.", "Same."),
    ]
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", records), tokenizer=tok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = tokenize_pairs(pairs, tok, 64)
    assert len(ds) == 3 and ds.pairs_read == 4
    assert ds.truncated == 2 and ds.drops == {"truncated": 1} and ds.identical == 1
    assert ds.origins == [pairs[0].origin, pairs[2].origin, pairs[3].origin]
    assert max(len(r) for r in ds.chosen_ids + ds.rejected_ids) <= 64
    messages = " ".join(str(w.message) for w in caught)
    assert "2 of 4 preference pairs" in messages and "1 lost an answer" in messages
    assert "1 of 4 preference pairs have the same chosen and rejected answer" in messages
    lines = "\n".join(preference_lines(ds, name="training data"))
    assert "4 preference pairs -> 3 kept" in lines and "dropped: 1 pair lost every token of an answer" in lines
    assert "identical: 1 pair" in lines
    # Cut from the left instead, every answer survives.
    kept = tokenize_pairs(pairs, tok, 64, truncate="left", warn=False)
    assert len(kept) == 4 and kept.drops == {}
    with pytest.raises(DataError, match=r"no preference pair is left.*truncation at seq_len=8"):
        tokenize_pairs(pairs[1:2], tok, 8, warn=False)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "q", "chosen": "a"}, r"line 1: no field 'rejected'; a preference record needs 'prompt', 'chosen'"),
        ({"prompt": "q", "rejected": "b"}, r"line 1: no field 'chosen'"),
        ({"chosen": "a", "rejected": "b"}, r"no field 'prompt'"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
            "must all be strings or all message lists",
        ),
        (
            chat("q", "a", "b") | {"rejected": [{"role": "user", "content": "b"}]},
            "the 'rejected' messages hold no assistant message",
        ),
        (chat("q", "a", "b") | {"chosen": [{"role": "bot", "content": "a"}]}, "message 2 has an unknown role 'bot'"),
    ],
    ids=["no-rejected", "no-chosen", "no-prompt", "mixed", "no-assistant", "bad-role"],
)
def test_a_bad_record_is_a_data_error_naming_the_record_and_field(tmp_path, tok, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(DataError, match=message) as err:
        load_pairs(path, tokenizer=tok)
    assert "p.jsonl, line 1" in str(err.value)


def test_fields_rename_the_prompt_only(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}])
    (pair,) = load_pairs(path, tokenizer=tok, fields={"prompt": "question"})
    assert pair.prompt == "q"
    with pytest.raises(ConfigError, match="rename only 'prompt'"):
        load_pairs(path, tokenizer=tok, fields={"chosen": "better"})


def test_a_batch_is_chosen_rows_then_rejected_rows_in_a_fixed_order(tmp_path, tok):
    records = [chat(f"Q{i}?", "yes " * (i + 1), "no") for i in range(5)]
    ds = tokenize_pairs(load_pairs(write_jsonl(tmp_path / "p.jsonl", records), tokenizer=tok), tok, 128)
    ds.reference = torch.arange(10, dtype=torch.float64).reshape(5, 2)
    batch = ds.collate([3, 1])
    assert batch["input_ids"].shape[0] == 4 and batch["pack_to"] == 0
    for row, (ids, labels) in enumerate(
        [(ds.chosen_ids[3], ds.chosen_labels[3]), (ds.chosen_ids[1], ds.chosen_labels[1]),
         (ds.rejected_ids[3], ds.rejected_labels[3]), (ds.rejected_ids[1], ds.rejected_labels[1])]
    ):  # fmt: skip
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids and batch["labels"][row, :n].tolist() == labels
        assert batch["attention_mask"][row].sum() == n and (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert batch["ref_logps"].tolist() == [6.0, 2.0, 7.0, 3.0]
    # The epoch's order depends on (seed, epoch) only; a resumed epoch reads the same batches.
    epoch = list(iterate_pair_batches(ds, 2, seed=1, epoch=0))
    again = list(iterate_pair_batches(ds, 2, seed=1, epoch=0, start=1))
    assert len(epoch) == 3 and torch.equal(epoch[1]["input_ids"], again[0]["input_ids"])
    assert not torch.equal(epoch[0]["input_ids"], next(iterate_pair_batches(ds, 2, seed=1, epoch=1))["input_ids"])


def test_packing_lays_whole_sequences_end_to_end_tagged_by_row(tmp_path, tok):
    records = [chat(f"Q{i}?", "yes " * (3 * i + 1), "no") for i in range(4)]
    ds = tokenize_pairs(load_pairs(write_jsonl(tmp_path / "p.jsonl", records), tokenizer=tok), tok, 128)
    batch = ds.collate(range(4), pack_to=128)
    packed = pack_sequences(batch, 128)
    rows = packed["input_ids"].shape[0]
    assert rows < 8 and packed["input_ids"].shape[1] <= 128
    for s in range(8):
        at = packed["sequence_index"] == s
        n = int(batch["attention_mask"][s].sum())
        assert int(at.sum()) == n
        assert packed["input_ids"][at].tolist() == batch["input_ids"][s, :n].tolist()
        assert packed["position_ids"][at].tolist() == list(range(n))
        # The same scored tokens (the first token of a sequence never is one).
        assert packed["labels"][at].tolist()[1:] == batch["labels"][s, 1:n].tolist()
        assert packed["labels"][at].tolist()[0] == IGNORE_INDEX
    assert (packed["labels"][packed["sequence_index"] == -1] == IGNORE_INDEX).all()


def test_packed_batches_ask_for_rows_no_longer_than_their_longest_sequence(tmp_path, tok):
    records = [chat(f"Q{i}?", "yes " * (20 * i + 1), "no") for i in range(6)]
    ds = tokenize_pairs(load_pairs(write_jsonl(tmp_path / "p.jsonl", records), tokenizer=tok), tok, 256)
    padded = list(iterate_pair_batches(ds, 3, seed=0, epoch=0, shuffle=False))
    packed = list(iterate_pair_batches(ds, 3, seed=0, epoch=0, shuffle=False, packing=True))
    saved = 0
    for plain, batch in zip(padded, packed, strict=True):
        width = plain["input_ids"].shape[1]  # the batch's longest sequence, < seq_len here
        assert width < ds.seq_len and batch["pack_to"] == width and plain["pack_to"] == 0
        rows = pack_sequences({k: v for k, v in batch.items() if k != "pack_to"}, batch["pack_to"])
        # Every token kept, no row longer than the padded batch, never more tokens than padded.
        assert rows["input_ids"].shape[1] == width
        assert int(rows["attention_mask"].sum()) == int(plain["attention_mask"].sum())
        assert rows["input_ids"].numel() <= plain["input_ids"].numel()
        saved += plain["input_ids"].numel() - rows["input_ids"].numel()
    assert saved > 0


def test_held_out_pairs_keep_prompts_apart(tmp_path, tok):
    records = [chat(f"Q{i // 2}?", f"yes {i}", "no") for i in range(20)]  # two pairs per prompt
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", records), tokenizer=tok)
    train, held = split_pairs(pairs, 0.2, seed=3)
    assert len(held) == 4 and len(train) == 16
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert split_pairs(pairs, 0.2, seed=3) == (train, held)
