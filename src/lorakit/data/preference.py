"""Preference pairs: records with a prompt, a chosen and a rejected answer, tokenised and batched.

A record holds `prompt`, `chosen` and `rejected` (TRL's preference format), in any file
`lorakit.data.readers` reads (`.jsonl`, `.json`, `.csv`, `.parquet`, a `datasets` folder):

- *conversational*: three message lists (`prompt` the context — system, user, earlier turns —
  and `chosen`/`rejected` the replies, each with an assistant message). Each answer is the
  conversation `prompt + answer`, rendered with the tokenizer's chat template and masked by
  `lorakit.data.chat` as TRL's conversational prompt/completion is: only the answer's assistant
  turns train, up to their end-of-turn token (`train_on_eos`).
- *standard*: three strings, tokenised as SFT's plain prompt/completion (`lorakit.data.tokenize`):
  `[BOS] + prompt + answer + EOS`, the answer and EOS scored.

Each sequence (prompt + answer) longer than `seq_len` is cut as in SFT (`truncate`: `right` keeps its
start, `left` its end), and the pair is counted as truncated; a pair that keeps no scored token in
one of its answers is dropped and counted. A pair whose two answers are the same tokens carries no
preference: it is kept, counted and warned about.

A batch of `P` pairs is one concatenated batch, chosen rows first: rows `0..P-1` are the chosen
sequences and rows `P..2P-1` the rejected ones, right-padded (`PreferenceDataset.collate`), so both
answers of a pair run in one forward. Packed, the `2P` sequences of a batch are laid end to end in
rows of at most `seq_len` tokens (`pack_sequences`; best-fit decreasing, as SFT packs examples),
each token tagged with the sequence it belongs to.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.data.chat import encode_conversations
from lorakit.data.examples import Example

# The record checks SFT's formats use, so a preference record's messages are checked (and named in
# errors) exactly as a chat record's are.
from lorakit.data.formats import _conversation, _field, _messages
from lorakit.data.packing import best_fit_decreasing, length_grouped_order
from lorakit.data.padding import padding_id, right_pad
from lorakit.data.readers import read_records
from lorakit.data.stats import length_histogram
from lorakit.data.tokenize import IGNORE_INDEX, _encode_plain
from lorakit.errors import ConfigError, DataError

__all__ = [
    "PREFERENCE_FIELDS",
    "PreferenceDataset",
    "PreferencePair",
    "iterate_pair_batches",
    "load_pairs",
    "pack_sequences",
    "preference_lines",
    "split_pairs",
    "tokenize_pairs",
]

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
"""The fields of a preference record (`fields=` may rename `prompt`)."""

_DROPS = {"truncated": "lost every token of an answer to truncation at seq_len={seq_len}"}


@dataclass(frozen=True)
class PreferencePair:
    """One preference record: the same prompt with a chosen and a rejected answer.

    Attributes:
        chosen: The prompt with the chosen answer (a conversation keeps its messages, the prompt's
            as `prompt_messages`).
        rejected: The prompt with the rejected answer.
        origin: Where the record came from (`pairs.jsonl, line 3`), for messages.
    """

    chosen: Example
    rejected: Example
    origin: str | None = None

    @property
    def prompt(self) -> str:
        """The prompt as a model is given it to answer (a conversation's, with the generation prompt)."""
        return self.chosen.prompt


def load_pairs(
    source: str | os.PathLike[str], *, tokenizer: Any = None, fields: Mapping[str, str] | None = None
) -> list[PreferencePair]:
    """Read preference records (`prompt`, `chosen`, `rejected`) into pairs, in file order.

    Args:
        source: A `.jsonl`, `.json`, `.csv` or `.parquet` file or a `datasets` folder.
        tokenizer: Needed for conversational records (their messages are rendered with its chat
            template).
        fields: `{"prompt": NAME}` when the records call their prompt otherwise.

    Returns:
        One pair per record.

    Raises:
        ConfigError: `fields` renames something other than `prompt`.
        DataError: a missing or empty file; a record without `prompt`, `chosen` or `rejected` (the
            record and the field are named), fields that are neither all strings nor all message
            lists, a message with an unknown role or no content, an answer without an assistant
            message, a template that cannot render it.
    """
    names = dict(fields or {})
    others = sorted(set(names) - {"prompt"})
    if others:
        raise ConfigError(f"fields: preference records rename only 'prompt', not {others}")
    prompt_key = names.get("prompt", "prompt")
    records = read_records(source)
    path = records.path
    wanted = [prompt_key, "chosen", "rejected"]
    if records.columns:
        missing = [c for c in wanted if c not in records.columns]
        if missing:
            raise DataError(
                f"{path}: no column {missing[0]!r}; a preference dataset needs columns {wanted} "
                f"(found {records.columns})"
            )
    pairs = [_pair(record, f"{path}, {where}", tokenizer, prompt_key) for where, record in records.rows]
    if not pairs:
        raise DataError(f"{path} is empty: it holds no records")
    return pairs


def _pair(record: Any, where: str, tokenizer: Any, prompt_key: str) -> PreferencePair:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    for key in (prompt_key, "chosen", "rejected"):
        if record.get(key) is None:
            raise DataError(
                f"{where}: no field {key!r}; a preference record needs {prompt_key!r}, 'chosen' and 'rejected' "
                f"(found fields {sorted(record)})"
            )
    values = [record[prompt_key], record["chosen"], record["rejected"]]
    if all(isinstance(v, list) for v in values):
        prompt = _messages(values[0], where, prompt_key)
        answers = []
        for key, value in (("chosen", values[1]), ("rejected", values[2])):
            messages = _messages(value, where, key, first=len(prompt) + 1)
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{where}: the {key!r} messages hold no assistant message")
            answers.append(_conversation(prompt + messages, len(prompt), tokenizer, where))
        return PreferencePair(answers[0], answers[1], where)
    if any(isinstance(v, list) for v in values):
        names = (prompt_key, "chosen", "rejected")
        kinds = ", ".join(f"{k}: {type(v).__name__}" for k, v in zip(names, values, strict=True))
        raise DataError(
            f"{where}: {prompt_key!r}, 'chosen' and 'rejected' must all be strings or all message lists ({kinds})"
        )
    prompt = _field(record, prompt_key, where)
    chosen, rejected = _field(record, "chosen", where), _field(record, "rejected", where)
    return PreferencePair(Example(prompt, chosen, origin=where), Example(prompt, rejected, origin=where), where)


def split_pairs(
    pairs: Sequence[PreferencePair], fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Hold out `round(fraction × pairs)` pairs (at least one, at most all but one), fixed by `seed`.

    Pairs that share a prompt stay on one side, so a held-out prompt was never trained on.

    Returns:
        `(train, held out)`, each in input order.

    Raises:
        ConfigError: `fraction` outside `[0, 1)`.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"holdout fraction must be in [0, 1), got {fraction}")
    keys = [pair.prompt for pair in pairs]
    groups = list(dict.fromkeys(keys))
    count = round(fraction * len(groups))
    if fraction > 0 and len(groups) >= 2:
        count = min(max(count, 1), len(groups) - 1)
    random.Random(f"lorakit-holdout:{seed}").shuffle(groups)
    held = set(groups[:count])
    return [p for p, k in zip(pairs, keys, strict=True) if k not in held], [
        p for p, k in zip(pairs, keys, strict=True) if k in held
    ]


@dataclass
class PreferenceDataset:
    """Token ids and labels of each kept pair's two sequences (prompt + answer).

    Attributes:
        chosen_ids, chosen_labels: Per pair, the chosen sequence and its labels (-100 outside the
            answer's scored tokens).
        rejected_ids, rejected_labels: The same for the rejected answer.
        pad_id: Id the rows are padded with.
        seq_len: Most tokens of one sequence.
        truncate: `"right"` (a long sequence keeps its start) or `"left"` (its end).
        pairs_read: Pairs tokenised (kept and dropped).
        truncated: Pairs with a sequence cut to `seq_len` (dropped ones included).
        drops: Pairs left out, `{"truncated": count}`.
        identical: Kept pairs whose chosen and rejected sequences are the same tokens.
        origins: Where each kept pair came from (for messages).
        reference: The reference model's summed log-probabilities of each kept pair's (chosen,
            rejected) answers, `(pairs, 2)` float64, once precomputed; batches then carry them.
    """

    chosen_ids: list[list[int]]
    chosen_labels: list[list[int]]
    rejected_ids: list[list[int]]
    rejected_labels: list[list[int]]
    pad_id: int
    seq_len: int
    truncate: str = "right"
    pairs_read: int = 0
    truncated: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    identical: int = 0
    origins: list[str | None] = field(default_factory=list)
    reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.chosen_ids)

    @property
    def dropped(self) -> int:
        """Pairs left out, for every reason."""
        return sum(self.drops.values())

    def lengths(self) -> list[int]:
        """Each pair's longer sequence, in tokens (what a padded batch of it is padded to)."""
        return [max(len(c), len(r)) for c, r in zip(self.chosen_ids, self.rejected_ids, strict=True)]

    def collate(self, indices: Sequence[int], *, pack_to: int = 0, packing: bool = False) -> dict[str, Any]:
        """One concatenated batch of the given pairs: chosen rows first, then rejected rows.

        Args:
            indices: Pair indices, in batch order.
            pack_to: 0 for a padded batch; else the row length the step packs the batch's
                sequences into (after sharding it over ranks; see `pack_sequences`).
            packing: Pack into rows as long as the batch's longest sequence (`pack_to` = the
                padded width): the fewest padded tokens without making any row's attention
                longer than the padded batch's (what `iterate_pair_batches` asks for).

        Returns:
            `input_ids`, `attention_mask`, `labels` (`(2P, longest)` long tensors, right-padded
            with `pad_id`, 0 and -100), `ref_logps` (`(2P,)` float64, the chosen then the rejected
            reference log-probabilities) when `reference` is set, and `pack_to`.
        """
        rows = [self.chosen_ids[i] for i in indices] + [self.rejected_ids[i] for i in indices]
        labels = [self.chosen_labels[i] for i in indices] + [self.rejected_labels[i] for i in indices]
        if packing:
            pack_to = max(len(r) for r in rows)
        batch: dict[str, Any] = {
            "input_ids": right_pad(rows, self.pad_id),
            "attention_mask": right_pad([[1] * len(r) for r in rows], 0),
            "labels": right_pad(labels, IGNORE_INDEX),
            "pack_to": int(pack_to),
        }
        if self.reference is not None:
            picked = self.reference[torch.tensor(list(indices), dtype=torch.long)]
            batch["ref_logps"] = torch.cat([picked[:, 0], picked[:, 1]])
        return batch


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    seq_len: int,
    *,
    train_on_eos: bool = True,
    truncate: str = "right",
    source: str | None = None,
    warn: bool = True,
) -> PreferenceDataset:
    """Tokenise each pair's chosen and rejected sequence, cut them to `seq_len`, count what was lost.

    Args:
        pairs: From `load_pairs`.
        tokenizer: A transformers tokenizer (with a chat template for conversational pairs).
        seq_len: Most tokens of one sequence (prompt + answer).
        train_on_eos: Score the token that ends an answer (the end-of-turn token, the EOS appended
            to a string answer).
        truncate: `"right"` keeps a long sequence's start, `"left"` its end.
        source: The data's name, for messages.
        warn: Warn (one `warnings.warn` each) about truncated and identical pairs.

    Returns:
        The kept pairs, in order.

    Raises:
        ConfigError: `seq_len < 2` or an unknown `truncate`.
        DataError: no pairs, or no pair left (every one lost an answer to truncation), or a
            conversation the template cannot render and mask.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if truncate not in ("right", "left"):
        raise ConfigError(f"truncate must be 'right' (keep the start) or 'left' (keep the end); got {truncate!r}")
    name = source or "the data"
    if not pairs:
        raise DataError(f"{name}: no preference pairs to tokenise")
    encoded = _encode([p.chosen for p in pairs] + [p.rejected for p in pairs], tokenizer, train_on_eos)
    chosen, rejected = encoded[: len(pairs)], encoded[len(pairs) :]
    dataset = PreferenceDataset(
        [], [], [], [], pad_id=padding_id(tokenizer), seq_len=seq_len, truncate=truncate, pairs_read=len(pairs)
    )
    for pair, c, r in zip(pairs, chosen, rejected, strict=True):
        (c_ids, c_labels), c_cut = _cut(*c, seq_len, truncate)
        (r_ids, r_labels), r_cut = _cut(*r, seq_len, truncate)
        if c_cut or r_cut:
            dataset.truncated += 1
        if all(t == IGNORE_INDEX for t in c_labels) or all(t == IGNORE_INDEX for t in r_labels):
            if not (c_cut or r_cut):
                raise DataError(
                    f"{pair.origin or name}: an answer has no token to score (an empty answer, --no-train-on-eos)"
                )
            dataset.drops["truncated"] = dataset.drops.get("truncated", 0) + 1
            continue
        if c_ids == r_ids and c_labels == r_labels:
            dataset.identical += 1
        dataset.chosen_ids.append(c_ids)
        dataset.chosen_labels.append(c_labels)
        dataset.rejected_ids.append(r_ids)
        dataset.rejected_labels.append(r_labels)
        dataset.origins.append(pair.origin)
    if not dataset.chosen_ids:
        raise DataError(
            f"{name}: no preference pair is left: all {dataset.dropped} {_drop_reason('truncated', seq_len)}; "
            "raise --seq-len or use --truncate left"
        )
    if warn and dataset.truncated:
        warnings.warn(
            f"{dataset.truncated} of {len(pairs)} preference pairs have a sequence longer than seq_len={seq_len} "
            f"tokens, cut at the {'end' if truncate == 'right' else 'start'}; {dataset.dropped} lost an answer "
            "and were dropped",
            stacklevel=2,
        )
    if warn and dataset.identical:
        warnings.warn(
            f"{dataset.identical} of {len(pairs)} preference pairs have the same chosen and rejected answer: they "
            "carry no preference (kept; they count as not ranked right)",
            stacklevel=2,
        )
    return dataset


def _encode(examples: list[Example], tokenizer: Any, train_on_eos: bool) -> list[tuple[list[int], list[int]]]:
    """Ids and labels of each sequence: conversations through the chat template, strings as SFT's
    prompt/completion."""
    chats = [i for i, ex in enumerate(examples) if ex.messages is not None]
    plain = [i for i, ex in enumerate(examples) if ex.messages is None]
    out: list[tuple[list[int], list[int]]] = [([], [])] * len(examples)
    done = encode_conversations(
        [examples[i] for i in chats], tokenizer, train_on="assistant", train_on_eos=train_on_eos
    )
    for i, item in zip(chats, done, strict=True):
        out[i] = item
    done = _encode_plain([examples[i] for i in plain], tokenizer, "assistant", train_on_eos)
    for i, item in zip(plain, done, strict=True):
        out[i] = item
    return out


def _cut(ids: list[int], labels: list[int], seq_len: int, truncate: str) -> tuple[tuple[list[int], list[int]], bool]:
    if len(ids) <= seq_len:
        return (ids, labels), False
    if truncate == "right":
        return (ids[:seq_len], labels[:seq_len]), True
    return (ids[-seq_len:], labels[-seq_len:]), True


def _drop_reason(reason: str, seq_len: int) -> str:
    return _DROPS.get(reason, reason).format(seq_len=seq_len)


def preference_lines(dataset: PreferenceDataset, *, name: str = "data") -> list[str]:
    """The dataset's numbers as lines: pairs read and kept, tokens and scored tokens, truncated,
    dropped and identical pairs, and the histogram of sequence lengths (what `lorakit train` prints)."""
    seqs = dataset.chosen_ids + dataset.rejected_ids
    labels = dataset.chosen_labels + dataset.rejected_labels
    tokens = sum(len(s) for s in seqs)
    scored = sum(sum(1 for t in row if t != IGNORE_INDEX) for row in labels)
    share = 100 * scored / tokens if tokens else 0.0
    lines = [
        f"{name}: {_count(dataset.pairs_read, 'preference pair')} -> {len(dataset):,} kept; {len(seqs):,} sequences, "
        f"{tokens:,} tokens, {scored:,} scored ({share:.1f}%, the answers)"
    ]
    if dataset.truncated:
        kept = "start" if dataset.truncate == "right" else "end"
        lines.append(
            f"  truncated: {_count(dataset.truncated, 'pair')} with a sequence longer than seq_len={dataset.seq_len} "
            f"(each keeps its {kept}; --truncate)"
        )
    for reason, count in dataset.drops.items():
        lines.append(f"  dropped: {_count(count, 'pair')} {_drop_reason(reason, dataset.seq_len)} (never trained on)")
    if dataset.identical:
        lines.append(
            f"  identical: {_count(dataset.identical, 'pair')} with the same chosen and rejected answer (no preference)"
        )
    lines.append("  sequence lengths (tokens):")
    lines += ["    " + line for line in length_histogram([len(s) for s in seqs], dataset.seq_len)]
    return lines


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def iterate_pair_batches(
    dataset: PreferenceDataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start: int = 0,
    shuffle: bool = True,
    packing: bool = False,
    group_by_length: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield one epoch's batches of `batch_size` pairs (the last may be smaller) in a fixed order.

    The order depends only on `(seed, epoch)`, as SFT's (`lorakit.data.iterate_batches`), so a
    resumed run reads the same batches; `group_by_length` orders pairs by their longer sequence as
    transformers' `LengthGroupedSampler` does.

    Args:
        dataset: From `tokenize_pairs`.
        batch_size: Pairs per batch.
        seed: Shuffle seed.
        epoch: Epoch number.
        start: Skip the first `start` batches.
        shuffle: False keeps dataset order.
        packing: Batches whose sequences the step packs into rows as long as the batch's longest
            sequence (`PreferenceDataset.collate`; rows of `seq_len` save as much padding but their
            longer attention costs it back on CPU: docs/results.md).
        group_by_length: Pairs of similar length share batches (not with `packing`).

    Raises:
        ConfigError: `batch_size < 1`, `start` out of range, `packing` with `group_by_length`.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if packing and group_by_length:
        raise ConfigError("group_by_length orders unpacked rows; packing already leaves out the padding")
    total = math.ceil(len(dataset) / batch_size)
    if not 0 <= start <= total:
        raise ConfigError(f"start must be between 0 and {total} (batches per epoch), got {start}")
    if group_by_length and shuffle:
        order = length_grouped_order(dataset.lengths(), batch_size, seed=seed, epoch=epoch)
    else:
        order = list(range(len(dataset)))
        if shuffle:
            random.Random(f"lorakit-batches:{seed}:{epoch}").shuffle(order)
    for index in range(start, total):
        yield dataset.collate(order[index * batch_size : (index + 1) * batch_size], packing=packing)


def pack_sequences(batch: Mapping[str, torch.Tensor], pack_to: int) -> dict[str, torch.Tensor]:
    """The padded rows of `batch` laid end to end in rows of at most `pack_to` tokens.

    Each row's tokens (its `attention_mask` ones) are packed whole by best-fit decreasing (in row
    order for ties), as `lorakit.data.packing` packs SFT examples, with `position_ids` restarting at
    each sequence and -100 as each sequence's first label (nothing is predicted across a boundary;
    an unpacked row has no target there either).

    Args:
        batch: `input_ids`, `attention_mask`, `labels`, each `(S, T)`; `pad_to` aside.
        pack_to: The longest packed row.

    Returns:
        `input_ids`, `attention_mask`, `position_ids`, `labels` and `sequence_index` (the row of
        `batch` each token came from, -1 on padding), each `(rows, longest)`.
    """
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1).tolist()
    rows = best_fit_decreasing(lengths, max(pack_to, max(lengths)), range(len(lengths)))
    ids, positions, labels, index = [], [], [], []
    for row in rows:
        r_ids: list[int] = []
        r_labels: list[int] = []
        r_positions: list[int] = []
        r_index: list[int] = []
        for s in row:
            keep = mask[s]
            r_ids += batch["input_ids"][s][keep].tolist()
            r_labels += [IGNORE_INDEX, *batch["labels"][s][keep].tolist()[1:]]
            r_positions += range(int(lengths[s]))
            r_index += [s] * int(lengths[s])
        ids.append(r_ids)
        labels.append(r_labels)
        positions.append(r_positions)
        index.append(r_index)
    longest = max(len(r) for r in ids)
    for r_positions in positions:  # the padding goes on counting after the row's last sequence (never read)
        begin = r_positions[-1] + 1
        r_positions += range(begin, begin + longest - len(r_positions))
    return {
        "input_ids": right_pad(ids, 0),  # padding is never read (see lorakit.train.packed)
        "attention_mask": right_pad([[1] * len(r) for r in ids], 0),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "labels": right_pad(labels, IGNORE_INDEX),
        "sequence_index": right_pad(index, -1),
    }
