"""The numbers of a tokenised dataset a user checks before training: examples, tokens, trained
tokens, truncated and dropped examples (with why), and a histogram of row lengths.

`lorakit data preview` and `lorakit train` (before its first step) print the same lines,
`stats_lines`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.data.tokenize import IGNORE_INDEX, TokenizedDataset, drop_reason

__all__ = ["DataStats", "data_stats", "length_histogram", "stats_lines"]


@dataclass(frozen=True)
class DataStats:
    """What a tokenised dataset holds.

    Attributes:
        examples: Examples tokenised (kept and dropped).
        rows: Rows kept (one per kept example).
        tokens: Tokens in the rows.
        trained: Tokens with a label (the loss is computed on them).
        truncated: Examples cut to `seq_len`.
        drops: Examples left out, `{reason: count}` (keys of `lorakit.data.tokenize.DROP_REASONS`).
        seq_len: The maximum row length.
        truncate: `"right"` (a cut example kept its start) or `"left"` (its end).
        lengths: Each row's length in tokens.
    """

    examples: int
    rows: int
    tokens: int
    trained: int
    truncated: int
    drops: dict[str, int]
    seq_len: int
    truncate: str
    lengths: tuple[int, ...]

    @property
    def dropped(self) -> int:
        """Examples left out, for every reason."""
        return sum(self.drops.values())


def data_stats(dataset: TokenizedDataset) -> DataStats:
    """Count what `dataset` holds (see `DataStats`)."""
    lengths = tuple(len(ids) for ids in dataset.input_ids)
    trained = sum(sum(1 for label in labels if label != IGNORE_INDEX) for labels in dataset.labels)
    drops = dict(dataset.drops) or ({"untrained": dataset.dropped} if dataset.dropped else {})
    return DataStats(
        examples=dataset.examples,
        rows=len(lengths),
        tokens=sum(lengths),
        trained=trained,
        truncated=dataset.truncated,
        drops=drops,
        seq_len=dataset.seq_len,
        truncate=dataset.truncate,
        lengths=lengths,
    )


def stats_lines(data: TokenizedDataset | DataStats, *, name: str = "data") -> list[str]:
    """The dataset's numbers as lines of text: what `lorakit data preview` and `lorakit train` print.

    Args:
        data: A tokenised dataset, or its `data_stats`.
        name: The first line's label (`data`, `training data`).

    Returns:
        `name: N examples -> R rows; T tokens, K trained (P%)`, then a line for truncated and one
        for dropped examples (when there are any), then the length histogram.
    """
    stats = data if isinstance(data, DataStats) else data_stats(data)
    share = 100 * stats.trained / stats.tokens if stats.tokens else 0.0
    lines = [
        f"{name}: {_examples(stats.examples)} -> {stats.rows:,} rows; {stats.tokens:,} tokens, "
        f"{stats.trained:,} trained ({share:.1f}%)"
    ]
    if stats.truncated:
        kept = "start" if stats.truncate == "right" else "end"
        lines.append(
            f"  truncated: {_examples(stats.truncated)} longer than seq_len={stats.seq_len} "
            f"(each keeps its {kept}; --truncate)"
        )
    for reason, count in stats.drops.items():
        lines.append(f"  dropped: {_examples(count)} {drop_reason(reason, stats.seq_len)} (never trained on)")
    if stats.lengths:
        lines.append("  row lengths (tokens):")
        lines += ["    " + line for line in length_histogram(stats.lengths, stats.seq_len)]
    return lines


def length_histogram(
    lengths: tuple[int, ...] | list[int], seq_len: int, *, bins: int = 6, width: int = 30
) -> list[str]:
    """A text histogram of row lengths over bins that double up to `seq_len`.

    Args:
        lengths: Row lengths (each between 1 and `seq_len`).
        seq_len: The last bin's upper end.
        bins: At most this many bins, `(seq_len/2, seq_len]`, `(seq_len/4, seq_len/2]`, ..., down
            to the one holding the shortest row, which starts at 1.
        width: The longest bar, in characters.

    Returns:
        One line per bin: its range, a bar of `#`, the count and its share.
    """
    shortest = min(lengths, default=1)
    tops = [seq_len]
    while len(tops) < bins and tops[-1] // 2 >= max(shortest, 1):
        tops.append(tops[-1] // 2)
    tops.reverse()
    top = max(seq_len, *lengths) if lengths else seq_len
    tops[-1] = top
    counts = [0] * len(tops)
    for length in lengths:
        counts[next(b for b, t in enumerate(tops) if length <= t)] += 1
    most = max(counts) or 1
    total = len(lengths) or 1
    lows = [1, *(t + 1 for t in tops[:-1])]
    span = len(f"{top}")
    lines = []
    for low, high, count in zip(lows, tops, counts, strict=True):
        bar = "#" * round(width * count / most)
        lines.append(f"{low:>{span}}-{high:<{span}} {bar:<{width}} {count:,} ({100 * count / total:.0f}%)")
    return lines


def _examples(count: int) -> str:
    return f"{count:,} example{'' if count == 1 else 's'}"
