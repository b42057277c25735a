"""Datasets: read records, render prompt/completion pairs, tokenise with completion-only labels, batch.

Record formats, detected from the file suffix and the field names:

| source | records |
|---|---|
| `.jsonl` (object a line), `.json` (a list) | `text`; `prompt`+`completion`; chat `messages`; `mr`+`ref` |
| `.csv` with a header | `text`; or `prompt` + `completion`; or E2E official `mr,ref` |
| `.txt` | the LoRA repo's E2E lines `<context>||<completion> ` |
| `"e2e"`, `"e2e-dev"` | the bundled E2E samples (see `BUNDLED_DATASETS`) |

E2E follows the LoRA paper's pipeline (microsoft/LoRA `format_converting_e2e.py`): the context is
`name : The Vaults | Type : pub | price : more than £ 30 | ...` (slots in MR order, eatType→Type,
priceRange→price, familyFriendly→family friendly), values and references are tokenised Moses-style
(`e2e_tokenize`). For a non-GPT-2 tokenizer the separator and EOS are text: prompt = context + " ||",
completion = " " + reference, and `tokenize_examples` appends EOS.

Classification data (GLUE TSVs) has its own loader, `load_classification`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError, DataError

__all__ = [
    "BUNDLED_DATASETS",
    "IGNORE_INDEX",
    "ClassificationDataset",
    "Example",
    "TokenizedDataset",
    "e2e_mr_to_context",
    "e2e_tokenize",
    "encode_prompt",
    "iterate_batches",
    "load_classification",
    "load_examples",
    "num_batches",
    "split_holdout",
    "tokenize_classification",
    "tokenize_examples",
]

IGNORE_INDEX = -100  # label value torch's cross_entropy skips

_BUNDLE_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_DATASETS: dict[str, str] = {
    "e2e": "e2e_train_sample.jsonl",
    "e2e-dev": "e2e_dev_sample.jsonl",
}

_E2E_KEYS = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}
_E2E_SEPARATOR = " ||"
_ACCEPTED_FIELDS = "'text'; 'prompt' and 'completion'; 'messages' (chat); 'mr' and 'ref' (E2E)"
_ACCEPTED_COLUMNS = "'text'; 'prompt' and 'completion'; 'mr' and 'ref' (E2E)"
_ACCEPTED_SOURCES = (
    ".jsonl, .json, .csv, .txt (E2E LoRA lines '<context>||<completion>') or a bundled name ("
    + ", ".join(BUNDLED_DATASETS)
    + ")"
)


@dataclass(frozen=True)
class Example:
    """One training example: the model reads `prompt` and learns to write `completion`.

    Attributes:
        prompt: Text the loss ignores ("" for plain-text records).
        completion: Text the loss is computed on; `tokenize_examples` appends EOS.
        group: Examples with the same group share one input (E2E: the MR, so all references of
            one MR stay together in `split_holdout` and can be scored together); None otherwise.
    """

    prompt: str
    completion: str
    group: str | None = None


# ----------------------------------------------------------------------------- E2E text


_NONBREAKING = frozenset(
    [
        *"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        *("Adj", "Adm", "Adv", "Asst", "Bart", "Bldg", "Brig", "Bros", "Capt", "Cmdr", "Col", "Comdr"),
        *("Con", "Corp", "Cpl", "DR", "Dr", "Drs", "Ens", "Gen", "Gov", "Hon", "Hr", "Hosp", "Insp"),
        *("Lt", "MM", "MR", "MRS", "MS", "Maj", "Messrs", "Mlle", "Mme", "Mr", "Mrs", "Ms", "Msgr"),
        *("Op", "Ord", "Pfc", "Ph", "Prof", "Pvt", "Rep", "Reps", "Res", "Rev", "Rt", "Sen", "Sens"),
        *("Sfc", "Sgt", "Sr", "St", "Supt", "Surg", "v", "vs", "i.e", "rev", "e.g", "Nos", "Nr"),
        *("Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Sept", "Oct", "Nov", "Dec"),
    ]
)  # Moses' English non-breaking prefixes: "Dr." or "St." keep their period
_NUMERIC_ONLY = frozenset({"No", "Art", "pp"})  # non-breaking only before a number


def e2e_tokenize(text: str) -> str:
    """Tokenise text as the LoRA repo's E2E files are (a light Moses-style English tokenizer).

    Splits off punctuation (`£20` → `£ 20`, `food.` → `food .`, `a, b` → `a , b`), spaces hyphens
    between letters/digits (`family-friendly` → `family - friendly`), splits English contractions
    (`there's` → `there 's`) and keeps `..`/`...` whole. A final period after a bare number stays
    when a lowercase word follows (`5. in`). This reproduces LoRA's `valid.txt` from the official
    `devset.csv` for every one of its 4,672 references; on the training set a handful of lines with
    odd quote/apostrophe use differ from LoRA's files.

    Args:
        text: Raw text (an MR value or a reference sentence).

    Returns:
        The tokens joined by single spaces.
    """
    spaced = " " + " ".join(text.split()) + " "
    spaced = re.sub(r"(\D),", r"\1 , ", spaced)
    spaced = re.sub(r",(\D)", r" , \1", spaced)
    spaced = re.sub(r"(\d),$", r"\1 ,", spaced)
    words = spaced.split()
    kept = []
    for index, word in enumerate(words):
        if word.endswith(".") and not word.endswith("..") and len(word) > 1:
            stem = word[:-1]
            following = words[index + 1] if index + 1 < len(words) else ""
            is_acronym = "." in stem and re.search(r"[^\W\d_]", stem) is not None  # "e.g."
            keeps_period = (
                is_acronym
                or stem in _NONBREAKING
                or (stem.isdigit() and following[:1].islower())
                or (stem in _NUMERIC_ONLY and following[:1].isdigit())
            )
            if not keeps_period:
                word = stem + " ."
        kept.append(word)
    spaced = " ".join(kept)
    spaced = re.sub(r"([^\w\s.'`,\-])", r" \1 ", spaced)  # every other symbol: £ ! ? : ( ) " ...
    spaced = re.sub(r"(?<=[^\W_])-(?=[^\W_])", " - ", spaced)
    spaced = re.sub(r"\.\.+", lambda match: f" {match.group(0)} ", spaced)
    # Moses' English apostrophe rules: "isn't" -> "isn 't", "it's" -> "it 's", quotes split off.
    spaced = re.sub(r"([^a-zA-Z])'([^a-zA-Z])", r"\1 ' \2", spaced)
    spaced = re.sub(r"([^a-zA-Z\d])'([a-zA-Z])", r"\1 ' \2", spaced)
    spaced = re.sub(r"([a-zA-Z])'([^a-zA-Z])", r"\1 ' \2", spaced)
    spaced = re.sub(r"([a-zA-Z])'([a-zA-Z])", r"\1 '\2", spaced)
    spaced = re.sub(r"(\d)'(s)", r"\1 '\2", spaced)
    return " ".join(spaced.split())


def e2e_mr_to_context(mr: str) -> str:
    """Turn an official E2E meaning representation into the LoRA pipeline's context string.

    `name[The Vaults], eatType[pub], priceRange[more than £30]` becomes
    `name : The Vaults | Type : pub | price : more than £ 30`: slots keep the MR's order, keys are
    renamed (eatType→Type, priceRange→price, familyFriendly→family friendly) and values are
    tokenised with `e2e_tokenize`.

    Args:
        mr: The `mr` field of `trainset.csv` / `devset.csv`.

    Returns:
        The context, without the separator.

    Raises:
        DataError: The MR contains no `key[value]` slot.
    """
    slots = re.findall(r"([^,\[\]]+)\[([^\]]*)\]", mr)
    if not slots:
        raise DataError(f"not an E2E meaning representation (no 'key[value]' slot): {mr!r}")
    return " | ".join(f"{_E2E_KEYS.get(key.strip(), key.strip())} : {e2e_tokenize(value)}" for key, value in slots)


def _e2e_example(mr: str, ref: str) -> Example:
    return Example(e2e_mr_to_context(mr) + _E2E_SEPARATOR, " " + e2e_tokenize(ref), group=mr)


# ----------------------------------------------------------------------------- loading


def load_examples(source: str | os.PathLike[str], *, tokenizer: Any = None) -> list[Example]:
    """Read a dataset into prompt/completion examples (format detected, see the module docstring).

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

    Raises:
        DataError: no such file, a directory, or a bundled file missing from the installation.
    """
    text = os.fspath(source)
    if text in BUNDLED_DATASETS:
        path = _BUNDLE_DIR / BUNDLED_DATASETS[text]
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
        return _e2e_example(_field(record, "mr", where), _field(record, "ref", where))
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
                examples.append(_e2e_example(row["mr"], row["ref"]))
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
            examples.append(Example(context + _E2E_SEPARATOR, " " + completion.strip(), group=context))
    return examples


# ----------------------------------------------------------------------------- tokenising


@dataclass
class TokenizedDataset:
    """Token ids and completion-only labels for a causal LM, one row per example.

    Attributes:
        input_ids: Token ids per row, at most `seq_len` long.
        labels: Same lengths; `-100` on prompt tokens, the token id on completion tokens (+ EOS).
        pad_id: Id used to right-pad batches.
        seq_len: Maximum row length.
        truncated: Rows that were longer than `seq_len` and cut at the end (including dropped ones).
        dropped: Truncated rows left with no completion token, which were left out.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    pad_id: int
    seq_len: int
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-pad the given rows into a batch.

        Args:
            indices: Row indices, in batch order.

        Returns:
            `input_ids`, `attention_mask` and `labels`, each a `(len(indices), longest row)` long
            tensor; padding has `pad_id`, attention 0 and label -100.
        """
        rows = [self.input_ids[i] for i in indices]
        return {
            "input_ids": _right_pad(rows, self.pad_id),
            "attention_mask": _right_pad([[1] * len(r) for r in rows], 0),
            "labels": _right_pad([self.labels[i] for i in indices], IGNORE_INDEX),
        }


def _right_pad(rows: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
    """Rows of token ids as one (len(rows), longest row) long tensor, right-padded with `fill`."""
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first")
    return int(pad)


def _adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer puts BOS in front of text by default (Llama-2 does, SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    normal = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return normal[:1] == [bos] and plain[:1] != [bos]


def _prompt_prefix(tokenizer: Any, prompt: str, adds_bos: bool) -> list[int]:
    # A chat template may already write the BOS text itself; never put two BOS tokens in front.
    if adds_bos and not (tokenizer.bos_token and prompt.startswith(tokenizer.bos_token)):
        return [int(tokenizer.bos_token_id)]
    return []


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt exactly as `tokenize_examples` encodes it (for generation after training).

    Args:
        tokenizer: A transformers tokenizer.
        prompt: The prompt text (e.g. an E2E context followed by " ||").

    Returns:
        BOS (only if the tokenizer adds one by default) followed by the prompt's tokens.
    """
    adds_bos = _adds_bos(tokenizer)
    return _prompt_prefix(tokenizer, prompt, adds_bos) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def tokenize_examples(examples: Sequence[Example], tokenizer: Any, seq_len: int) -> TokenizedDataset:
    """Tokenise prompt and completion separately and label only the completion.

    Each row is `[BOS] + prompt tokens + completion tokens + [EOS]`. BOS is added only if the
    tokenizer adds it by default; EOS is appended unless the completion text already ends with the
    EOS token (as chat-template replies do). Prompt and completion are encoded separately so the
    boundary is exact: the labelled tokens decode to the completion (+ EOS). Rows longer than
    `seq_len` are cut at the end, counted in `truncated`, and reported with one `warnings.warn`;
    rows that keep no completion token are dropped and counted in `dropped`.

    Args:
        examples: Examples from `load_examples`.
        tokenizer: A transformers tokenizer with a pad or EOS token.
        seq_len: Maximum tokens per row.

    Returns:
        The tokenised dataset.

    Raises:
        ConfigError: `seq_len < 2`.
        DataError: `examples` is empty, or the tokenizer has neither a pad nor an EOS token.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if not examples:
        raise DataError("no examples to tokenise")
    pad_id = _pad_id(tokenizer)
    adds_bos = _adds_bos(tokenizer)
    eos_id, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    prompts = tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([ex.completion for ex in examples], add_special_tokens=False)["input_ids"]
    dataset = TokenizedDataset([], [], pad_id=pad_id, seq_len=seq_len)
    for example, prompt_ids, completion_ids in zip(examples, prompts, completions, strict=True):
        prompt_ids = _prompt_prefix(tokenizer, example.prompt, adds_bos) + list(prompt_ids)
        completion_ids = list(completion_ids)
        if eos_id is not None and not (eos_text and example.completion.rstrip().endswith(eos_text)):
            completion_ids.append(int(eos_id))
        ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        if len(ids) > seq_len:
            dataset.truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
            if all(label == IGNORE_INDEX for label in labels):
                dataset.dropped += 1
                continue
        if not completion_ids:
            dataset.dropped += 1
            continue
        dataset.input_ids.append(ids)
        dataset.labels.append(labels)
    if dataset.truncated:
        warnings.warn(
            f"{dataset.truncated} of {len(examples)} examples are longer than seq_len={seq_len} tokens and "
            f"were cut at the end; {dataset.dropped} kept no completion token and were dropped",
            stacklevel=2,
        )
    return dataset


# ----------------------------------------------------------------------------- splits and batches


def split_holdout(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split examples into train and holdout, deterministically, keeping groups whole.

    Examples sharing a `group` (all references of one E2E MR) land on the same side; examples without
    a group are their own group. `round(fraction * groups)` groups are held out, at least one and at
    most all but one when `0 < fraction < 1` and there are two or more groups. Both lists keep the
    input order.

    Args:
        examples: The examples to split.
        fraction: Share of groups to hold out, in `[0, 1)`.
        seed: Seed of the group shuffle; the same seed gives the same split.

    Returns:
        `(train, holdout)`.

    Raises:
        ConfigError: `fraction` is outside `[0, 1)`.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"holdout fraction must be in [0, 1), got {fraction}")
    keys = [ex.group if ex.group is not None else ("__row__", index) for index, ex in enumerate(examples)]
    groups = list(dict.fromkeys(keys))  # first-appearance order, so the shuffle is reproducible
    count = round(fraction * len(groups))
    if fraction > 0 and len(groups) >= 2:
        count = min(max(count, 1), len(groups) - 1)
    random.Random(f"lorakit-holdout:{seed}").shuffle(groups)
    held = set(groups[:count])
    train = [ex for ex, key in zip(examples, keys, strict=True) if key not in held]
    holdout = [ex for ex, key in zip(examples, keys, strict=True) if key in held]
    return train, holdout


def num_batches(dataset: Sequence[Any] | TokenizedDataset | ClassificationDataset, batch_size: int) -> int:
    """Number of batches `iterate_batches` yields per epoch (the last one may be smaller).

    Args:
        dataset: A tokenised dataset.
        batch_size: Rows per batch.

    Returns:
        `ceil(len(dataset) / batch_size)`.

    Raises:
        ConfigError: `batch_size < 1`.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return math.ceil(len(dataset) / batch_size)


