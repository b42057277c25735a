"""`lorakit data preview` and the data side of `lorakit train`, run as real processes.

The preview of a small JSONL written here is compared with the text and numbers worked out from
the tokenizer alone (its chat template, tokenised without lorakit.data); the preview of 300 Alpaca
records with the counts of truncated and dropped examples; `lorakit train` on Alpaca with no
format flag trains and prints the numbers the preview prints. Every bad input ends with exit code
2, one line on stderr naming the file, the record and the problem, before the model loads, with
nothing written to --out.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorakit.models import ensure_cached, load_tokenizer
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.integration  # the real `lorakit` command

LORAKIT = Path(sys.executable).with_name("lorakit")  # the console script, as a user runs it
ENV = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
ALPACA = {"instruction": "Add.", "input": "2 and 2", "output": "4"}
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
# What `data preview` shows of those two records: trained tokens between [[ and ]].
SHOWN = f"""--- example 1: {{0}} tokens, {{1}} trained ---
{SMOL_SYSTEM}<|im_start|>user
Hi<|im_end|>
<|im_start|>assistant
[[Hello!<|im_end|>]]
<|im_start|>user
Capital of France?<|im_end|>
<|im_start|>assistant
[[Paris.<|im_end|>]]

--- example 2: {{2}} tokens, {{3}} trained ---
{SMOL_SYSTEM}<|im_start|>user
Add.

2 and 2<|im_end|>
<|im_start|>assistant
[[4<|im_end|>]]

---
"""
ALTERNATING = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cli(*args: object) -> list[str]:
    return [str(LORAKIT), *map(str, args)]


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=500, check=False)


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The inputs: a small JSONL, 300 + 8 Alpaca records, bad files, weightless models."""
    work = tmp_path_factory.mktemp("data-cli")
    _jsonl(work / "small.jsonl", [{"messages": CHAT}, ALPACA])
    records = json.loads((SHARED_DATA / "alpaca" / "alpaca_5000.json").read_text(encoding="utf-8"))
    (work / "alpaca300.json").write_text(json.dumps(records[:300]), encoding="utf-8")
    (work / "alpaca8.json").write_text(json.dumps(records[300:308]), encoding="utf-8")
    _jsonl(work / "role.jsonl", [{"messages": CHAT}, {"messages": [CHAT[0], {"role": "bot", "content": "Hello"}]}])
    _jsonl(work / "content.jsonl", [{"messages": CHAT}, {"messages": [{"role": "user"}, CHAT[1]]}])
    _jsonl(work / "no-reply.jsonl", [{"messages": CHAT}, {"messages": CHAT[:1]}])
    _jsonl(work / "not-alternating.jsonl", [{"messages": CHAT}, {"messages": [CHAT[1], CHAT[0], CHAT[1]]}])
    pq.write_table(pa.table({"question": ["Say hi."], "answer": ["Hi!"]}), work / "qa.parquet")
    # The packaged model without its weights: loading it fails, so a refusal that names the data
    # shows the data was checked before the model loaded. A copy has a template that refuses
    # conversations whose roles do not alternate.
    for name in ("weightless", "alternating"):
        (work / name).mkdir()
        for path in ensure_cached("smollm2-135m").iterdir():
            if path.suffix in (".json", ".jinja"):
                shutil.copy(path, work / name / path.name)
    config = json.loads((work / "alternating" / "tokenizer_config.json").read_text())
    config["chat_template"] = ALTERNATING
    (work / "alternating" / "tokenizer_config.json").write_text(json.dumps(config))
    for jinja in (work / "alternating").glob("*.jinja"):
        jinja.write_text(ALTERNATING)
    return work


