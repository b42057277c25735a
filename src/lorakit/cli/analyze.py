"""`lorakit analyze`: the spectrum, subspace similarity and amplification of an adapter's ΔW. Flags: `Analysis`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorakit.analysis.report import Analysis, analyze, summary_table, write_analysis
from lorakit.atomic import check_target
from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec


def _run(options: Analysis, echo: Callable[[str], None]) -> dict[str, Any]:
    if options.out:
        check_target(options.out, directory=True)  # before the adapters are read and the base loads
    result = analyze(options.adapter, compare=options.compare, base=options.base, energy=options.energy)
    echo(summary_table(result))
    pattern = result["suggested_rank_pattern"]
    ranks = sorted(set(pattern.values()))
    echo(f"\nsuggested rank_pattern at {options.energy:.0%} of ΔW's energy: ranks {ranks} over {len(pattern)} modules")
    if options.out:
        for path in write_analysis(result, options.out):
            echo(f"wrote {path}")
    return result


# Every command declares itself in this one shape (lorakit.cli.command.Command).
COMMAND = Command(
    name="analyze",
    summary="Singular values, effective rank, subspace similarity and amplification of an adapter's ΔW.",
    specs=(FlagSpec(Analysis, "analysis", aliases={"out": ("-o",)}),),
    run=_run,
    positional="adapter",
    requires=("adapter",),
)
