"""What a benchmark prints and saves: numbers formatted for its markdown table, ratios, the settings
line, the machine it ran on, and the JSON written to `--out`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _flags import MODEL, Row
from _measure import short_error


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def fmt_spread(summary: dict[str, Any], *keys: str) -> str:
    """(max − min) / median of the per-repeat medians, worst of `keys` ("step" by default); "–" for one repeat."""
    series = [summary["series"][k] for k in keys or ("step",)]
    if max(len(x["per_repeat_ms"]) for x in series) < 2:
        return "–"
    return f"{max(x['spread'] for x in series) * 100:.0f}%"


def fmt_mib(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ms_of(summaries: dict[str, dict], name: str, series: str = "step") -> float | None:
    """Row `name`'s median time of `series` in ms, or None when it did not measure."""
    return summaries.get(name, {}).get("ms", {}).get(series)


def row_label(row: Row, summary: dict[str, Any], notes: list[str]) -> str:
    """The row's label; for compiled rows with compile time and graph breaks (reasons go to `notes`)."""
    if not row.params.get("compile") or "ms" not in summary:
        return row.label
    if summary.get("break_reasons"):
        notes.append(f"graph breaks of `{row.name}`: " + "; ".join(summary["break_reasons"]))
    return (
        f"{row.label} (first step {summary.get('first_step_s', 0):.0f} s, "
        f"{summary.get('graph_breaks', '?')} graph breaks)"
    )


def error_line(row: Row, summary: dict[str, Any], width: int) -> list[str]:
    """A table line for a row whose every repeat failed."""
    return [row.label, f"error: {summary.get('error', '?')}", *[""] * (width - 2)]


def table_lines(
    rows: Sequence[Row], summaries: dict[str, dict], width: int, line: Callable[[Row, dict[str, Any]], list[Any]]
) -> list[list[Any]]:
    """A table line per row: `line(row, summary)` where the row measured, else its error line."""
    return [
        line(row, summaries[row.name]) if "ms" in summaries[row.name] else error_line(row, summaries[row.name], width)
        for row in rows
    ]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (numbers right-aligned)."""
    align = ["---" if i == 0 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def describe_settings(args: argparse.Namespace, extra: str = "") -> str:
    layers = f"first {args.layers} layers" if args.layers is not None else "all layers"
    return (
        f"{getattr(args, 'model', None) or MODEL} ({layers}), batch {args.batch}×{args.seq}, {args.dtype}, "
        f"{args.device}, "
        f"{args.threads} threads, median of {args.steps} steps after {args.warmup} warm-up, "
        f"median over {args.repeats} repeat(s), each row in a fresh process{extra}"
    )


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """What ran the benchmark: CPU, versions, threads, device."""
    import importlib.metadata as md

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "peft", "lorakit", "torchao", "bitsandbytes"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }
    if args.device == "cuda":
        try:
            import torch

            info["gpu"] = torch.cuda.get_device_name(0)
        except Exception as exc:  # informational only
            info["gpu"] = f"unknown ({short_error(exc)})"
    return info


def report_in_process(
    args: argparse.Namespace, title: str, headers: Sequence[str], lines: Sequence[Sequence[Any]], rows: Any
) -> None:
    """Print an in-process benchmark's title and table; with `args.out`, also write them as JSON."""
    print(title + "\n")
    print(markdown_table(headers, lines))
    write_json(args.out, {"title": title, "args": vars(args), "machine": machine_info(args), "rows": rows})


def print_and_save(
    path: Path | None, title: str, headers: Sequence[str], lines: Sequence[Sequence[Any]], payload: dict[str, Any]
) -> None:
    """Print a benchmark's title and table; with `path`, also write `{"title": ..., **payload}` as JSON."""
    print(title + "\n")
    print(markdown_table(headers, lines))
    write_json(path, {"title": title, **payload})


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write a benchmark's results as JSON (atomically, `lorakit.atomic`), if a path is given."""
    if path is None:
        return
    from lorakit import atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, payload)
    print(f"results written to {path}", file=sys.stderr)
