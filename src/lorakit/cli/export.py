"""`lorakit export`: an adapter as a llama.cpp LoRA GGUF, or the merged model as one GGUF file.

Flags: `ModelSource` (`--adapter`, `--model`) and `GgufExport` (`--format`, `--out`, `--outtype`,
`--base-gguf`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec
from lorakit.errors import ConfigError
from lorakit.export.gguf import GgufExport, describe_gguf, export_gguf
from lorakit.models import ModelSource


def _run(source: ModelSource, output: GgufExport, echo: Callable[[str], None]) -> Path:
    if source.quantize not in ("auto", "none"):
        raise ConfigError(f"--quantize {source.quantize}: export reads the base in full precision; drop --quantize")
    # export_gguf checks the request, --out, --base-gguf and the adapter's files before it loads the model.
    out = export_gguf(
        source.adapter,
        output.out,
        format=output.format,
        outtype=output.outtype,
        base_gguf=output.base_gguf,
        model=source.model,
    )
    what = "llama.cpp LoRA adapter" if output.format == "gguf-lora" else "merged model"
    echo(f"{what} written to {out} ({out.stat().st_size / 2**20:.2f} MiB; {describe_gguf(out)})")
    return out


# Every command declares itself in this one shape (lorakit.cli.command.Command).
COMMAND = Command(
    name="export",
    summary="Write an adapter as a llama.cpp LoRA GGUF (--format gguf-lora) or the merged model as one GGUF file.",
    specs=(FlagSpec(ModelSource, "model and adapter"), FlagSpec(GgufExport, "output", aliases={"out": ("-o",)})),
    run=_run,
    positional="adapter",
    requires=("adapter", "out"),
)
