"""Record shapes: which format a record is, told from its fields, and the `Example` it becomes.

Files are read into records by `lorakit.data.readers`; here each record's fields say what it is
(the first that fits, in this order; `fields` renames them, see `FIELDS`):

- OpenAI / TRL chat: `messages`, a list of `{"role", "content"}` (roles system, user, assistant,
  tool; an assistant message may carry `tool_calls` instead of content): a conversation.
- ShareGPT: `conversations`, a list of `{"from", "value"}` (`from` system, human, gpt; also user,
  assistant, tool): a conversation.
- TRL conversational prompt/completion: `prompt` and `completion`, both message lists: one
  conversation whose prompt messages are context and never train.
- Plain prompt/completion: `prompt` and `completion`, both strings: `Example(prompt, completion)`.
- Alpaca: `instruction`, `output`, optional `input` and `system`: a conversation, user =
  instruction (+ "\\n\\n" + input when the input is not empty), assistant = output.
- E2E: `mr` and `ref`: the LoRA paper's rendering (`e2e_example`).
- Text: `text`: `Example("", text)`, every token trains.

A conversation keeps its messages (`Example.messages`) and is tokenised with the tokenizer's chat
template (`lorakit.data.chat`), so reading one needs that tokenizer. Every record that cannot be
read is a `DataError` naming the file and the record (line or 1-based position) and what is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from lorakit.data.chat import ROLES, generation_prompt
from lorakit.data.examples import Example
from lorakit.data.readers import BUNDLE_DIR, BUNDLED_DATASETS, read_records, resolve_source
from lorakit.e2e.text import E2E_SEPARATOR, e2e_mr_to_context, e2e_tokenize
from lorakit.errors import ConfigError, DataError

__all__ = [
    "BUNDLED_DATASETS",
    "BUNDLE_DIR",
    "FIELDS",
    "check_fields",
    "e2e_example",
    "load_examples",
    "resolve_source",
]

FIELDS: tuple[str, ...] = (
    "messages",
    "conversations",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "system",
    "text",
)
"""The record fields `fields=` may rename (`{"messages": "dialog"}`: the chat is in `dialog`)."""
_OPTIONAL = frozenset({"input", "system"})
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "gpt": "assistant",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}

_ACCEPTED_FIELDS = (
    "'messages' (chat); 'conversations' (ShareGPT); 'prompt' and 'completion' (strings, or message lists); "
    "'instruction' and 'output', optional 'input' and 'system' (Alpaca); 'mr' and 'ref' (E2E); 'text'"
)
_ACCEPTED_COLUMNS = (
    "'text'; 'prompt' and 'completion'; 'instruction' and 'output', optional 'input' and 'system' (Alpaca); "
    "'mr' and 'ref' (E2E)"
)


def check_fields(fields: Mapping[str, str] | None) -> dict[str, str]:
    """`fields` as a dict, checked: every key one of `FIELDS`, every value a non-empty string.

    Raises:
        ConfigError: an unknown key (the known ones are listed) or a value that is not a name.
    """
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ConfigError(f"fields: unknown key(s) {unknown}; known: {', '.join(FIELDS)}")
    bad = sorted(k for k, v in fields.items() if not isinstance(v, str) or not v)
    if bad:
        raise ConfigError(f"fields: the value of {bad} must be a field name")
    return fields


def load_examples(
    source: str | os.PathLike[str], *, tokenizer: Any = None, fields: Mapping[str, str] | None = None
) -> list[Example]:
    """Read a dataset into examples (format detected from each record's fields, see `lorakit.data`).

    Args:
        source: A file (`.jsonl`, `.json`, `.csv`, `.parquet`, E2E `.txt`), a Hugging Face
            `datasets` folder, or a bundled dataset name (`"e2e"`: ~300 training MRs with all their
            references; `"e2e-dev"`: ~50 development MRs).
        tokenizer: Needed for conversations (chat `messages`, ShareGPT, Alpaca, conversational
            prompt/completion): `Example.prompt` is the conversation up to its last assistant
            message rendered with the tokenizer's chat template and its generation prompt.
        fields: The record's names for the standard fields, when they differ (`{"messages":
            "dialog"}`, `{"instruction": "question", "output": "answer"}`); keys from `FIELDS`.

    Returns:
        The examples in file order. Plain `text` records have `prompt=""`. E2E records have the
        MR as `group`. Conversations keep their `messages`.

    Raises:
        ConfigError: an unknown key in `fields`.
        DataError: The file is missing or empty, has an unknown suffix, a line is not valid JSON
            (file and line are named), a table lacks a named column, the fields are not an
            accepted set (the message lists the fields found and those accepted), a message has an
            unknown role or no content, a conversation has no assistant message, the template
            cannot render it, or conversations come without a chat tokenizer.
    """
    names = check_fields(fields)
    records = read_records(source)
    path = records.path
    if records.columns is not None and records.columns:
        _check_columns(records.columns, names, str(path))
    examples = [_record_example(record, f"{path}, {where}", tokenizer, names) for where, record in records.rows]
    if not examples:
        raise DataError(f"{path} is empty: it holds no records")
    return examples


def _name(names: Mapping[str, str], field: str) -> str:
    return names.get(field, field)


def _kind(keys: set[str] | list[str], names: Mapping[str, str]) -> str | None:
    """The format of a record with these fields (see the module table), or None."""
    keys = set(keys)

    def has(*fields: str) -> bool:
        return all(_name(names, f) in keys for f in fields)

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("prompt", "completion"):
        return "prompt"
    if has("instruction", "output"):
        return "alpaca"
    if "mr" in keys and "ref" in keys:
        return "e2e"
    if has("text"):
        return "text"
    return None


def _renamed(names: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in names.items())


def _check_columns(columns: list[str], names: Mapping[str, str], path: str) -> None:
    """A table's columns, once for every record: each named column present, a known format."""
    for field, column in names.items():
        if column not in columns and field not in _OPTIONAL:
            raise DataError(f"{path}: no column {column!r} (named by fields {field}={column}); columns: {columns}")
    if _kind(columns, names) is None:
        renamed = f" (fields {_renamed(names)})" if names else ""
        raise DataError(f"{path}: found columns {columns}{renamed}; accepted: {_ACCEPTED_COLUMNS}")


def _record_example(record: Any, where: str, tokenizer: Any, names: Mapping[str, str]) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    for field, key in names.items():
        if key not in record and field not in _OPTIONAL:
            raise DataError(f"{where}: no field {key!r} (named by fields {field}={key}); found fields {sorted(record)}")
    kind = _kind(list(record), names)
    group = record.get("group", record.get("mr")) or None
    if group is not None and not isinstance(group, str):
        group = json.dumps(group, sort_keys=True)
    if kind == "messages":
        return _conversation(_messages(record[_name(names, "messages")], where, "messages"), 0, tokenizer, where)
    if kind == "sharegpt":
        return _conversation(_sharegpt(record[_name(names, "conversations")], where), 0, tokenizer, where)
    if kind == "prompt":
        prompt, completion = record[_name(names, "prompt")], record[_name(names, "completion")]
        if isinstance(prompt, list) and isinstance(completion, list):
            before = _messages(prompt, where, "prompt")
            after = _messages(completion, where, "completion", first=len(before) + 1)
            if not any(m["role"] == "assistant" for m in after):
                raise DataError(f"{where}: the 'completion' messages hold no assistant message to learn")
            return _conversation(before + after, len(before), tokenizer, where)
        if isinstance(prompt, list) or isinstance(completion, list):
            raise DataError(
                f"{where}: 'prompt' and 'completion' must both be strings or both be message lists, found "
                f"{type(prompt).__name__} and {type(completion).__name__}"
            )
        return Example(
            _field(record, _name(names, "prompt"), where),
            _field(record, _name(names, "completion"), where),
            group,
            origin=where,
        )
    if kind == "alpaca":
        return _conversation(_alpaca(record, names, where), 0, tokenizer, where)
    if kind == "e2e":
        return e2e_example(_field(record, "mr", where), _field(record, "ref", where))
    if kind == "text":
        return Example("", _field(record, _name(names, "text"), where), group, origin=where)
    renamed = f" (fields {_renamed(names)})" if names else ""
    raise DataError(f"{where}: found fields {sorted(record)}{renamed}; accepted: {_ACCEPTED_FIELDS}")


def _field(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, found {type(value).__name__}")
    return value


def _messages(value: Any, where: str, field: str, first: int = 1) -> list[dict[str, Any]]:
    """OpenAI-style messages, checked: a list of objects with a known role and string content."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field!r} must be a non-empty list of messages, found {_shown(value)}")
    out = []
    for number, message in enumerate(value, start=first):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {number} must be an object, found {type(message).__name__}")
        # Columnar files (parquet, datasets) give every message every key, None where it had none.
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if role not in ROLES:
            raise DataError(
                f"{where}: message {number} has {'an unknown role ' + repr(role) if role is not None else 'no role'}; "
                f"accepted: {', '.join(ROLES)}"
            )
        _check_content(message, number, where)
        out.append(message)
    return out


def _check_content(message: dict[str, Any], number: int, where: str) -> None:
    role, content = message["role"], message.get("content")
    if content is None:
        if role == "assistant" and message.get("tool_calls"):
            return  # a reply that only calls tools
        raise DataError(f"{where}: message {number} ({role}) has no content")
    if not isinstance(content, str):
        raise DataError(f"{where}: message {number} ({role}): content must be a string, found {_shown(content)}")


def _sharegpt(value: Any, where: str) -> list[dict[str, Any]]:
    """ShareGPT turns (`from`/`value`) as OpenAI messages; turns already in `role`/`content` are kept."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns, found {_shown(value)}")
    out = []
    for number, turn in enumerate(value, start=1):
        if isinstance(turn, dict) and "from" in turn:
            speaker = turn["from"]
            if speaker not in _SHAREGPT_ROLES:
                raise DataError(
                    f"{where}: message {number} has an unknown role (from) {speaker!r}; accepted: "
                    "system, human, gpt (also user, assistant, tool)"
                )
            turn = {"role": _SHAREGPT_ROLES[speaker], "content": turn.get("value")}
        out.extend(_messages([turn], where, "conversations", first=number))
    return out


def _alpaca(record: Mapping[str, Any], names: Mapping[str, str], where: str) -> list[dict[str, Any]]:
    """An Alpaca record as a conversation: [system], user = instruction (+ blank line + input), assistant."""
    instruction = _field(record, _name(names, "instruction"), where)
    output = _field(record, _name(names, "output"), where)
    extra = {}
    for field in ("input", "system"):
        value = record.get(_name(names, field))
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: field {_name(names, field)!r} must be a string, found {type(value).__name__}")
        extra[field] = value or ""
    user = instruction + ("\n\n" + extra["input"] if extra["input"] else "")
    messages = [{"role": "system", "content": extra["system"]}] if extra["system"] else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _conversation(messages: list[dict[str, Any]], prompt_messages: int, tokenizer: Any, where: str) -> Example:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: conversation records (chat, ShareGPT, Alpaca) are rendered with a chat template and need "
            "a tokenizer with one (pass tokenizer=)"
        )
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        raise DataError(f"{where}: the conversation has no assistant message to learn")
    prompt = generation_prompt(messages, tokenizer, where=where)
    return Example(
        prompt,
        replies[-1].get("content") or "",
        messages=tuple(messages),
        prompt_messages=prompt_messages,
        origin=where,
    )


def _shown(value: Any) -> str:
    return "an empty list" if value == [] else type(value).__name__


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
