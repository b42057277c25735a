"""Right-padding rows of token ids into batch tensors: what every tokenised dataset shares.

`right_pad` is the one padding routine behind every dataset's `collate` (`TokenizedDataset`,
`ClassificationDataset`, both `PaddedRows`); `padding_id` picks the id token rows are padded with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorakit.errors import DataError

__all__ = ["PaddedRows", "padding_id", "right_pad"]


class PaddedRows:
    """What every tokenised dataset shares: rows of token ids (`input_ids`) right-padded with
    `pad_id` into batches. `TokenizedDataset` and `ClassificationDataset` add their labels."""

    input_ids: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def padded_inputs(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` of the given rows, each `(len(indices), longest row)`."""
        rows = [self.input_ids[i] for i in indices]
        return {
            "input_ids": right_pad(rows, self.pad_id),
            "attention_mask": right_pad([[1] * len(r) for r in rows], 0),
        }


def right_pad(rows: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
    """Stack rows of ids into one tensor, right-padding the shorter rows.

    Args:
        rows: Rows of integer ids (token ids, attention bits, labels), at least one.
        fill: Value of the padding positions (a pad token id, 0 for masks, -100 for labels).

    Returns:
        A `(len(rows), longest row)` long tensor; row `i` starts with `rows[i]` and is `fill` after it.
    """
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def padding_id(tokenizer: Any) -> int:
    """The id a tokenizer's rows are padded with: its pad token, else its EOS token.

    Args:
        tokenizer: A transformers tokenizer.

    Returns:
        `tokenizer.pad_token_id`, or `tokenizer.eos_token_id` when there is no pad token.

    Raises:
        DataError: The tokenizer has neither a pad nor an EOS token.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first")
    return int(pad)
