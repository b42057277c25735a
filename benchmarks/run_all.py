"""Run the four performance benchmarks one after another and collect their tables.

Every flag but --out-dir is passed on to each script (see `benchmarks/README.md`), e.g.

    .venv/bin/python benchmarks/run_all.py --quick                 # smoke run, a few minutes
    .venv/bin/python benchmarks/run_all.py --out-dir runs/bench    # full size, when the machine is quiet
    .venv/bin/python benchmarks/run_all.py --device cuda --dtype bf16 --out-dir runs/bench-gpu

Writes `<out-dir>/<script>.json` for each and `<out-dir>/summary.md` with every table, the
commands, the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("train_step", "inference", "mixed_batch", "merge_time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out-dir", type=Path, default=Path("runs/bench"), help="where the JSON and summary go (default runs/bench)"
    )
    parser.add_argument(
        "--scripts", default=",".join(SCRIPTS), help=f"comma-separated subset of {', '.join(SCRIPTS)} (default all)"
    )
    args, passthrough = parser.parse_known_args()
    scripts = [s.strip() for s in args.scripts.split(",") if s.strip()]
    unknown = [s for s in scripts if s not in SCRIPTS]
    if unknown:
        parser.error(f"unknown script(s) {unknown}; choose from {list(SCRIPTS)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    started = dt.datetime.now(dt.UTC)
    sections, failed = [], []
    machine: dict = {}
    for name in scripts:
        out = args.out_dir / f"{name}.json"
        cmd = [sys.executable, str(HERE / f"{name}.py"), *passthrough, "--out", str(out)]
        shown = " ".join(["python", f"benchmarks/{name}.py", *passthrough])
        print(f"\n## {name}\n\n$ {shown}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        wall = time.perf_counter() - t0
        if rc != 0 or not out.exists():
            failed.append(name)
            sections.append(f"## {name}\n\n`{shown}` failed (exit code {rc}).")
            continue
        result = json.loads(out.read_text())
        sections.append(f"## {name}\n\n```\n{shown}\n```\n\n{result['table']}\n\n({wall:.0f} s)")
        machine = result.get("machine") or machine

    cpu = machine.get("cpu") or platform.processor() or platform.machine()
    gpu = f", {machine['gpu']}" if machine.get("gpu") else ""
    header = f"# lorakit benchmarks\n\n{started.strftime('%Y-%m-%d %H:%M UTC')} on {cpu}{gpu}"
    versions = machine.get("versions")
    if versions:
        header += " — " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    summary = header + "\n\n" + "\n\n".join(sections) + "\n"
    (args.out_dir / "summary.md").write_text(summary)
    print(f"\nsummary written to {args.out_dir / 'summary.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
