"""Packing and length grouping: which examples share a row, and which rows share a batch.

Packing (`TrainConfig.packing`) concatenates whole examples into rows of at most `seq_len` tokens.
Each epoch's order is shuffled with `(seed, epoch)` and packed by best-fit decreasing (examples by
length, longest first — ties in the shuffled order — each into the row it fills best; TRL's `bfd`
strategy), then the rows are shuffled again with `(seed, epoch)`. Which rows exist depends only on
the examples' lengths, so every epoch has the same number of rows (`num_rows`), and the order
depends only on `(seed, epoch)`, so a resumed run reads the same batches. A packed batch
(`collate_packed`) carries, beside `input_ids`, `attention_mask` (1 on tokens, 0 on the padding of
rows shorter than the longest) and `labels`, the `position_ids` of each token within its example
(restarting at 0), and the label of each example's first token is -100: a causal LM predicts token
t+1 from token t, so nothing is predicted across a boundary, and an unpacked row never has a target
at its first token either. `lorakit.train.packed.model_inputs` turns such a batch into the form the
model's attention keeps apart (a block-diagonal mask, or flash-attention's varlen sequences).

Length grouping (`TrainConfig.group_by_length`, unpacked rows) is transformers'
`LengthGroupedSampler`: the epoch's shuffled order is cut into mega-batches of up to 50 batches,
each sorted longest first, and the longest example of the epoch leads its first batch (a run that
would run out of memory does so at once); batches are consecutive slices, so padding is small.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.data.padding import right_pad
from lorakit.data.tokenize import IGNORE_INDEX, TokenizedDataset
from lorakit.errors import DataError

__all__ = [
    "MEGA_BATCHES",
    "PackingStats",
    "best_fit_decreasing",
    "collate_packed",
    "length_grouped_order",
    "num_rows",
    "packed_rows",
    "packing_stats",
]

MEGA_BATCHES = 50
"""Batches per mega-batch of `length_grouped_order` (transformers' `mega_batch_mult` cap)."""


def best_fit_decreasing(lengths: Sequence[int], capacity: int, order: Sequence[int]) -> list[list[int]]:
    """Pack items into rows of at most `capacity`: longest first, each into the fullest row it fits.

    Items of equal length keep their order in `order`; among rows with the same free space the one
    that reached it last takes the item. So the rows' lengths depend only on the lengths packed,
    not on `order`, which only decides which of equally long items lands where.

    Args:
        lengths: Length of every item (>= 1).
        capacity: Most tokens a row holds.
        order: The items to pack (indices into `lengths`), in the order ties are broken.

    Returns:
        Rows of item indices, in the order the rows were opened; items within a row longest first.

    Raises:
        DataError: An item longer than `capacity` or empty.
    """
    items = sorted(order, key=lambda i: -lengths[i])  # stable: ties keep `order`
    rows: list[list[int]] = []
    free: dict[int, list[int]] = {}  # free space -> rows with that much left (a stack)
    spaces: list[int] = []  # the keys of `free`, sorted
    for item in items:
        size = lengths[item]
        if not 1 <= size <= capacity:
            raise DataError(f"example {item} has {size} tokens; a packed row holds 1 to {capacity} (seq_len)")
        at = bisect.bisect_left(spaces, size)
        if at == len(spaces):
            row, space = len(rows), capacity
            rows.append([])
        else:
            space = spaces[at]
            row = free[space].pop()
            if not free[space]:
                del free[space]
                spaces.pop(at)
        rows[row].append(item)
        left = space - size
        if left:
            if left not in free:
                free[left] = []
                bisect.insort(spaces, left)
            free[left].append(row)
    return rows


def _lengths(dataset: TokenizedDataset) -> list[int]:
    return [len(ids) for ids in dataset.input_ids]


def num_rows(dataset: TokenizedDataset) -> int:
    """Packed rows per epoch (the same in every epoch; see the module docstring)."""
    return len(best_fit_decreasing(_lengths(dataset), dataset.seq_len, range(len(dataset))))


def packed_rows(dataset: TokenizedDataset, *, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """The packed rows of one epoch, in the order they are read.

    Args:
        dataset: Tokenised examples, each at most `dataset.seq_len` tokens.
        seed: Shuffle seed.
        epoch: Epoch number; each epoch has its own packing and order.
        shuffle: False packs the examples in dataset order and keeps the rows in the order opened.

    Returns:
        Rows of example indices; `num_rows(dataset)` of them.

    Raises:
        DataError: An example longer than `seq_len`.
    """
    order = list(range(len(dataset)))
    if shuffle:
        random.Random(f"lorakit-packing:{seed}:{epoch}").shuffle(order)
    rows = best_fit_decreasing(_lengths(dataset), dataset.seq_len, order)
    if shuffle:
        random.Random(f"lorakit-packed-rows:{seed}:{epoch}").shuffle(rows)
    return rows


def collate_packed(dataset: TokenizedDataset, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """One batch of packed rows: each row its examples end to end, right-padded to the longest row.

    Args:
        dataset: The tokenised examples.
        rows: Example indices per row (from `packed_rows`).

    Returns:
        `input_ids`, `attention_mask`, `position_ids` and `labels`, each `(len(rows), longest row)`
        long tensors: positions count from 0 within each example (the padding goes on counting
        after the row's last example), labels are the examples' with -100 at each example's first
        token and on the padding; padding has `pad_id` and attention 0.
    """
    ids: list[list[int]] = []
    positions: list[list[int]] = []
    labels: list[list[int]] = []
    for row in rows:
        row_ids: list[int] = []
        row_positions: list[int] = []
        row_labels: list[int] = []
        for index in row:
            tokens = dataset.input_ids[index]
            row_ids += tokens
            row_positions += range(len(tokens))
            row_labels += [IGNORE_INDEX, *dataset.labels[index][1:]]
        ids.append(row_ids)
        positions.append(row_positions)
        labels.append(row_labels)
    longest = max(len(r) for r in ids)
    for row_positions in positions:  # the padding continues the last example's positions (never read)
        start = row_positions[-1] + 1
        row_positions += range(start, start + longest - len(row_positions))
    return {
        "input_ids": right_pad(ids, dataset.pad_id),
        "attention_mask": right_pad([[1] * len(r) for r in ids], 0),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "labels": right_pad(labels, IGNORE_INDEX),
    }


@dataclass(frozen=True)
class PackingStats:
    """How a dataset packs.

    Attributes:
        examples: Examples packed.
        rows: Rows per epoch.
        tokens: Tokens of all examples.
        seq_len: Most tokens a row holds.
    """

    examples: int
    rows: int
    tokens: int
    seq_len: int

    @property
    def fill(self) -> float:
        """Share of the rows' `rows × seq_len` places that hold a token."""
        return self.tokens / max(1, self.rows * self.seq_len)

    def __str__(self) -> str:
        return (
            f"packing: {self.examples:,} examples ({self.tokens:,} tokens) into {self.rows:,} rows of "
            f"{self.seq_len} tokens, {100 * self.fill:.1f}% full"
        )


def packing_stats(dataset: TokenizedDataset) -> PackingStats:
    """Examples, rows, tokens and fill of `dataset` packed into rows of `dataset.seq_len`."""
    lengths = _lengths(dataset)
    return PackingStats(examples=len(lengths), rows=num_rows(dataset), tokens=sum(lengths), seq_len=dataset.seq_len)


def length_grouped_order(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int) -> list[int]:
    """One epoch's order of rows for batches of similar length (transformers' `LengthGroupedSampler`).

    The rows are shuffled with `(seed, epoch)`, cut into mega-batches of `m × batch_size` rows
    (m = min(rows // (4 × batch_size), `MEGA_BATCHES`), at least 1), each sorted longest first,
    and the longest row of all swapped to the front. Consecutive slices of `batch_size` are the
    batches; each mega-batch holds whole batches, so their number is `ceil(rows / batch_size)`.

    Args:
        lengths: Tokens of each row.
        batch_size: Rows per batch.
        seed: Shuffle seed.
        epoch: Epoch number.

    Returns:
        A permutation of `range(len(lengths))`.
    """
    order = list(range(len(lengths)))
    random.Random(f"lorakit-batches:{seed}:{epoch}").shuffle(order)
    mega = max(1, min(len(lengths) // (batch_size * 4), MEGA_BATCHES)) * batch_size
    groups = [sorted(order[i : i + mega], key=lambda j: -lengths[j]) for i in range(0, len(order), mega)]
    if groups:
        longest = max(range(len(groups)), key=lambda g: lengths[groups[g][0]])
        groups[0][0], groups[longest][0] = groups[longest][0], groups[0][0]
    return [index for group in groups for index in group]
