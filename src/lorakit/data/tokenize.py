"""Causal-LM tokenisation: each example's token ids and labels (`IGNORE_INDEX` where nothing trains),
truncated to `seq_len`, with the counts a user checks before training (`lorakit.data.stats`).

Prompt/completion and text examples are tokenised here (prompt and completion apart, so the boundary
is exact); conversations are rendered and masked by `lorakit.data.chat`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lorakit.data.chat import check_train_on, encode_conversations
from lorakit.data.examples import Example
from lorakit.data.padding import PaddedRows, padding_id, right_pad
from lorakit.errors import ConfigError, DataError

__all__ = ["DROP_REASONS", "IGNORE_INDEX", "TokenizedDataset", "drop_reason", "encode_prompt", "tokenize_examples"]

IGNORE_INDEX = -100
"""Label of a position without a target (prompt, padding), as transformers uses; cross_entropy skips it."""

Truncate = Literal["right", "left"]
DROP_REASONS: dict[str, str] = {
    "truncated": "lost every trained token to truncation at seq_len={seq_len}",
    "untrained": "had no token to train (an empty completion or reply)",
}
"""Why an example is left out (the keys of `TokenizedDataset.drops`), as messages say it."""


@dataclass
class TokenizedDataset(PaddedRows):
    """Token ids and labels for a causal LM, one row per kept example.

    Attributes:
        input_ids: Token ids per row, at most `seq_len` long.
        labels: Same lengths; `-100` where nothing trains (prompt, user turns, template text), the
            token id where it does (completion + EOS, assistant replies + their end token).
        pad_id: Id used to right-pad batches.
        seq_len: Maximum row length.
        truncated: Examples that were longer than `seq_len` and cut (including dropped ones).
        dropped: Examples left out because no token of theirs trains (never trained on).
        drops: Why, as `{reason: count}` (reasons are the keys of `DROP_REASONS`).
        truncate: Which end a long example lost: `"right"` keeps its start, `"left"` its end.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    pad_id: int
    seq_len: int
    truncated: int = 0
    dropped: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    truncate: str = "right"

    @property
    def examples(self) -> int:
        """How many examples were tokenised: the rows kept and those dropped."""
        return len(self.input_ids) + self.dropped

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-pad the given rows into a batch.

        Args:
            indices: Row indices, in batch order.

        Returns:
            `input_ids`, `attention_mask` and `labels`, each a `(len(indices), longest row)` long
            tensor; padding has `pad_id`, attention 0 and label -100.
        """
        return {**self.padded_inputs(indices), "labels": right_pad([self.labels[i] for i in indices], IGNORE_INDEX)}


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


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    seq_len: int,
    *,
    train_on: str = "assistant",
    train_on_eos: bool = True,
    truncate: str = "right",
    source: str | None = None,
) -> TokenizedDataset:
    """Tokenise examples and label the tokens that train.

    A prompt/completion or text example is `[BOS] + prompt tokens + completion tokens + [EOS]`: BOS
    only if the tokenizer adds it by default; EOS unless the completion text already ends with the
    EOS token. Prompt and completion are encoded separately so the boundary is exact: the labelled
    tokens decode to the completion (+ EOS). A conversation is rendered with the tokenizer's chat
    template and labelled from it (`lorakit.data.chat`).

    Examples longer than `seq_len` are cut (`truncate`), counted in `truncated`, and reported with
    one `warnings.warn`; an example left with no trained token is dropped and counted in `dropped`
    and `drops` (with why), never trained on.

    Args:
        examples: Examples from `load_examples`.
        tokenizer: A transformers tokenizer with a pad or EOS token (and a chat template, for
            conversations).
        seq_len: Maximum tokens per row.
        train_on: `"assistant"` (every assistant reply of a conversation; a prompt/completion's
            completion), `"last"` (a conversation's last assistant reply only) or `"all"` (every
            token, prompts and user turns too).
        train_on_eos: Train the token that ends a reply (the template's end-of-turn token, the EOS
            appended to a completion), so the model learns to stop.
        truncate: `"right"` keeps the start of a long example, `"left"` its end.
        source: The data's name, for the error when nothing is left.

    Returns:
        The tokenised dataset.

    Raises:
        ConfigError: `seq_len < 2`, an unknown `train_on` or `truncate`.
        DataError: `examples` is empty, no example keeps a trained token (the message says why),
            the tokenizer has neither a pad nor an EOS token, or a conversation cannot be rendered
            and masked (see `chat.encode_conversations`).
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    check_train_on(train_on)
    if truncate not in ("right", "left"):
        raise ConfigError(f"truncate must be 'right' (keep the start) or 'left' (keep the end); got {truncate!r}")
    if not examples:
        raise DataError(f"{source}: no examples to tokenise" if source else "no examples to tokenise")
    pad_id = padding_id(tokenizer)
    chats = [i for i, ex in enumerate(examples) if ex.messages is not None]
    plain = [i for i, ex in enumerate(examples) if ex.messages is None]
    encoded: list[tuple[list[int], list[int]]] = [([], [])] * len(examples)
    # Plain text needs no chat template (GPT-2, a base model's tokenizer): only conversations go to chat.
    conversations = (
        encode_conversations([examples[i] for i in chats], tokenizer, train_on=train_on, train_on_eos=train_on_eos)
        if chats
        else []
    )
    for i, pair in zip(chats, conversations, strict=True):
        encoded[i] = pair
    for i, pair in zip(
        plain, _encode_plain([examples[i] for i in plain], tokenizer, train_on, train_on_eos), strict=True
    ):
        encoded[i] = pair
    dataset = TokenizedDataset([], [], pad_id=pad_id, seq_len=seq_len, truncate=truncate)
    for ids, labels in encoded:
        cut = len(ids) > seq_len
        if cut:
            dataset.truncated += 1
            ids, labels = (
                (ids[:seq_len], labels[:seq_len]) if truncate == "right" else (ids[-seq_len:], labels[-seq_len:])
            )
        if all(label == IGNORE_INDEX for label in labels):
            reason = "truncated" if cut else "untrained"
            dataset.drops[reason] = dataset.drops.get(reason, 0) + 1
            dataset.dropped += 1
            continue
        dataset.input_ids.append(ids)
        dataset.labels.append(labels)
    if not dataset.input_ids:
        raise DataError(f"{source or 'the data'}: no example is left to train on: {_why_nothing(dataset)}")
    if dataset.truncated:
        side = "end" if truncate == "right" else "start"
        warnings.warn(
            f"{dataset.truncated} of {len(examples)} examples are longer than seq_len={seq_len} tokens and "
            f"were cut at the {side}; {dataset.dropped} kept no trained token and were dropped",
            stacklevel=2,
        )
    return dataset


