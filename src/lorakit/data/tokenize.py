"""Causal-LM tokenisation with completion-only labels: prompt tokens are labelled `IGNORE_INDEX`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.data.examples import Example
from lorakit.data.padding import PaddedRows, padding_id, right_pad
from lorakit.errors import ConfigError, DataError

__all__ = ["IGNORE_INDEX", "TokenizedDataset", "encode_prompt", "tokenize_examples"]

IGNORE_INDEX = -100
"""Label of a position without a target (prompt, padding), as transformers uses; cross_entropy skips it."""


@dataclass
class TokenizedDataset(PaddedRows):
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
    pad_id = padding_id(tokenizer)
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
