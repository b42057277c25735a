"""`lorakit merge`: write base + adapter as one plain transformers model directory. Flags: `ModelSource`, `--out`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorakit.atomic import check_target
from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec
from lorakit.export import export_merged
from lorakit.models import ModelSource, load_source


@dataclass
class MergeOutput:
    """Where the merged model goes.

    Args:
        out: directory for the merged model (must not exist, or be empty); required.
    """

    out: str | None = None


def _run(source: ModelSource, output: MergeOutput, echo: Callable[[str], None]) -> Path:
    check_target(output.out, directory=True, empty=True)  # before the model loads
    model, tokenizer, _ = load_source(source)
    out = export_merged(model, tokenizer, output.out)
    echo(f"merged model written to {out}")
    return out


# Every command declares itself in this one shape (lorakit.cli.command.Command).
COMMAND = Command(
    name="merge",
    summary="Merge an adapter into its base model and write a plain transformers model directory.",
    specs=(FlagSpec(ModelSource, "model and adapter"), FlagSpec(MergeOutput, "output", aliases={"out": ("-o",)})),
    run=_run,
    positional="adapter",
    requires=("adapter", "out"),
)
