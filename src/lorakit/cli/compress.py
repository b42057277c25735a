"""`lorakit compress`: truncate an adapter's ΔW per module by SVD into a smaller PEFT adapter. Flags: `Compression`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorakit.analysis.compress import Compression, compress
from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec


def _run(options: Compression, echo: Callable[[str], None]) -> dict[str, Any]:
    result = compress(options.adapter, options.out, energy=options.energy, rank=options.rank)
    (p0, p1), (b0, b1) = result["parameters"], result["bytes"]
    kept = [m["kept"] for m in result["modules"].values()]
    worst = max(m["relative_error"] for m in result["modules"].values())
    echo(
        f"compressed adapter written to {result['out']}: ranks {min(kept)}-{max(kept)} over {len(kept)} modules, "
        f"{p1:,} of {p0:,} parameters ({p1 / p0:.1%}), {b1 / 1e6:.2f} MB of {b0 / 1e6:.2f} MB; "
        f"largest relative ΔW error {worst:.3g}"
    )
    return result


# Every command declares itself in this one shape (lorakit.cli.command.Command).
COMMAND = Command(
    name="compress",
    summary="Truncate each module's ΔW to a lower rank by SVD (--energy or --rank) and save a PEFT adapter.",
    specs=(FlagSpec(Compression, "compression", aliases={"out": ("-o",)}),),
    run=_run,
    positional="adapter",
    requires=("adapter", "out"),
)
