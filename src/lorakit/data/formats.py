"""Reading records from files into `Example`s: JSON lines, JSON, CSV, LoRA E2E `.txt`, chat messages.

The accepted formats are listed in `lorakit.data`'s docstring; `load_examples` detects the format from
the file suffix and the field names. E2E rows (`mr` + `ref`) are rendered by `lorakit.e2e.text`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.data.examples import Example
from lorakit.e2e.text import E2E_SEPARATOR, e2e_mr_to_context, e2e_tokenize
from lorakit.errors import DataError

__all__ = ["BUNDLED_DATASETS", "BUNDLE_DIR", "e2e_example", "load_examples", "resolve_source"]

BUNDLE_DIR = Path(__file__).resolve().parent / "bundled"
"""The folder of the data files shipped with lorakit (the E2E samples and their license)."""
BUNDLED_DATASETS: dict[str, str] = {
    "e2e": "e2e_train_sample.jsonl",
    "e2e-dev": "e2e_dev_sample.jsonl",
}
"""Bundled dataset name -> its file in `BUNDLE_DIR`; `load_examples` accepts the names as sources."""

_ACCEPTED_FIELDS = "'text'; 'prompt' and 'completion'; 'messages' (chat); 'mr' and 'ref' (E2E)"
_ACCEPTED_COLUMNS = "'text'; 'prompt' and 'completion'; 'mr' and 'ref' (E2E)"
_ACCEPTED_SOURCES = (
    ".jsonl, .json, .csv, .txt (E2E LoRA lines '<context>||<completion>') or a bundled name ("
    + ", ".join(BUNDLED_DATASETS)
    + ")"
)


def load_examples(source: str | os.PathLike[str], *, tokenizer: Any = None) -> list[Example]:
    """Read a dataset into prompt/completion examples (format detected, see `lorakit.data`).

    Args:
        source: A file path or a bundled dataset name (`"e2e"`: ~300 training MRs with all their
            references; `"e2e-dev"`: ~50 development MRs).
        tokenizer: Needed only for chat `messages` records, which are rendered with
            `tokenizer.apply_chat_template`: the prompt is the conversation up to the last assistant
            message (with the generation prompt), the completion is that message as the template
            renders it; messages after it are ignored.

    Returns:
        The examples in file order. Plain `text` records have `prompt=""`. E2E records have the
        MR as `group`.

    Raises:
        DataError: The file is missing or empty, has an unknown suffix, a line is not valid JSON
            (file and line are named), the fields are not an accepted set (the message lists the
            fields found and those accepted), or chat records come without a chat tokenizer.
    """
    path = resolve_source(source)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        examples = [_record_example(record, path, line, tokenizer) for line, record in _read_jsonl(path)]
    elif suffix == ".json":
        examples = [_record_example(record, path, line, tokenizer) for line, record in _read_json(path)]
    elif suffix == ".csv":
        examples = _read_csv_examples(path)
    elif suffix == ".txt":
        examples = _read_lora_e2e(path)
    else:
        raise DataError(f"{path}: unknown data format {suffix or '(no suffix)'!r}. Accepted: {_ACCEPTED_SOURCES}.")
    if not examples:
        raise DataError(f"{path} is empty: it holds no records")
    return examples


def resolve_source(source: str | os.PathLike) -> Path:
    """The file a data source names (a path or a bundled dataset's name), checked to exist.

    Args:
        source: A file path (`~` is expanded) or a name of `BUNDLED_DATASETS`.

    Returns:
        The path of the file.

    Raises:
        DataError: no such file, a directory, or a bundled file missing from the installation.
    """
    text = os.fspath(source)
    if text in BUNDLED_DATASETS:
        path = BUNDLE_DIR / BUNDLED_DATASETS[text]
        if not path.is_file():
            raise DataError(f"bundled dataset {text!r} is missing from the installation ({path}); reinstall lorakit")
        return path
    path = Path(text).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise DataError(f"data file {what}: {path}. Accepted: {_ACCEPTED_SOURCES}.")
    return path


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from exc


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    raw = path.read_text(encoding="utf-8")
    if not raw.strip():
        return
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(records, list):
        raise DataError(f"{path}: a .json data file must hold a list of records, found {type(records).__name__}")
    # A JSON list has no line per record; report the record's 1-based position instead.
    yield from enumerate(records, start=1)


def _record_example(record: Any, path: Path, line: int, tokenizer: Any) -> Example:
    where = f"{path}, line {line}" if path.suffix.lower() == ".jsonl" else f"{path}, record {line}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    group = record.get("group", record.get("mr"))
    if group is not None and not isinstance(group, str):
        group = json.dumps(group, sort_keys=True)
    if "messages" in record:
        return _chat_example(record["messages"], tokenizer, where)
    if "prompt" in record and "completion" in record:
        return Example(_field(record, "prompt", where), _field(record, "completion", where), group)
    if "mr" in record and "ref" in record:
        return e2e_example(_field(record, "mr", where), _field(record, "ref", where))
    if "text" in record:
        return Example("", _field(record, "text", where), group)
    raise DataError(f"{where}: found fields {sorted(record)}; accepted: {_ACCEPTED_FIELDS}")


def _field(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, found {type(value).__name__}")
    return value


def _chat_example(messages: Any, tokenizer: Any, where: str) -> Example:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat 'messages' records need a tokenizer with a chat template (pass tokenizer=)")
    valid = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not valid:
        raise DataError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}} objects")
    replies = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if not replies:
        raise DataError(f"{where}: 'messages' has no assistant message to learn")
    last = replies[-1]
    prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages[: last + 1], tokenize=False)
    if not full.startswith(prompt):
        raise DataError(
            f"{where}: the chat template does not render the conversation as prompt + reply, so the reply "
            "cannot be separated for completion-only loss"
        )
    return Example(prompt, full[len(prompt) :])


def _read_csv_examples(path: Path) -> list[Example]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        fields = [name.strip() for name in reader.fieldnames or []]
        if not fields:
            return []
        reader.fieldnames = fields
        if {"prompt", "completion"} <= set(fields):
            kind = "prompt"
        elif {"mr", "ref"} <= set(fields):
            kind = "e2e"
        elif "text" in fields:
            kind = "text"
        else:
            raise DataError(f"{path}: found columns {fields}; accepted: {_ACCEPTED_COLUMNS}")
        examples = []
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if any(value is None for value in row.values()):
                raise DataError(f"{where}: the row has fewer fields than the header {fields}")
            if kind == "prompt":
                examples.append(Example(row["prompt"], row["completion"], row.get("group") or None))
            elif kind == "e2e":
                examples.append(e2e_example(row["mr"], row["ref"]))
            else:
                examples.append(Example("", row["text"], row.get("group") or None))
        return examples


def _read_lora_e2e(path: Path) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if "||" not in line:
                raise DataError(
                    f"{path}, line {number}: a .txt data file must use the LoRA E2E format "
                    "'<context>||<completion>' and this line has no '||'"
                )
            context, completion = line.split("||", 1)
            context = context.strip()
            examples.append(Example(context + E2E_SEPARATOR, " " + completion.strip(), group=context))
    return examples


def e2e_example(mr: str, ref: str) -> Example:
    """One training example from an official E2E row, rendered as the LoRA paper's files are.

    Args:
        mr: The row's meaning representation (`mr` column).
        ref: The row's human reference (`ref` column), raw.

    Returns:
        `Example(context + " ||", " " + tokenised reference, group=mr)`: the MR groups all of its
        references together (see `lorakit.data.split_holdout`).

    Raises:
        DataError: The MR contains no `key[value]` slot.
    """
    return Example(e2e_mr_to_context(mr) + E2E_SEPARATOR, " " + e2e_tokenize(ref), group=mr)
