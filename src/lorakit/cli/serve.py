"""`lorakit serve`: an OpenAI-compatible server for one base model and many adapters.

Flags: `ModelSource` (model, quantize), `ServeConfig`.
"""

from __future__ import annotations

from collections.abc import Callable

from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec
from lorakit.models import ModelSource
from lorakit.serve.server import ServeConfig, serve


def _run(source: ModelSource, config: ServeConfig, echo: Callable[[str], None]) -> None:
    serve(config, source, echo=echo)


COMMAND = Command(
    name="serve",
    summary="Serve the base model and LoRA adapters over an OpenAI-compatible HTTP API.",
    specs=(
        FlagSpec(ModelSource, "model", exclude=frozenset({"adapter", "task", "num_labels"})),
        FlagSpec(ServeConfig, "server"),
    ),
    run=_run,
)
