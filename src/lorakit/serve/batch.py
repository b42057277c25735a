"""The running batch's KV cache: one left-padded tensor pair per layer, rows joining and leaving.

Each request is prefilled alone (batch 1, no padding: exactly what `lorakit generate` computes for
its prompt) and then joins the running batch. The batch keeps every layer's keys and values as
one tensor, left-padded so that all rows end at the same column:

    keys[layer]: (rows, kv_heads, width, head_dim)     mask: (rows, width), 1 where a token is real

Joining pads the shorter side on the left; leaving selects the remaining rows and drops leading
columns that no row uses any more. Both copy the cache once per event, not once per step; a decode
step appends one column (transformers' `DynamicCache.update`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["KVBatch", "layers_of", "make_cache"]


def make_cache(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A transformers `DynamicCache` holding `layers` (no copy)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(layers))


def layers_of(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) of each layer of a transformers cache returned by a forward.

    Raises:
        TypeError: the cache has layers that are not plain growing key/value pairs (sliding-window
            or recurrent caches), which this batch cannot pad and splice.
    """
    from transformers.cache_utils import DynamicLayer

    out = []
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise TypeError(
                f"layer {i} of the model's KV cache is a {type(layer).__name__}; the serving engine batches "
                "only plain key/value caches (DynamicLayer)"
            )
        out.append((layer.keys, layer.values))
    return out


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, heads, w, dim) -> (rows, heads, width, dim), zeros in front."""
    return F.pad(t, (0, 0, width - t.shape[2], 0)) if t.shape[2] < width else t


class KVBatch:
    """The KV cache and padding mask of the rows being decoded together."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def join(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append one prefilled row (its cache from a batch-1 forward: (1, heads, length, dim))."""
        length = layers[0][0].shape[2]
        row_mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if self.rows == 0:
            self.layers = [(k, v) for k, v in layers]
            self.mask = row_mask
            return
        width = max(self.width, length)
        self.layers = [
            (
                torch.cat([_pad_left(k, width), _pad_left(k1, width)]),
                torch.cat([_pad_left(v, width), _pad_left(v1, width)]),
            )
            for (k, v), (k1, v1) in zip(self.layers, layers, strict=True)
        ]
        self.mask = torch.cat([F.pad(self.mask, (width - self.width, 0)), F.pad(row_mask, (width - length, 0))])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order) and drop the leading columns no kept row uses."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.__init__(self.device)
            return
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        self.mask = mask[:, start:]
        self.layers = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in self.layers
        ]

    def step_inputs(self) -> tuple[Any, torch.Tensor]:
        """The cache and attention mask for a decode step (the mask has the new token's column)."""
        mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long, device=self.device)], dim=1)
        return make_cache(self.layers), mask

    def advance(self, cache: Any) -> None:
        """Take the cache a decode step returned (one column longer)."""
        self.layers = layers_of(cache)
        self.mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long, device=self.device)], dim=1)
