"""How long does the README's first command take, and how long is the screen silent meanwhile?

Runs `lorakit train --config quickstart` as a user does (a real process, output piped here) with
the evaluation settings of each row, timestamps every chunk of output, and prints a table: the
whole run, its phases (model loaded, evaluation before, training, evaluation after) and the longest
silence. Rows run one after the other, in alternating order over the rounds, so drift hits each
alike; read the ratio column. Nothing else should run on the machine meanwhile.

    .venv/bin/python benchmarks/quickstart.py                        # default vs every eval row
    .venv/bin/python benchmarks/quickstart.py --baseline 0f852e1     # and that revision's quickstart
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LORAKIT = Path(sys.executable).with_name("lorakit")

ROWS = {
    "default": (),
    # Before issue 24: every eval row (387), at the training batch size (8).
    "all-rows": ("--eval-max-rows", "none", "--eval-batch-size", "8"),
}
# A line may follow a progress bar's last carriage return rather than a newline.
PHASES = {
    "model loaded": re.compile(r"(?:^|\r)model: ", re.M),
    "eval before done": re.compile(r"(?:^|\r)eval loss before", re.M),
    "training done": re.compile(r"(?:^|\r)eval loss after", re.M),
    "finished": re.compile(r"(?:^|\r)adapter: ", re.M),
}


def run_once(extra: tuple[str, ...], threads: int, src: Path | None = None) -> dict:
    """One quickstart run: wall time, phase times, longest gap between two chunks of output.
    `src`: run the lorakit of that source folder (a baseline revision) instead of the installed one."""
    with tempfile.TemporaryDirectory() as tmp:
        head = (
            [sys.executable, "-c", "import sys; from lorakit.cli import main; sys.exit(main())"]
            if src
            else [str(LORAKIT)]
        )
        argv = [*head, "train", "--config", "quickstart", "--threads", str(threads), "--out", tmp, *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if src:
            env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
        start = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        stamps, text, phases = [start], b"", {}
        while chunk := os.read(proc.stdout.fileno(), 65536):
            now = time.monotonic()
            stamps.append(now)
            text += chunk
            decoded = text.decode(errors="replace")
            for name, pattern in PHASES.items():
                if name not in phases and pattern.search(decoded):
                    phases[name] = now - start
        rc = proc.wait()
        end = time.monotonic()
        stamps.append(end)
        summary = json.loads((Path(tmp) / "summary.json").read_text()) if rc == 0 else {}
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "rc": rc,
        "seconds": end - start,
        "longest_silence": max(gaps),
        "phases": phases,
        "eval_loss_before": summary.get("eval_loss_before"),
        "eval_loss_after": summary.get("eval_loss_after"),
        "tail": "" if rc == 0 else text.decode(errors="replace")[-2000:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--baseline", default=None, help="also run the quickstart of this git revision")
    args = parser.parse_args()
    names = args.rows.split(",")
    sources: dict[str, Path | None] = dict.fromkeys(names)
    if args.baseline:
        from _baseline import export

        name = f"revision {args.baseline}"
        ROWS[name] = ()
        names.append(name)
        sources[name] = export(args.baseline)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            result = run_once(ROWS[name], args.threads, sources[name])
            print(f"round {r + 1} {name}: {result['seconds']:.0f} s (rc {result['rc']})", file=sys.stderr, flush=True)
            if result["rc"]:
                print(result["tail"], file=sys.stderr)
            results[name].append(result)

    def best(name: str, key: str) -> float:
        return min(x[key] for x in results[name])

    base = best(names[0], "seconds")
    head = (
        "| row | total s | vs first row | model loaded s | eval before done s | training done s | longest silence s |"
    )
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in names:
        fastest = min(results[name], key=lambda x: x["seconds"])
        p = fastest["phases"]
        cells = [f"{p[k]:.0f}" if k in p else "–" for k in ("model loaded", "eval before done", "training done")]
        lines.append(
            f"| {name} | {fastest['seconds']:.0f} | {fastest['seconds'] / base:.2f}× | {' | '.join(cells)} | "
            f"{best(name, 'longest_silence'):.1f} |"
        )
    print("\n".join(lines))
    if args.out:
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": stamp, "argv": sys.argv, "results": results}, indent=1))


if __name__ == "__main__":
    main()