def drop_reason(reason: str, seq_len: int) -> str:
    """The words of a `drops` key (`DROP_REASONS`), with the dataset's `seq_len` filled in."""
    return DROP_REASONS.get(reason, reason).format(seq_len=seq_len)


def _why_nothing(dataset: TokenizedDataset) -> str:
    if len(dataset.drops) == 1:
        ((reason, count),) = dataset.drops.items()
        return f"all {count} examples {drop_reason(reason, dataset.seq_len)}"
    parts = [f"{count} {drop_reason(reason, dataset.seq_len)}" for reason, count in dataset.drops.items()]
    return f"of {dataset.dropped} examples, " + " and ".join(parts)


def _encode_plain(
    examples: Sequence[Example], tokenizer: Any, train_on: str, train_on_eos: bool
) -> list[tuple[list[int], list[int]]]:
    """Ids and labels of prompt/completion and text examples: completion (+ EOS) labelled, or all."""
    if not examples:
        return []
    adds_bos = _adds_bos(tokenizer)
    eos_id, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    prompts = tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([ex.completion for ex in examples], add_special_tokens=False)["input_ids"]
    out = []
    for example, prompt_ids, completion_ids in zip(examples, prompts, completions, strict=True):
        prompt_ids = _prompt_prefix(tokenizer, example.prompt, adds_bos) + list(prompt_ids)
        completion_labels = list(completion_ids)
        if eos_id is not None and not (eos_text and example.completion.rstrip().endswith(eos_text)):
            completion_ids = [*completion_ids, int(eos_id)]
            completion_labels.append(int(eos_id) if train_on_eos else IGNORE_INDEX)
        ids = prompt_ids + list(completion_ids)
        if train_on == "all":
            out.append((ids, list(ids)))
        else:
            out.append((ids, [IGNORE_INDEX] * len(prompt_ids) + completion_labels))
    return out