# id -> (argv, the words the one error line must hold). {work} and {out} are filled in; {out}
# does not exist, and must not exist afterwards.
TRAIN = ("train", "--model", "{work}/weightless", "--max-steps", "1", "--no-progress", "--out", "{out}")
BAD = {
    "unknown-role": (
        (*TRAIN, "--data", "{work}/role.jsonl"),
        ("{work}/role.jsonl, line 2", "message 2 has an unknown role 'bot'", "system, user, assistant, tool"),
    ),
    "no-content": (
        (*TRAIN, "--data", "{work}/content.jsonl"),
        ("{work}/content.jsonl, line 2", "message 1 (user) has no content"),
    ),
    "no-assistant-turn": (
        (*TRAIN, "--data", "{work}/no-reply.jsonl"),
        ("{work}/no-reply.jsonl, line 2", "no assistant message"),
    ),
    "template-cannot-render": (
        (*TRAIN[:2], "{work}/alternating", *TRAIN[3:], "--data", "{work}/not-alternating.jsonl"),
        (
            "{work}/not-alternating.jsonl, line 2",
            "the chat template cannot render this conversation",
            "'Conversation roles must alternate user/assistant/user/assistant/...'",
        ),
    ),
    "parquet-without-the-column": (
        (*TRAIN, "--data", "{work}/qa.parquet", "--fields", "instruction=question,output=reply"),
        ("{work}/qa.parquet", "no column 'reply'", "output=reply", "['question', 'answer']"),
    ),
    "unknown-train-on": (
        (*TRAIN, "--data", "{work}/small.jsonl", "--train-on", "everything"),
        ("--train-on", "choose from assistant, last, all", "'everything'"),
    ),
    "nothing-left-to-train": (
        (*TRAIN, "--data", "{work}/small.jsonl", "--eval-data", "{work}/small.jsonl", "--seq-len", "8"),
        ("{work}/small.jsonl", "no example is left to train on", "all 2 examples lost every trained token", "=8"),
    ),
    "preview-unknown-role": (
        ("data", "preview", "--model", "{work}/weightless", "--data", "{work}/role.jsonl"),
        ("{work}/role.jsonl, line 2", "unknown role 'bot'"),
    ),
}


@pytest.fixture(scope="module")
def results(work) -> dict[str, subprocess.CompletedProcess]:
    """Every process of this file, two at a time."""
    small, alpaca, alpaca8 = work / "small.jsonl", work / "alpaca300.json", work / "alpaca8.json"
    calls = {
        "train-alpaca": cli(
            "train",
            "--data",
            alpaca,
            "--eval-data",
            alpaca8,
            "--seq-len",
            64,
            "--max-steps",
            2,
            "--batch-size",
            2,
            "--samples",
            1,
            "--lora-dropout",
            0.05,
            "--threads",
            1,
            "--no-progress",
            "--out",
            work / "run",
        ),
        "preview-small": cli("data", "preview", "--data", small, "-n", 2),
        "preview-color": cli("data", "preview", "--data", small, "-n", 1, "--color", "always", "--train-on", "last"),
        "preview-alpaca": cli("data", "preview", "--data", alpaca, "-n", 1, "--seq-len", 64),
    }
    for case, (argv, _) in BAD.items():
        calls[case] = cli(*(arg.format(work=work, out=work / "bad" / case) for arg in argv))
    with ThreadPoolExecutor(2) as pool:
        futures = {key: pool.submit(run, argv) for key, argv in calls.items()}
    return {key: future.result() for key, future in futures.items()}


def _ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


def _alpaca_counts(tok, path: Path, seq_len: int) -> tuple[int, int, int]:
    """(truncated, dropped, tokens kept) of an Alpaca file at `seq_len`, from the tokenizer alone."""
    full, prompts = [], []
    for r in json.loads(path.read_text(encoding="utf-8")):
        user = {"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")}
        full.append(len(_ids(tok, [user, {"role": "assistant", "content": r["output"]}])))
        prompts.append(len(_ids(tok, [user], add_generation_prompt=True)))
    truncated = sum(n > seq_len for n in full)
    dropped = sum(p >= seq_len for p in prompts)  # the first seq_len tokens hold no reply token
    tokens = sum(min(n, seq_len) for n, p in zip(full, prompts, strict=True) if p < seq_len)
    return truncated, dropped, tokens


