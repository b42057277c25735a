"""`lorakit data preview`: a dataset as the model sees it. Flags: `TrainRun`'s data fields (the same
flags as `lorakit train`) and `Preview`.

`preview` is the command's action (its positional argument; the only one so far), so
`lorakit data preview --data FILE` and `lorakit data --data FILE` are the same.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec
from lorakit.data.preview import Preview, preview
from lorakit.models import load_tokenizer
from lorakit.train.run import TrainRun

_DATA_FIELDS = frozenset({"model", "data", "fields", "train_on", "train_on_eos", "seq_len", "truncate"})
"""The `TrainRun` fields that say what is read and how: the same flags as `lorakit train`'s."""


def _run(run: TrainRun, options: Preview, echo: Callable[[str], None]) -> list[str]:
    color = options.color == "always" or (options.color == "auto" and sys.stdout.isatty())
    lines = preview(
        run.data,
        load_tokenizer(run.model),
        options,
        seq_len=run.seq_len,
        fields=run.fields,
        train_on=run.train_on,
        train_on_eos=run.train_on_eos,
        truncate=run.truncate,
        color=color,
    )
    for line in lines:
        echo(line)
    return lines


COMMAND = Command(
    name="data",
    summary="Preview a dataset as the model sees it: the first examples with their trained tokens marked, "
    "then its numbers (examples, tokens, trained tokens, truncated and dropped examples, lengths).",
    specs=(
        FlagSpec(
            TrainRun,
            "data (as lorakit train reads it)",
            exclude=frozenset(f.name for f in dataclasses.fields(TrainRun)) - _DATA_FIELDS,
        ),
        FlagSpec(Preview, "preview", aliases={"examples": ("-n",)}),
    ),
    run=_run,
    positional="action",
)
