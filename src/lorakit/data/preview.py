"""`lorakit data preview`: the first examples as the model sees them, trained tokens marked, then the
dataset's numbers (`lorakit.data.stats`).

The text shown is the rows' token ids decoded (special tokens, template text, truncation and all),
so what is marked is exactly what the loss is computed on: ANSI colour on a terminal, `[[...]]`
around each trained span otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lorakit.data.formats import load_examples
from lorakit.data.stats import stats_lines
from lorakit.data.tokenize import IGNORE_INDEX, TokenizedDataset, tokenize_examples
from lorakit.errors import ConfigError

__all__ = ["OPEN", "SHUT", "Preview", "highlight", "preview", "preview_lines"]

OPEN, SHUT = "[[", "]]"
"""What surrounds a trained span without colour."""
_GREEN, _RESET = "\x1b[1;32m", "\x1b[0m"


@dataclass
class Preview:
    """What `lorakit data preview` shows (the data, and how it is read, are `TrainRun`'s fields).

    Args:
        action: what to do with the data: `preview` prints the first examples as the model sees
            them, trained tokens marked, then the dataset's numbers.
        examples: how many examples to show, from the first.
        color: mark trained tokens in colour (`always`), with `[[...]]` (`never`), or in colour
            when stdout is a terminal (`auto`).
    """

    action: Literal["preview"] = "preview"
    examples: int = 3
    color: Literal["auto", "always", "never"] = "auto"

    def __post_init__(self) -> None:
        problems = []
        if self.action != "preview":
            problems.append(f"action must be preview, got {self.action!r}")
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < 0:
            problems.append(f"examples must be an integer >= 0, got {self.examples!r}")
        if self.color not in ("auto", "always", "never"):
            problems.append(f"color must be auto, always or never, got {self.color!r}")
        if problems:
            raise ConfigError("invalid Preview:\n" + "\n".join(f"  - {p}" for p in problems))


def highlight(ids: Sequence[int], labels: Sequence[int], tokenizer: Any, *, color: bool) -> str:
    """A row's text with its trained tokens marked.

    Args:
        ids: The row's token ids.
        labels: Its labels (`IGNORE_INDEX` where nothing trains).
        tokenizer: The tokenizer that made it.
        color: ANSI bold green for trained text; else `[[` and `]]` around each trained span.

    Returns:
        The decoded row, special tokens included; consecutive tokens of one kind are decoded
        together, so characters split over tokens come out whole.
    """
    parts = []
    start = 0
    for end in range(1, len(ids) + 1):
        trained = labels[start] != IGNORE_INDEX
        if end < len(ids) and (labels[end] != IGNORE_INDEX) == trained:
            continue
        text = tokenizer.decode(list(ids[start:end]), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if trained:
            text = f"{_GREEN}{text}{_RESET}" if color else f"{OPEN}{text}{SHUT}"
        parts.append(text)
        start = end
    return "".join(parts)


def preview_lines(dataset: TokenizedDataset, tokenizer: Any, *, examples: int = 3, color: bool = False) -> list[str]:
    """The first `examples` rows of `dataset`, marked (`highlight`), then its numbers (`stats_lines`)."""
    lines = []
    for index in range(min(examples, len(dataset))):
        ids, labels = dataset.input_ids[index], dataset.labels[index]
        trained = sum(1 for label in labels if label != IGNORE_INDEX)
        lines.append(f"--- example {index + 1}: {len(ids)} tokens, {trained} trained ---")
        lines.append(highlight(ids, labels, tokenizer, color=color))
    if lines:
        lines.append("---")
    return lines + stats_lines(dataset)


def preview(
    source: str | os.PathLike[str],
    tokenizer: Any,
    options: Preview,
    *,
    seq_len: int = 128,
    fields: Mapping[str, str] | None = None,
    train_on: str = "assistant",
    train_on_eos: bool = True,
    truncate: str = "right",
    color: bool = False,
) -> list[str]:
    """Read and tokenise `source` as `lorakit train` would, and return what `lorakit data preview` prints.

    Args:
        source: The data (see `load_examples`).
        tokenizer: The model's tokenizer.
        options: How many examples to show.
        seq_len, fields, train_on, train_on_eos, truncate: As `TrainRun`'s fields of those names.
        color: Mark trained tokens with ANSI colour (else `[[...]]`).

    Returns:
        The lines: the first examples, then the dataset's numbers.

    Raises:
        DataError, ConfigError: as `load_examples` and `tokenize_examples`.
    """
    examples = load_examples(source, tokenizer=tokenizer, fields=fields)
    dataset = tokenize_examples(
        examples,
        tokenizer,
        seq_len,
        train_on=train_on,
        train_on_eos=train_on_eos,
        truncate=truncate,
        source=os.fspath(source),
    )
    return preview_lines(dataset, tokenizer, examples=options.examples, color=color)