def test_preview_shows_the_examples_as_the_model_sees_them(results, tok):
    proc = results["preview-small"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    alpaca_chat = [{"role": "user", "content": "Add.\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    lengths = [len(_ids(tok, CHAT)), len(_ids(tok, alpaca_chat))]
    replies = [["Hello!<|im_end|>", "Paris.<|im_end|>"], ["4<|im_end|>"]]
    trained = [sum(len(tok.encode(r, add_special_tokens=False)) for r in rs) for rs in replies]
    assert proc.stdout.startswith(SHOWN.format(lengths[0], trained[0], lengths[1], trained[1]))
    total, kept = sum(lengths), sum(trained)
    assert (
        f"\ndata: 2 examples -> 2 rows; {total} tokens, {kept} trained ({100 * kept / total:.1f}%)\n"
        "  row lengths (tokens):\n"
    ) in proc.stdout
    assert "truncated" not in proc.stdout and "dropped" not in proc.stdout


def test_preview_in_colour_and_the_last_turn_only(results):
    proc = results["preview-color"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Hi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n" in proc.stdout  # not trained: --train-on last
    assert "\x1b[1;32mParis.<|im_end|>\x1b[0m" in proc.stdout
    assert "[[" not in proc.stdout


def test_preview_of_alpaca_counts_truncated_and_dropped_examples(results, tok, work):
    proc = results["preview-alpaca"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    truncated, dropped, tokens = _alpaca_counts(tok, work / "alpaca300.json", 64)
    assert 0 < dropped < truncated < 300
    assert f"\ndata: 300 examples -> {300 - dropped} rows; {tokens:,} tokens, " in proc.stdout
    assert f"\n  truncated: {truncated} examples longer than seq_len=64 (each keeps its start; --truncate)\n" in (
        proc.stdout
    )
    assert f"\n  dropped: {dropped} example{'s' * (dropped > 1)} lost every trained token to truncation at " in (
        proc.stdout
    )
    histogram = proc.stdout.split("  row lengths (tokens):\n")[1].splitlines()
    assert sum(int(line.split()[-2].replace(",", "")) for line in histogram) == 300 - dropped


def test_train_on_alpaca_with_no_format_flag(results, work, tok):
    proc = results["train-alpaca"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    # The same numbers `data preview` prints for the file, before the model loads.
    preview = results["preview-alpaca"].stdout
    numbers = preview[preview.index("\ndata: ") + 1 :].splitlines()
    printed = proc.stdout[proc.stdout.index("training data: ") :].splitlines()
    assert printed[0] == "training " + numbers[0]
    assert printed[1 : len(numbers)] == numbers[1:]
    assert proc.stdout.index("training data: ") < proc.stdout.index("model: ")
    _, dropped, _ = _alpaca_counts(tok, work / "alpaca8.json", 64)
    assert f"\neval data: {8 - dropped} rows, {dropped} dropped with nothing to train\n" in proc.stdout
    # A sample is shown by its last user message, not the whole rendered conversation.
    first = json.loads((work / "alpaca8.json").read_text(encoding="utf-8"))[0]
    user = " ".join((first["instruction"] + ("\n\n" + first["input"] if first["input"] else "")).split())
    assert f"\n  before | {user}\n" in proc.stdout


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_before_the_model_loads_and_nothing_is_written(results, work, case):
    proc = results[case]
    argv, words = BAD[case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    command = "data" if argv[0] == "data" else "train"
    if case == "unknown-train-on":
        assert lines[0].startswith("lorakit train: error: argument --train-on")
    else:
        assert lines[0].startswith(f"lorakit {command}: error: "), lines[0]
    for word in words:
        assert word.format(work=work) in lines[0], (word, lines[0])
    assert "model:" not in proc.stdout and "cannot load" not in proc.stderr
    assert not (work / "bad" / case).exists()