def iterate_batches(
    dataset: TokenizedDataset | ClassificationDataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    start: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the batches of one epoch in a fixed order.

    The order depends only on `(seed, epoch)` (a `random.Random` seeded with both), not on global
    RNG state, so a resumed run sees exactly the batches it would have seen.

    Args:
        dataset: From `tokenize_examples` or `tokenize_classification`.
        batch_size: Rows per batch; the last batch of an epoch may be smaller.
        seed: Shuffle seed.
        epoch: Epoch number; each epoch has its own order.
        shuffle: False keeps dataset order.
        start: Skip the first `start` batches of this epoch (resume mid-epoch); batch `start` is the
            same tensor data as the `start`-th batch of an uninterrupted epoch.

    Returns:
        An iterator of batch dicts (see `TokenizedDataset.collate` / `ClassificationDataset.collate`).

    Raises:
        ConfigError: `batch_size < 1`, or `start` is negative or beyond the epoch's batch count.
    """
    total = num_batches(dataset, batch_size)
    if not 0 <= start <= total:
        raise ConfigError(f"start must be between 0 and {total} (batches per epoch), got {start}")
    order = list(range(len(dataset)))
    if shuffle:
        random.Random(f"lorakit-batches:{seed}:{epoch}").shuffle(order)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for index in range(start, total):
            yield dataset.collate(order[index * batch_size : (index + 1) * batch_size])

    return batches()


# ----------------------------------------------------------------------------- classification


def load_classification(path: str | os.PathLike[str]) -> tuple[list[str], list[str] | None, list[int]]:
    """Read a GLUE-style classification TSV.

    Columns are found by header name: `label` with `sentence` (SST-2) or with `sentence1` and
    `sentence2` (MRPC, RTE; CSV-style quoting is honoured). The original GLUE CoLA format (no
    header; columns `source, label, star, sentence`) is recognised too.

    Args:
        path: The `.tsv` file.

    Returns:
        `(texts_a, texts_b, labels)`; `texts_b` is None for single-sentence tasks; labels are
        integer class ids.

    Raises:
        DataError: The file is missing or empty, the columns are not an accepted set (found and
            accepted columns are listed), a row is short, or a label is not an integer.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"classification file not found: {file}")
    with file.open(encoding="utf-8-sig", newline="") as handle:
        first = handle.readline()
        if not first.strip():
            raise DataError(f"{file} is empty: it holds no rows")
        header = [name.strip() for name in first.rstrip("\r\n").split("\t")]
        handle.seek(0)
        if "label" in header and ("sentence" in header or {"sentence1", "sentence2"} <= set(header)):
            reader = csv.reader(handle, delimiter="\t")
            next(reader)
            label_col = header.index("label")
            if "sentence" in header:
                text_cols = [header.index("sentence")]
            else:
                text_cols = [header.index("sentence1"), header.index("sentence2")]
        elif len(header) == 4 and header[1].strip() in {"0", "1"}:
            # Original GLUE CoLA: no header, unquoted sentences that may contain quote marks.
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            label_col, text_cols = 1, [3]
        else:
            raise DataError(
                f"{file}: found columns {header}; accepted: a header with 'label' and 'sentence', or "
                "'label', 'sentence1' and 'sentence2', or the headerless GLUE CoLA format "
                "(source, label, star, sentence)"
            )
        texts_a: list[str] = []
        texts_b: list[str] = []
        labels: list[int] = []
        need = max([label_col, *text_cols]) + 1
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            where = f"{file}, line {reader.line_num}"
            if len(row) < need:
                raise DataError(f"{where}: expected at least {need} tab-separated fields, found {len(row)}")
            try:
                labels.append(int(row[label_col]))
            except ValueError:
                raise DataError(f"{where}: label {row[label_col]!r} is not an integer class id") from None
            texts_a.append(row[text_cols[0]])
            if len(text_cols) == 2:
                texts_b.append(row[text_cols[1]])
    if not labels:
        raise DataError(f"{file} is empty: it has a header but no rows")
    return texts_a, (texts_b if len(text_cols) == 2 else None), labels


