"""The harness: every row of a benchmark in a fresh subprocess, the rows interleaved over repeats.

A script describes its rows (`_flags.Row`: a name, a label and parameters) and one function that
measures a row inside a child process. `main` does the rest:

- parent: for each repeat, run every row in a fresh `python <script> --child <row>` subprocess,
  the order rotated per repeat so that drift on the machine hits every row alike; collect the
  per-repeat medians, summarise (median over repeats, spread), print the script's report and
  write everything as JSON to `--out`.
- child: set threads and denormal flushing, measure (`_measure`), write one JSON result file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _flags import Row, resolve_sizes
from _measure import short_error
from _report import machine_info, write_json


def main(
    script: str,
    parser: argparse.ArgumentParser,
    rows_for: Callable[[argparse.Namespace], list[Row]],
    run_row: Callable[[argparse.Namespace, Row], dict[str, Any]],
    report: Callable[[argparse.Namespace, list[Row], dict[str, dict]], str],
) -> int:
    """Parse flags; in the parent run all rows and print the report, in a child measure one row.

    Args:
        script: `__file__` of the benchmark script (children re-run it).
        parser: from `make_parser`, with any script-specific flags added.
        rows_for: the rows for the parsed flags.
        run_row: measure one row in this (child) process; returns a `measure`-style dict.
        report: the markdown table (and notes) from the summaries.
    """
    argv = sys.argv[1:]
    args = resolve_sizes(parser.parse_args(argv))
    rows = rows_for(args)
    if args.list:
        for row in rows:
            print(f"{row.name:24s} {row.label}")
        return 0
    if args.child:
        setup_child(args)
        row = next(r for r in rows if r.name == args.child)
        try:
            result = run_row(args, row)
        except Exception as exc:
            traceback.print_exc()
            result = {"error": short_error(exc)}
        args.result_file.write_text(json.dumps(result, default=str))
        return 0
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {r.name for r in rows})
        if unknown:
            parser.error(f"--only: unknown row(s) {unknown}; rows: {[r.name for r in rows]}")
        rows = [r for r in rows if r.name in wanted]
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    summaries = run_parent(Path(script).resolve(), argv, rows, args)
    table = report(args, rows, summaries)
    total = time.perf_counter() - t0
    print(table)
    print(f"\n({total:.0f} s in all)")
    settings = {
        k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("child", "result_file", "list")
    }
    write_json(
        args.out,
        {
            "script": Path(script).name,
            "command": " ".join([Path(sys.executable).name, script, *argv]),
            "date": started.isoformat(timespec="seconds"),
            "wall_s": total,
            "settings": settings,
            "machine": machine_info(args),
            "rows": [{"name": r.name, "label": r.label, "params": r.params, **summaries[r.name]} for r in rows],
            "table": table,
        },
    )
    return 0


def setup_child(args: argparse.Namespace) -> None:
    """Threads, denormal flushing, seeds and quiet logging for a measuring child."""
    import torch

    torch.set_num_threads(args.threads)
    # Without it CPU steps slow down several-fold once values get tiny (denormal floats).
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def run_parent(script: Path, argv: Sequence[str], rows: list[Row], args: argparse.Namespace) -> dict[str, dict]:
    """Run every row `args.repeats` times, each in a fresh child, rotating the order per repeat."""
    child_argv = _strip_parent_flags(argv)
    raw: dict[str, list[dict[str, Any]]] = {row.name: [] for row in rows}
    for rep in range(args.repeats):
        shift = rep % len(rows)
        order = rows[shift:] + rows[:shift]
        for row in order:
            result = _run_child(script, child_argv, row, args)
            raw[row.name].append(result)
            if "error" in result:
                note = result["error"]
            else:
                meds = ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in result["timings"].items() if v)
                note = f"{meds}, peak {result['peak_mib']:.0f} MiB"
            print(
                f"[repeat {rep + 1}/{args.repeats}] {row.name}: {note} (child {result['child_wall_s']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    return {row.name: {"raw": raw[row.name], **summarise(raw[row.name])} for row in rows}


def _run_child(script: Path, argv: Sequence[str], row: Row, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *argv, "--child", row.name, "--result-file", str(result_file)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, env=_child_env(args, tmp, row), capture_output=True, text=True, timeout=args.child_timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"child timed out after {args.child_timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if result_file.exists():
            result = json.loads(result_file.read_text())
        else:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
            result = {"error": f"child exited with {proc.returncode}: {tail[-1] if tail else 'no output'}"}
            print(f"--- {row.name} stderr (tail) ---\n" + "\n".join(tail), file=sys.stderr)
        result["child_wall_s"] = wall
        return result


def _child_env(args: argparse.Namespace, tmp: str, row: Row) -> dict[str, str]:
    env = dict(os.environ)
    if getattr(args, "cold_compile", False):
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
    threads = str(args.threads)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        OPENBLAS_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    # Run against the working tree even if lorakit is installed elsewhere, or against another
    # revision's src for a baseline row (`add_baseline_flag`).
    src = Path(row.params.get("lorakit_src") or Path(__file__).resolve().parent.parent / "src")
    if src.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH", "")) if p)
    return env


def _strip_parent_flags(argv: Sequence[str]) -> list[str]:
    # Children get the parent's flags (sizes, device, dtype...), minus --out/--only.
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--out", "--only"):
            skip = True
            continue
        if a.startswith(("--out=", "--only=")):
            continue
        out.append(a)
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of each child's median per timing series (ms), spread, peak memory."""
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    summary: dict[str, Any] = {"ok_repeats": len(ok)}
    if errors:
        summary["error"] = errors[0]
    if not ok:
        return summary
    series: dict[str, dict[str, Any]] = {}
    for key in ok[0]["timings"]:
        per_repeat = [statistics.median(r["timings"][key]) * 1e3 for r in ok if r["timings"].get(key)]
        if not per_repeat:
            continue
        med = statistics.median(per_repeat)
        series[key] = {
            "median_ms": med,
            "per_repeat_ms": per_repeat,
            "spread": (max(per_repeat) - min(per_repeat)) / med if med else 0.0,
        }
    summary["ms"] = {k: v["median_ms"] for k, v in series.items()}
    summary["series"] = series
    summary["peak_mib"] = statistics.median(r["peak_mib"] for r in ok)
    summary["process_peak_mib"] = statistics.median(r["process_peak_mib"] for r in ok)
    extra_keys = {k for r in ok for k in r} - {"timings", "peak_mib", "process_peak_mib", "child_wall_s"}
    for k in sorted(extra_keys):
        values = [r[k] for r in ok if k in r]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        summary[k] = statistics.median(values) if numeric else values[-1]
    return summary
