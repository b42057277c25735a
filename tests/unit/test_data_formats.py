"""Record formats and file sources (`lorakit.data.readers`, `lorakit.data.formats`) on real files.

Each format is written to a real file (JSON lines, JSON, CSV, parquet through pyarrow, a
`datasets` folder through `save_to_disk`) and read back into the messages or prompt/completion the
test spells out; each bad record is a `DataError` naming the file, the record and what is wrong.
"""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lorakit.data as data
import lorakit.models as models
from lorakit.data import Example
from lorakit.errors import ConfigError, DataError
from tests.conftest import REPO, SHARED_DATA

ALPACA = SHARED_DATA / "alpaca" / "alpaca_5000.json"
HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


@pytest.fixture(scope="module")
def smol():
    return models.load_tokenizer("smollm2-135m")


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


# ----------------------------------------------------------------------------- formats


def test_sharegpt_conversations_become_messages(tmp_path, smol):
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
        ]
    }
    (example,) = data.load_examples(_jsonl(tmp_path / "sharegpt.jsonl", [record]), tokenizer=smol)
    assert example.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    )
    assert (
        example.prompt
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert example.completion == "Hello!"


def test_alpaca_records_are_a_user_and_an_assistant_turn(tmp_path, smol):
    records = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say hi.", "output": "Hi!", "system": "You are terse."},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    first, second, third = data.load_examples(path, tokenizer=smol)
    assert first.messages == (
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    )
    assert second.messages == ({"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"})
    assert third.messages[0] == {"role": "system", "content": "You are terse."}
    assert first.origin == f"{path}, record 1" and third.origin == f"{path}, record 3"


def test_the_alpaca_5000_file_loads_whole(smol):
    examples = data.load_examples(ALPACA, tokenizer=smol)
    records = json.loads(ALPACA.read_text(encoding="utf-8"))
    assert len(examples) == len(records) == 5000
    with_input = [ex for ex, r in zip(examples, records, strict=True) if r["input"]]
    assert len(with_input) == 1943  # the file's README
    assert all("\n\n" in ex.messages[0]["content"] for ex in with_input)
    assert [ex.completion for ex in examples] == [r["output"] for r in records]


def test_trl_conversational_and_plain_prompt_completion(tmp_path, smol):
    path = _jsonl(
        tmp_path / "pc.jsonl",
        [
            {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]},
            {"prompt": "Q: 2+2?", "completion": " 4"},
        ],
    )
    chat, plain = data.load_examples(path, tokenizer=smol)
    assert chat.messages == ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"})
    assert chat.prompt_messages == 1
    assert plain == Example("Q: 2+2?", " 4") and plain.messages is None


def test_fields_rename_the_standard_fields(tmp_path, smol):
    path = _jsonl(tmp_path / "renamed.jsonl", [{"dialog": HI}])
    (example,) = data.load_examples(path, tokenizer=smol, fields={"messages": "dialog"})
    assert example.messages == tuple(HI)
    qa = _jsonl(tmp_path / "qa.jsonl", [{"question": "Say hi.", "answer": "Hi!"}])
    (example,) = data.load_examples(qa, tokenizer=smol, fields={"instruction": "question", "output": "answer"})
    assert example.messages[-1] == {"role": "assistant", "content": "Hi!"}
    with pytest.raises(DataError, match=r"line 1: no field 'dialogue' \(named by fields messages=dialogue\)"):
        data.load_examples(path, tokenizer=smol, fields={"messages": "dialogue"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['chat'\]; known: messages, conversations"):
        data.load_examples(path, tokenizer=smol, fields={"chat": "dialog"})


def test_csv_with_alpaca_columns(tmp_path, smol):
    path = tmp_path / "alpaca.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerow({"instruction": "Add.", "input": "1, 2", "output": "3"})
    (example,) = data.load_examples(path, tokenizer=smol)
    assert example.messages[0] == {"role": "user", "content": "Add.\n\n1, 2"}
    assert example.origin == f"{path}, line 2"


def test_parquet_chat_with_tool_calls_and_plain_columns(tmp_path, smol):
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Call f.", "tool_calls": None},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "done", "tool_calls": None},
        {"role": "assistant", "content": "f is done.", "tool_calls": None},
    ]
    path = _parquet(tmp_path / "chat.parquet", {"messages": [messages]})
    # A table gives every message every key, None where a message had none ...
    ((_, record),) = list(data.readers.read_records(path).rows)
    assert record["messages"][0] == {"role": "user", "content": "Call f.", "tool_calls": None}
    # ... and the Nones are dropped before the template sees them (an assistant turn may only call tools).
    tools = copy.deepcopy(smol)
    tools.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.tool_calls %}"
        "{{ 'call ' + m.tool_calls[0].function.name }}{% else %}{{ m.content }}{% endif %}{{ '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    (example,) = data.load_examples(path, tokenizer=tools)
    assert example.messages == (
        {"role": "user", "content": "Call f."},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": "done"},
        {"role": "assistant", "content": "f is done."},
    )
    dataset = data.tokenize_examples([example], tools, 128)
    trained = [t for t, label in zip(dataset.input_ids[0], dataset.labels[0], strict=True) if label != -100]
    assert tools.decode(trained) == "call f<|im_end|>f is done.<|im_end|>"
    plain = _parquet(tmp_path / "plain.parquet", {"prompt": ["a", "c"], "completion": ["b", "d"]})
    examples = data.load_examples(plain)
    assert examples == [Example("a", "b"), Example("c", "d")]
    assert examples[1].origin == f"{plain}, record 2"


