"""Splits and batches: a group-preserving holdout, and reproducible epochs of batches.

Each batch is the dataset's own `collate` of the rows drawn (right-padded by `lorakit.data.padding`),
or, packed, `packing.collate_packed` of whole packed rows; `packing` also orders rows by length.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lorakit.data.classification import ClassificationDataset
from lorakit.data.examples import Example
from lorakit.data.packing import collate_packed, length_grouped_order, num_rows, packed_rows
from lorakit.data.tokenize import TokenizedDataset
from lorakit.errors import ConfigError

__all__ = ["iterate_batches", "num_batches", "split_holdout"]


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


def num_batches(
    dataset: Sequence[Any] | TokenizedDataset | ClassificationDataset, batch_size: int, *, packing: bool = False
) -> int:
    """Number of batches `iterate_batches` yields per epoch (the last one may be smaller).

    Args:
        dataset: A tokenised dataset.
        batch_size: Rows per batch.
        packing: Count batches of packed rows (`lorakit.data.packing`; the same in every epoch).

    Returns:
        `ceil(rows / batch_size)`: rows are the examples, or the packed rows.

    Raises:
        ConfigError: `batch_size < 1`; `packing` for a dataset that is not a causal LM's.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if packing:
        return math.ceil(num_rows(_packable(dataset)) / batch_size)
    return math.ceil(len(dataset) / batch_size)


def _packable(dataset: Any) -> TokenizedDataset:
    if not isinstance(dataset, TokenizedDataset):
        raise ConfigError(
            f"packing concatenates a causal LM's examples; a {type(dataset).__name__} cannot be packed "
            "(train it without packing)"
        )
    return dataset


def iterate_batches(
    dataset: TokenizedDataset | ClassificationDataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    start: int = 0,
    packing: bool = False,
    group_by_length: bool = False,
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
        packing: Batches of packed rows (`packing.packed_rows`, `packing.collate_packed`): whole
            examples end to end in rows of at most `dataset.seq_len` tokens, with `position_ids`.
        group_by_length: Batches of rows of similar length (`packing.length_grouped_order`); with
            `shuffle`, for unpacked rows.

    Returns:
        An iterator of batch dicts (see `TokenizedDataset.collate` / `ClassificationDataset.collate`,
        `packing.collate_packed`).

    Raises:
        ConfigError: `batch_size < 1`, `start` negative or beyond the epoch's batch count, `packing`
            for a dataset that is not a causal LM's, `packing` with `group_by_length`.
    """
    if packing and group_by_length:
        raise ConfigError("group_by_length orders unpacked rows; packed rows are already filled to seq_len")
    total = num_batches(dataset, batch_size, packing=packing)
    if not 0 <= start <= total:
        raise ConfigError(f"start must be between 0 and {total} (batches per epoch), got {start}")
    if packing:
        rows = packed_rows(_packable(dataset), seed=seed, epoch=epoch, shuffle=shuffle)

        def packed() -> Iterator[dict[str, torch.Tensor]]:
            for index in range(start, total):
                yield collate_packed(dataset, rows[index * batch_size : (index + 1) * batch_size])

        return packed()
    if group_by_length and shuffle:
        lengths = [len(ids) for ids in dataset.input_ids]
        order = length_grouped_order(lengths, batch_size, seed=seed, epoch=epoch)
    else:
        order = list(range(len(dataset)))
        if shuffle:
            random.Random(f"lorakit-batches:{seed}:{epoch}").shuffle(order)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for index in range(start, total):
            yield dataset.collate(order[index * batch_size : (index + 1) * batch_size])

    return batches()