@dataclass
class ClassificationDataset:
    """Token ids and class labels for sequence classification, one row per example.

    Attributes:
        input_ids: Token ids per row (with the tokenizer's special tokens), at most `seq_len` long.
        token_type_ids: Segment ids per row for tokenizers that produce them (BERT), else None.
        labels: One class id per row.
        pad_id: Id used to right-pad batches.
        seq_len: Maximum row length.
        truncated: Rows that were longer than `seq_len` and were truncated.
    """

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int]
    pad_id: int
    seq_len: int
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-pad the given rows into a batch.

        Args:
            indices: Row indices, in batch order.

        Returns:
            `input_ids`, `attention_mask` (and `token_type_ids` when present) as
            `(len(indices), longest row)` long tensors, and `labels` as a `(len(indices),)` tensor.
        """
        rows = [self.input_ids[i] for i in indices]
        batch = {
            "input_ids": _right_pad(rows, self.pad_id),
            "attention_mask": _right_pad([[1] * len(r) for r in rows], 0),
        }
        if self.token_type_ids is not None:
            batch["token_type_ids"] = _right_pad([self.token_type_ids[i] for i in indices], 0)
        batch["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return batch


def tokenize_classification(
    texts_a: Sequence[str],
    texts_b: Sequence[str] | None,
    labels: Sequence[int],
    tokenizer: Any,
    seq_len: int,
) -> ClassificationDataset:
    """Tokenise single sentences or sentence pairs for classification.

    Pairs are encoded as the tokenizer does for pairs (`[CLS] a [SEP] b [SEP]` for BERT). Rows longer
    than `seq_len` are truncated (longest sequence first), counted in `truncated` and reported with
    one `warnings.warn`.

    Args:
        texts_a: First sentences.
        texts_b: Second sentences, or None.
        labels: Class ids.
        tokenizer: A transformers tokenizer with a pad (or EOS) token.
        seq_len: Maximum tokens per row, special tokens included.

    Returns:
        The tokenised dataset.

    Raises:
        ConfigError: `seq_len < 2`.
        DataError: The inputs are empty or of different lengths, or the tokenizer has no pad/EOS token.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if not texts_a:
        raise DataError("no examples to tokenise")
    lengths = {len(texts_a), len(labels)} | ({len(texts_b)} if texts_b is not None else set())
    if len(lengths) != 1:
        raise DataError(f"texts and labels differ in length: {sorted(lengths)}")
    pad_id = _pad_id(tokenizer)
    pair = list(texts_b) if texts_b is not None else None
    full = tokenizer(list(texts_a), pair, truncation=False)["input_ids"]
    truncated = sum(len(ids) > seq_len for ids in full)
    encoded = tokenizer(list(texts_a), pair, truncation=True, max_length=seq_len)
    type_ids = encoded.get("token_type_ids")
    if truncated:
        warnings.warn(
            f"{truncated} of {len(texts_a)} examples are longer than seq_len={seq_len} tokens and were truncated",
            stacklevel=2,
        )
    return ClassificationDataset(
        input_ids=[list(ids) for ids in encoded["input_ids"]],
        token_type_ids=[list(t) for t in type_ids] if type_ids is not None else None,
        labels=[int(label) for label in labels],
        pad_id=pad_id,
        seq_len=seq_len,
        truncated=truncated,
    )
