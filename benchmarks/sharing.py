"""Sharing the machine (issue 28): N concurrent `lorakit train` processes, and training beside a busy server.

Each process is the real `lorakit train` (packaged SmolLM2, E2E sample, q,v r=8, batch 2×64, no
evaluation during the run, a one-row evaluation before it, no samples or checkpoints). A process's
throughput is the median of its step rates (`metrics.jsonl`'s per-step `seconds`) over the steps
after the first two; the N processes start together. OpenMP wait policies side by side:
`DEFAULT` (nothing set: lorakit's default, idle threads spin 1,000 times then sleep,
`GOMP_SPINCOUNT=1000`, `lorakit.threads`), `ACTIVE` (they spin), `PASSIVE` (they sleep at once; what
`LORAKIT_SHARED_CPU=1` sets) and `SPIN<N>` (`GOMP_SPINCOUNT=N`). Goal: each of N concurrent processes keeps
≥ 0.8/N of its alone throughput.

`--beside-server` adds a row: one `lorakit serve` on the same model under a closed loop of
completion requests (one client, 16 tokens each) while one `lorakit train` runs, against each
alone.

    .venv/bin/python benchmarks/sharing.py                   # 1, 2, 4 processes, both policies
    .venv/bin/python benchmarks/sharing.py --quick           # 1 and 2 processes, few steps
    .venv/bin/python benchmarks/sharing.py --beside-server   # and the server row

Run it on an otherwise quiet machine: the point is how lorakit processes share it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import _report

REPO = Path(__file__).resolve().parents[1]
LORAKIT = str(REPO / ".venv" / "bin" / "lorakit")
POLICIES = ("DEFAULT", "ACTIVE", "PASSIVE")
LABELS = {
    "DEFAULT": "lorakit default (GOMP_SPINCOUNT=1000)",
    "ACTIVE": "ACTIVE (spinning)",
    "PASSIVE": "PASSIVE (LORAKIT_SHARED_CPU=1)",
}


def _env(policy: str) -> dict[str, str]:
    """`ACTIVE` / `PASSIVE`: OMP_WAIT_POLICY; `DEFAULT`: neither variable set, so lorakit sets its
    default; `SPIN<N>`: no policy, GOMP_SPINCOUNT=N."""
    drop = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LORAKIT_SHARED_CPU")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if policy.startswith("SPIN"):
        env["GOMP_SPINCOUNT"] = policy.removeprefix("SPIN")
    elif policy != "DEFAULT":
        env["OMP_WAIT_POLICY"] = policy
    return env


def _train_argv(out: Path, steps: int, threads: int | None) -> list[str]:
    argv = [LORAKIT, "train", "--data", "e2e", "--target", "q_proj,v_proj", "-r", "8", "--batch-size", "2"]
    argv += ["--seq-len", "64", "--max-steps", str(steps), "--eval-every", "none", "--eval-max-rows", "1"]
    argv += ["--samples", "0", "--save-every", "none", "--no-progress", "--out", str(out)]
    return argv + (["--threads", str(threads)] if threads else [])


def _rates(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [1.0 / r["seconds"] for r in lines if "seconds" in r and r["step"] > 2]


def concurrent(n: int, policy: str, steps: int, threads: int | None, work: Path) -> dict[str, Any]:
    """N trains started together: each one's median steps/s."""
    outs = [work / f"{policy}-{n}-{i}" for i in range(n)]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            _train_argv(out, steps, threads),
            env=_env(policy),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    errors = [p.communicate()[1] for p in procs]
    failed = [e.strip().splitlines()[-1:] for p, e in zip(procs, errors, strict=True) if p.returncode]
    if failed:
        return {"error": failed}
    rates = [statistics.median(_rates(out)) for out in outs]
    return {"rates": rates, "median": statistics.median(rates), "wall_s": time.perf_counter() - t0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def beside_server(policy: str, steps: int, threads: int | None, work: Path, seconds: float) -> dict[str, Any]:
    """A server's requests/s alone, a train's steps/s alone, then both together."""
    port = _free_port()
    server = subprocess.Popen(
        [LORAKIT, "serve", "--port", str(port), "--log-level", "warning"]
        + (["--threads", str(threads)] if threads else []),
        env=_env(policy),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        body = json.dumps(
            {"model": "smollm2-135m", "prompt": "The weather today is", "max_tokens": 16, "temperature": 0}
        )

        def one() -> None:
            req = urllib.request.Request(url + "/v1/completions", body.encode(), {"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=120).read()

        def load(stop: threading.Event, done: list[float]) -> None:
            while not stop.is_set():
                one()
                done.append(time.perf_counter())

        def requests_per_s(during: float) -> float:
            stop, done = threading.Event(), []
            thread = threading.Thread(target=load, args=(stop, done))
            start = time.perf_counter()
            thread.start()
            time.sleep(during)
            stop.set()
            thread.join()
            return sum(1 for t in done if t <= start + during) / during

        one()  # warm up
        alone_server = requests_per_s(seconds)
        alone_train = concurrent(1, policy, steps, threads, work)
        stop, done = threading.Event(), []
        thread = threading.Thread(target=load, args=(stop, done))
        start = time.perf_counter()
        thread.start()
        together_train = concurrent(1, policy, steps, threads, work)
        elapsed = time.perf_counter() - start
        stop.set()
        thread.join()
        together_server = len(done) / elapsed
        return {
            "server_alone_rps": alone_server,
            "server_beside_rps": together_server,
            "train_alone": alone_train.get("median"),
            "train_beside": together_train.get("median"),
        }
    finally:
        server.terminate()
        server.wait(timeout=60)


def report(results: dict[str, Any]) -> str:
    rows = []
    for policy in dict.fromkeys(key.split("/")[0] for key in results):
        alone = results.get(f"{policy}/1", {}).get("median")
        for key, value in results.items():
            if not key.startswith(policy + "/") or "median" not in value:
                continue
            n = int(key.split("/")[1])
            share = value["median"] / alone if alone else float("nan")
            rows.append(
                [
                    LABELS.get(policy, f"GOMP_SPINCOUNT={policy.removeprefix('SPIN')}"),
                    str(n),
                    f"{value['median']:.2f}",
                    f"{min(value['rates']):.2f}–{max(value['rates']):.2f}",
                    f"{share:.2f}",
                    f"{0.8 / n:.2f}",
                    "met" if share >= 0.8 / n else "missed",
                ]
            )
    lines = [
        _report.markdown_table(
            ["OpenMP wait policy", "processes", "steps/s each (median)", "range", "vs alone", "goal ≥ 0.8/N", ""],
            rows,
        )
    ]
    for policy in dict.fromkeys(key.split("/")[0] for key in results):
        side = results.get(f"{policy}/server")
        if side and "train_alone" in side:
            lines.append(
                f"\n{policy}: beside a busy server, train {side['train_beside']:.2f} steps/s "
                f"(alone {side['train_alone']:.2f}); server {side['server_beside_rps']:.2f} requests/s "
                f"(alone {side['server_alone_rps']:.2f})"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", default="1,2,4", help="comma-separated process counts (default 1,2,4)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, help="--threads for every process (default: torch's)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--beside-server", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 and 2 processes, 6 steps")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    counts = [1, 2] if args.quick else [int(x) for x in args.processes.split(",")]
    steps = 6 if args.quick else args.steps
    policies = [p.strip().upper() for p in args.policies.split(",") if p.strip()]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lorakit-sharing-") as tmp:
        work = Path(tmp)
        for policy in policies:
            for n in counts:
                print(f"[{policy}] {n} process(es) ...", flush=True)
                results[f"{policy}/{n}"] = concurrent(n, policy, steps, args.threads, work)
                print(json.dumps(results[f"{policy}/{n}"]), flush=True)
            if args.beside_server:
                print(f"[{policy}] beside a server ...", flush=True)
                results[f"{policy}/server"] = beside_server(policy, steps, args.threads, work, 20 if args.quick else 60)
                print(json.dumps(results[f"{policy}/server"]), flush=True)
    text = report(results)
    print("\n" + text)
    if args.out:
        _report.write_json(args.out, {"argv": sys.argv, "results": results, "table": text})


if __name__ == "__main__":
    main()