def test_a_datasets_folder_and_a_dataset_dict(tmp_path, smol):
    import datasets  # the datasets extra (scripts/install.sh installs it)

    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"messages": HI}, {"messages": HI}]).save_to_disk(str(folder))
    examples = data.load_examples(folder, tokenizer=smol)
    assert [ex.messages for ex in examples] == [tuple(HI)] * 2
    assert examples[1].origin == f"{folder}, record 2"
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"text": "train row"}]),
            "test": datasets.Dataset.from_list([{"text": "test row"}]),
        }
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert data.load_examples(tmp_path / "dd") == [Example("", "train row")]
    with pytest.raises(DataError, match="not a Hugging Face datasets folder"):
        data.load_examples(tmp_path)


def test_a_datasets_folder_without_the_extra_names_it(tmp_path):
    import datasets  # the datasets extra (scripts/install.sh installs it)

    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(str(folder))
    code = f"import sys\nsys.modules['datasets'] = None\nimport lorakit.data as d\nd.load_examples({str(folder)!r})\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lorakit.errors.MissingExtraError: reading the Hugging Face datasets folder")
    assert "pip install 'lorakit[datasets]'" in last


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},
            "line 2: message 2 has an unknown role 'bot'; accepted: system, user, assistant, tool",
        ),
        (
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Hello"}]},
            "line 2: message 2 has an unknown role (from) 'robot'; accepted: system, human, gpt",
        ),
        ({"messages": [{"role": "user"}, HI[1]]}, "line 2: message 1 (user) has no content"),
        (
            {"messages": [{"role": "user", "content": ["Hi"]}, HI[1]]},
            "line 2: message 1 (user): content must be a string, found list",
        ),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "line 2: the conversation has no assistant message"),
        (
            {"prompt": [HI[0]], "completion": [{"role": "user", "content": "?"}]},
            "line 2: the 'completion' messages hold no assistant message",
        ),
        ({"prompt": [HI[0]], "completion": "Hello"}, "line 2: 'prompt' and 'completion' must both be strings or"),
        ({"messages": []}, "line 2: 'messages' must be a non-empty list of messages, found an empty list"),
        ({"instruction": "Hi", "output": 5}, "line 2: field 'output' must be a string, found int"),
    ],
    ids=[
        "unknown-role",
        "unknown-sharegpt-role",
        "no-content",
        "list-content",
        "no-assistant",
        "completion-without-assistant",
        "mixed-prompt-completion",
        "empty-messages",
        "alpaca-output-not-text",
    ],
)
def test_a_bad_record_names_the_file_the_record_and_the_problem(tmp_path, smol, record, message):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": HI}, record])
    with pytest.raises(DataError) as info:
        data.load_examples(path, tokenizer=smol)
    assert str(info.value).startswith(f"{path}, {message}")


def test_a_template_that_cannot_render_is_quoted(tmp_path, smol):
    strict = copy.deepcopy(smol)
    strict.chat_template = (
        "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    )
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"messages": HI}, {"messages": [HI[1], HI[0], HI[1]]}]), encoding="utf-8")
    with pytest.raises(DataError) as info:
        data.load_examples(path, tokenizer=strict)
    assert str(info.value) == (
        f"{path}, record 2: the chat template cannot render this conversation: TemplateError: "
        "'Conversation roles must alternate user/assistant/user/assistant/...'"
    )


def test_a_parquet_file_without_the_named_column(tmp_path, smol):
    path = _parquet(tmp_path / "qa.parquet", {"question": ["Say hi."], "answer": ["Hi!"]})
    with pytest.raises(DataError) as info:
        data.load_examples(path, tokenizer=smol, fields={"instruction": "question", "output": "reply"})
    assert str(info.value) == (
        f"{path}: no column 'reply' (named by fields output=reply); columns: ['question', 'answer']"
    )
    with pytest.raises(DataError, match=r"qa.parquet: found columns \['question', 'answer'\]; accepted: 'text'"):
        data.load_examples(path, tokenizer=smol)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable parquet file"):
        data.load_examples(broken)


def test_conversations_need_a_chat_template(tmp_path, smol):
    plain = copy.deepcopy(smol)
    plain.chat_template = None
    path = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    with pytest.raises(DataError, match=r"alpaca.jsonl, line 1: conversation records .* need a tokenizer"):
        data.load_examples(path, tokenizer=plain)
