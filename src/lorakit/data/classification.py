"""Sequence classification data: GLUE-style TSV files, tokenised single sentences or sentence pairs."""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.data.padding import PaddedRows, padding_id, right_pad
from lorakit.errors import ConfigError, DataError

__all__ = ["ClassificationDataset", "load_classification", "tokenize_classification"]


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
class ClassificationDataset(PaddedRows):
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

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-pad the given rows into a batch.

        Args:
            indices: Row indices, in batch order.

        Returns:
            `input_ids`, `attention_mask` (and `token_type_ids` when present) as
            `(len(indices), longest row)` long tensors, and `labels` as a `(len(indices),)` tensor.
        """
        batch = self.padded_inputs(indices)
        if self.token_type_ids is not None:
            batch["token_type_ids"] = right_pad([self.token_type_ids[i] for i in indices], 0)
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
    pad_id = padding_id(tokenizer)
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
