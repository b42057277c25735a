"""lorakit.data on real files: E2E (official CSV, LoRA txt, bundled sample), GLUE TSVs, real tokenizers.

The E2E text rendering itself (`lorakit.e2e.text`) is tested in test_e2e_text.py.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import lorakit.data as data
import lorakit.models as models
from lorakit.data import Example
from lorakit.data.formats import BUNDLE_DIR
from lorakit.e2e import e2e_mr_to_context
from lorakit.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
E2E = SHARED / "e2e"
GLUE = SHARED / "glue"


@pytest.fixture(scope="session")
def tokenizer():
    """The packaged SmolLM2 tokenizer (no BOS by default, EOS = <|im_end|>, has a chat template)."""
    return models.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def bert_tokenizer():
    return models.load_tokenizer("minilm-l6")


@pytest.fixture(scope="session")
def e2e_train():
    return data.load_examples("e2e")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, records: list[object]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in records))


# ----------------------------------------------------------------------------- E2E


def test_e2e_csv_and_lora_txt_load_the_same_examples():
    from_csv = data.load_examples(E2E / "devset.csv")
    from_txt = data.load_examples(E2E / "valid.txt")
    assert [(e.prompt, e.completion) for e in from_csv] == [(e.prompt, e.completion) for e in from_txt]
    first = from_csv[0]
    assert first.prompt.endswith(" ||") and not first.prompt.endswith("  ||")
    assert first.completion.startswith(" ") and not first.completion.startswith("  ")
    with (E2E / "devset.csv").open(encoding="utf-8", newline="") as handle:
        distinct_mrs = {row["mr"] for row in csv.DictReader(handle)}
    assert {e.group for e in from_csv} == distinct_mrs
    assert len({e.group for e in from_txt}) == len(distinct_mrs)


def test_bundled_e2e_samples(e2e_train):
    dev = data.load_examples("e2e-dev")
    for examples in (e2e_train, dev):
        assert examples
        for example in examples:
            assert example.group is not None
            assert example.prompt == e2e_mr_to_context(example.group) + " ||"
            assert example.completion.startswith(" ")
    # Every reference of a chosen MR is in the sample.
    train_mrs = {e.group for e in e2e_train}
    with (E2E / "trainset.csv").open(encoding="utf-8", newline="") as handle:
        refs_in_csv = sum(row["mr"] in train_mrs for row in csv.DictReader(handle))
    assert refs_in_csv == len(e2e_train)
    assert (BUNDLE_DIR / "E2E_LICENSE.md").read_text(encoding="utf-8").count("CC BY-SA 4.0") >= 1


def test_bundled_sample_regenerates_byte_for_byte(tmp_path):
    spec = importlib.util.spec_from_file_location("make_e2e_sample", REPO / "scripts" / "make_e2e_sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    source, target, count, seed = next(s for s in script.SAMPLES if s[0] == "devset.csv")
    mrs, _ = script.write_sample(E2E / source, tmp_path / target, count, seed)
    assert mrs == count
    assert (tmp_path / target).read_bytes() == (BUNDLE_DIR / target).read_bytes()


# ----------------------------------------------------------------------------- other formats


def test_jsonl_formats(tmp_path, tokenizer):
    path = _jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"text": "plain text"},
            {"prompt": "Q: 2+2?", "completion": " 4"},
            {"mr": "name[Aromi], eatType[pub]", "ref": "Aromi is a pub."},
        ],
    )
    examples = data.load_examples(path)
    assert examples[0] == Example("", "plain text")
    assert examples[1] == Example("Q: 2+2?", " 4")
    assert examples[2] == Example(
        "name : Aromi | Type : pub ||", " Aromi is a pub .", group="name[Aromi], eatType[pub]"
    )


def test_json_list_and_csv_formats(tmp_path):
    records = [{"prompt": "a", "completion": "b"}, {"prompt": "c,d", "completion": "e\nf"}]
    as_json = _write(tmp_path / "pairs.json", json.dumps(records))
    as_csv = tmp_path / "pairs.csv"
    with as_csv.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(records)
    expected = [Example(r["prompt"], r["completion"]) for r in records]
    assert data.load_examples(as_json) == expected
    assert data.load_examples(as_csv) == expected
    text_csv = _write(tmp_path / "text.csv", "text\nfirst line\nsecond line\n")
    assert data.load_examples(text_csv) == [Example("", "first line"), Example("", "second line")]


def test_chat_messages_keep_the_conversation_and_prompt_up_to_the_last_reply(tmp_path, tokenizer):
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Thanks"},
    ]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    (example,) = data.load_examples(path, tokenizer=tokenizer)
    assert example.messages == tuple(conversation)
    # What sample generations start from: the conversation up to its last reply, with the header.
    assert example.prompt == tokenizer.apply_chat_template(conversation[:3], tokenize=False, add_generation_prompt=True)
    assert example.prompt.endswith("Capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert example.completion == "Paris."
    assert example.origin == f"{path}, line 1"


# ----------------------------------------------------------------------------- tokenising


def test_completion_only_labels_decode_to_the_completion(tokenizer, e2e_train):
    examples = e2e_train[:40]
    dataset = data.tokenize_examples(examples, tokenizer, seq_len=512)
    assert dataset.truncated == 0
    assert len(dataset) == len(examples)
    for example, ids, labels in zip(examples, dataset.input_ids, dataset.labels, strict=True):
        prompt_ids = [t for t, label in zip(ids, labels, strict=True) if label == -100]
        completion_ids = [label for label in labels if label != -100]
        assert ids[len(prompt_ids) :] == completion_ids  # prompt first, then completion
        assert tokenizer.decode(prompt_ids) == example.prompt
        assert tokenizer.decode(completion_ids) == example.completion + tokenizer.eos_token
        assert ids[0] != tokenizer.bos_token_id  # SmolLM2 adds no BOS by default
    assert data.encode_prompt(tokenizer, examples[0].prompt) == [
        t for t, label in zip(dataset.input_ids[0], dataset.labels[0], strict=True) if label == -100
    ]


def test_bos_is_added_once_when_the_tokenizer_adds_it(tokenizer):
    from transformers import AutoTokenizer

    with_bos = AutoTokenizer.from_pretrained(tokenizer.name_or_path, add_bos_token=True, local_files_only=True)
    assert with_bos("x")["input_ids"][0] == with_bos.bos_token_id
    dataset = data.tokenize_examples([Example("Q:", " A")], with_bos, seq_len=32)
    ids = dataset.input_ids[0]
    assert ids[0] == with_bos.bos_token_id and ids[1] != with_bos.bos_token_id
    assert dataset.labels[0][0] == -100
    assert data.encode_prompt(with_bos, "Q:")[0] == with_bos.bos_token_id


def test_truncation_is_counted_and_warned_once(tokenizer, e2e_train):
    examples = e2e_train[:60]
    full = data.tokenize_examples(examples, tokenizer, seq_len=4096)
    lengths = sorted(len(ids) for ids in full.input_ids)
    seq_len = lengths[len(lengths) // 2]
    expected = sum(length > seq_len for length in lengths)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut = data.tokenize_examples(examples, tokenizer, seq_len=seq_len)
    assert cut.truncated == expected > 0
    assert cut.dropped == 0
    assert [str(w.message) for w in caught if "seq_len" in str(w.message)] == [
        f"{expected} of {len(examples)} examples are longer than seq_len={seq_len} tokens and "
        "were cut at the end; 0 kept no trained token and were dropped"
    ]
    assert max(len(ids) for ids in cut.input_ids) == seq_len


def test_rows_whose_completion_is_cut_away_are_dropped(tokenizer, e2e_train):
    examples = e2e_train[:30]
    prompt_lengths = [len(data.encode_prompt(tokenizer, e.prompt)) for e in examples]
    seq_len = min(prompt_lengths) + 1  # the shortest prompts keep one completion token
    with pytest.warns(UserWarning, match="were dropped"):
        dataset = data.tokenize_examples(examples, tokenizer, seq_len=seq_len)
    assert dataset.dropped == len(examples) - len(dataset)
    assert dataset.dropped == sum(length >= seq_len for length in prompt_lengths) > 0
    assert dataset.drops == {"truncated": dataset.dropped}
    assert all(any(label != -100 for label in labels) for labels in dataset.labels)
    # Nothing left at all is an error naming why, never an empty dataset.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error alone, no warning before it
        with pytest.raises(DataError) as info:
            data.tokenize_examples(examples, tokenizer, seq_len=seq_len - 1, source="e2e")
    assert str(info.value) == (
        f"e2e: no example is left to train on: all {len(examples)} examples lost every trained token to "
        f"truncation at seq_len={seq_len - 1}"
    )


# ----------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def small_dataset(tokenizer, e2e_train):
    return data.tokenize_examples(e2e_train[:23], tokenizer, seq_len=512)


def _rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    return [
        tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]


def test_batches_are_deterministic_and_cover_the_epoch(small_dataset):
    def epoch(seed: int, number: int) -> list[dict[str, torch.Tensor]]:
        return list(data.iterate_batches(small_dataset, 5, seed=seed, epoch=number))

    first, again = epoch(0, 0), epoch(0, 0)
    assert len(first) == data.num_batches(small_dataset, 5) == math.ceil(len(small_dataset) / 5)
    for a, b in zip(first, again, strict=True):
        assert a.keys() == b.keys() == {"input_ids", "attention_mask", "labels"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    order = [row for batch in first for row in _rows(batch)]
    assert sorted(order) == sorted(tuple(ids) for ids in small_dataset.input_ids)
    assert order != [row for batch in epoch(0, 1) for row in _rows(batch)]
    assert order != [row for batch in epoch(1, 0) for row in _rows(batch)]
    unshuffled = data.iterate_batches(small_dataset, 5, seed=0, epoch=0, shuffle=False)
    assert [row for batch in unshuffled for row in _rows(batch)] == [tuple(ids) for ids in small_dataset.input_ids]


def test_padding_is_masked_and_ignored(small_dataset, tokenizer):
    for batch in data.iterate_batches(small_dataset, 8, seed=3, epoch=0):
        padding = batch["attention_mask"] == 0
        assert padding.any()  # rows differ in length, so some are padded
        assert (batch["labels"][padding] == -100).all()
        assert (batch["input_ids"][padding] == small_dataset.pad_id).all()
        assert small_dataset.pad_id == tokenizer.pad_token_id
        # Right padding: once a row is padded it stays padded.
        assert (batch["attention_mask"][:, 1:] <= batch["attention_mask"][:, :-1]).all()


def test_start_skips_exactly_the_first_batches(small_dataset):
    full = list(data.iterate_batches(small_dataset, 4, seed=7, epoch=2))
    resumed = list(data.iterate_batches(small_dataset, 4, seed=7, epoch=2, start=3))
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert list(data.iterate_batches(small_dataset, 4, seed=7, epoch=2, start=len(full))) == []
    with pytest.raises(ConfigError, match="start must be between 0 and"):
        data.iterate_batches(small_dataset, 4, seed=7, epoch=2, start=len(full) + 1)
    with pytest.raises(ConfigError, match="batch_size"):
        data.num_batches(small_dataset, 0)


# ----------------------------------------------------------------------------- holdout


def test_holdout_keeps_e2e_references_together(e2e_train):
    train, holdout = data.split_holdout(e2e_train, 0.1, seed=0)
    assert len(train) + len(holdout) == len(e2e_train)
    assert {e.group for e in train}.isdisjoint({e.group for e in holdout})
    groups = {e.group for e in e2e_train}
    assert len({e.group for e in holdout}) == round(0.1 * len(groups))
    again = data.split_holdout(e2e_train, 0.1, seed=0)
    assert again == (train, holdout)
    assert data.split_holdout(e2e_train, 0.1, seed=1)[1] != holdout
    # Input order is kept on both sides.
    position = {id(e): i for i, e in enumerate(e2e_train)}
    assert [position[id(e)] for e in holdout] == sorted(position[id(e)] for e in holdout)


def test_holdout_without_groups_and_bad_fraction():
    examples = [Example("", f"row {i}") for i in range(10)]
    train, holdout = data.split_holdout(examples, 0.3, seed=0)
    assert len(holdout) == 3 and len(train) == 7
    assert data.split_holdout(examples, 0.0, seed=0) == (examples, [])
    assert len(data.split_holdout(examples[:2], 0.01, seed=0)[1]) == 1  # at least one group when asked
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        data.split_holdout(examples, 1.0, seed=0)


# ----------------------------------------------------------------------------- GLUE


def _data_rows(path: Path) -> int:
    with path.open(encoding="utf-8", newline="") as handle:
        return sum(1 for _ in csv.reader(handle, delimiter="\t")) - 1


@pytest.mark.parametrize("task", ["sst2", "mrpc", "rte"])
def test_glue_with_header(task):
    path = GLUE / task / "train.tsv"
    texts_a, texts_b, labels = data.load_classification(path)
    assert len(texts_a) == len(labels) == _data_rows(path)
    assert set(labels) == {0, 1}
    if task == "sst2":
        assert texts_b is None
    else:
        assert texts_b is not None and len(texts_b) == len(texts_a)
        # MRPC/RTE use CSV-style quoting ("" for a quote inside a quoted field); it must be undone.
        assert not any('""' in t for t in texts_a + texts_b)
        assert any('"' in t for t in texts_a + texts_b)


def test_glue_cola_headerless():
    path = GLUE / "cola" / "val.tsv"
    texts_a, texts_b, labels = data.load_classification(path)
    raw = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert texts_b is None
    assert labels == [int(fields[1]) for fields in raw]
    assert texts_a == [fields[3] for fields in raw]


def test_tokenize_classification_pairs(bert_tokenizer):
    texts_a, texts_b, labels = data.load_classification(GLUE / "mrpc" / "train.tsv")
    with pytest.warns(UserWarning, match="truncated"):
        dataset = data.tokenize_classification(texts_a[:16], texts_b[:16], labels[:16], bert_tokenizer, seq_len=24)
    assert dataset.truncated > 0
    assert max(len(ids) for ids in dataset.input_ids) <= 24
    batch = next(data.iterate_batches(dataset, 4, seed=0, epoch=0, shuffle=False))
    assert batch["labels"].tolist() == labels[:4]
    assert batch["token_type_ids"].max().item() == 1  # the second sentence is segment 1
    full = data.tokenize_classification(texts_a[:2], texts_b[:2], labels[:2], bert_tokenizer, seq_len=512)
    assert full.truncated == 0
    assert bert_tokenizer.decode(full.input_ids[0], skip_special_tokens=True).split()[:3] == [
        w.lower() for w in texts_a[0].split()[:3]
    ]


# ----------------------------------------------------------------------------- errors


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="not found") as info:
        data.load_examples(missing)
    assert str(missing) in str(info.value)
    assert ".jsonl" in str(info.value) and "e2e" in str(info.value)  # says what is accepted
    with pytest.raises(DataError, match="not found"):
        data.load_classification(tmp_path / "nope.tsv")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv", "empty.txt", "blank.jsonl"])
def test_empty_file(tmp_path, name):
    path = _write(tmp_path / name, "\n\n" if name.startswith("blank") else "")
    with pytest.raises(DataError, match="is empty") as info:
        data.load_examples(path)
    assert str(path) in str(info.value)


def test_wrong_fields_say_what_was_found_and_accepted(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"question": "Say hi", "answer": "hi"}])
    with pytest.raises(DataError) as info:
        data.load_examples(path)
    message = str(info.value)
    assert "['answer', 'question']" in message and "line 1" in message
    assert "'prompt' and 'completion'" in message and "'text'" in message and "'messages'" in message
    csv_path = _write(tmp_path / "cols.csv", "question,answer\nq,a\n")
    with pytest.raises(DataError, match=r"found columns \['question', 'answer'\]; accepted: 'text'") as info:
        data.load_examples(csv_path)
    assert "messages" not in str(info.value)  # chat records cannot come from a CSV
    tsv = _write(tmp_path / "cls.tsv", "id\ttext\tgold\n1\thello\t0\n")
    with pytest.raises(DataError, match=r"found columns \['id', 'text', 'gold'\]; accepted"):
        data.load_classification(tsv)


def test_invalid_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError) as info:
        data.load_examples(path)
    assert f"{path}, line 2: invalid JSON" in str(info.value)


def test_unknown_format(tmp_path):
    path = _write(tmp_path / "data.xml", "<a/>")
    with pytest.raises(DataError, match=r"unknown data format '\.xml'"):
        data.load_examples(path)


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        (
            "chat.jsonl",
            json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n",
            "need a tokenizer",
        ),
        (
            "types.jsonl",
            json.dumps({"prompt": 1, "completion": "x"}) + "\n",
            "line 1: field 'prompt' must be a string",
        ),
        ("lines.txt", "name : A||ok \nno separator here\n", "line 2: .* no '\\|\\|'"),
        ("short.csv", "prompt,completion\nonly one field\n", "line 2: the row has fewer fields"),
    ],
    ids=["chat-without-tokenizer", "non-string-field", "txt-without-separator", "short-csv-row"],
)
def test_malformed_records(tmp_path, name, content, pattern):
    with pytest.raises(DataError, match=pattern):
        data.load_examples(_write(tmp_path / name, content))


def test_chat_without_assistant_reply(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="no assistant message"):
        data.load_examples(path, tokenizer=tokenizer)


def test_non_integer_glue_label(tmp_path):
    tsv = _write(tmp_path / "labels.tsv", "label\tsentence\n1\tgood\npositive\tfine\n")
    with pytest.raises(DataError, match=r"line 3: label 'positive' is not an integer"):
        data.load_classification(tsv)


def test_bad_seq_len(tokenizer):
    with pytest.raises(ConfigError, match="seq_len"):
        data.tokenize_examples([Example("", "x")], tokenizer, seq_len=1)


def test_plain_text_needs_no_chat_template(tokenizer) -> None:
    """A tokenizer without a chat template (a base model's) tokenises plain records; only conversations need one."""
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    ds = data.tokenize_examples(
        [Example(prompt="", completion="hello world"), Example(prompt="a ", completion="b")], plain, 32
    )
    assert len(ds) == 2 and any(label != -100 for label in ds.labels[0])
    chat = Example(
        prompt="", completion="", messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})
    )
    with pytest.raises(DataError, match="chat template"):
        data.tokenize_examples([chat], plain, 32)
