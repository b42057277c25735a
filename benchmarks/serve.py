"""Serving many adapters at once: `lorakit serve` under N concurrent clients, K adapters.

Question: what does serving K different adapters in one batch cost against serving one, and
against a server that switches the active adapter between batches (PEFT's `set_adapter` way, the
baseline S-LoRA compares to)?

Each row starts a fresh `lorakit serve` process on the packaged SmolLM2-135M with K random q,v
r=8 adapters, then N asyncio clients (the `openai` package's async client, streaming) send
`--requests` completions, request i on adapter i mod K, prompts from the bundled E2E dev sample,
`--max-tokens` tokens each (`ignore_eos`, so every row generates the same number of tokens).
Rows:

- `base`: the same load on the base model with no adapter loaded — the ceiling;
- `mixed K=1/4/16`: lorakit's engine, rows of different adapters in one batch;
- `switch K=16`: `--batching per_adapter` — one adapter's requests per batch, the others wait.

Reported per row (median over `--rounds`, rows interleaved per round): generated tokens/s over the
wall time of the load, time to first token and request latency p50/p99, failed requests. Goals
(issue 15): mixed K=16 ≥ 0.85× mixed K=1 throughput and ≥ 3× switch K=16; no failed request.

    python benchmarks/serve.py                       # N=16 clients, 64 requests, 32 tokens
    python benchmarks/serve.py --quick               # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report

import lorakit
from lorakit.models import load_model

LORAKIT = Path(sys.executable).with_name("lorakit")
E2E_SAMPLE = Path(lorakit.__file__).resolve().parent / "data" / "bundled"


def make_adapters(root: Path, k: int) -> dict[str, Path]:
    """K q,v r=8 adapters with random non-zero B, saved as PEFT files."""
    model, _, _ = load_model(None)
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    out = {}
    for i in range(k):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("lora_A", "lora_B")):
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if name.endswith("lora_B") else 0.1))
        out[f"a{i}"] = lorakit.save_adapter(model, root / f"a{i}")
    return out


def prompts(n: int) -> list[str]:
    """The first n distinct E2E prompts of the bundled dev sample (`name : X | area : Y ||`)."""
    with (E2E_SAMPLE / "e2e_dev_sample.jsonl").open(encoding="utf-8") as handle:
        rows = list(dict.fromkeys(json.loads(line)["prompt"] for line in handle if line.strip()))
    return [rows[i % len(rows)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    args: argparse.Namespace, adapters: dict[str, Path], batching: str, log: Path
) -> tuple[subprocess.Popen, str]:
    flags = [
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        str(args.requests),
        "--max-adapters",
        str(max(1, len(adapters))),
        "--batching",
        batching,
        "--threads",
        str(args.threads),
    ]
    return launch(flags + [f"--adapter={n}={p}" for n, p in adapters.items()], log)


def launch(flags: list[str], log: Path, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """Start `lorakit serve FLAGS` on a free port; return the process and its URL once /health answers."""
    port = free_port()
    cmd = [str(LORAKIT), "serve", "--port", str(port), "--log-level", "warning", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("server did not start")


async def load(url: str, models: list[str], texts: list[str], args: argparse.Namespace) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    ttft: list[float] = []
    latency: list[float] = []
    tokens = 0
    failed = 0

    async def worker() -> None:
        nonlocal tokens, failed
        while not queue.empty():
            i = queue.get_nowait()
            start = time.perf_counter()
            first = None
            try:
                stream = await client.completions.create(
                    model=models[i % len(models)],
                    prompt=texts[i],
                    max_tokens=args.max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter()
                    if chunk.usage is not None:
                        tokens += chunk.usage.completion_tokens
            except Exception as err:  # counted, and the first few shown
                failed += 1
                if failed <= 3:
                    print(f"  request {i} failed: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            end = time.perf_counter()
            ttft.append((first or end) - start)
            latency.append(end - start)

    wall = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    wall = time.perf_counter() - wall
    await client.close()

    def pct(xs: list[float], q: float) -> float | None:
        return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else None)

    return {
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "failed": failed,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "latency_p50": pct(latency, 50),
        "latency_p99": pct(latency, 99),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (N)")
    p.add_argument("--requests", type=int, default=64, help="requests per row")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    p.add_argument("--adapters", default="1,4,16", help="the K values of the mixed rows")
    p.add_argument("--switch", type=int, default=16, help="K of the switching-baseline row (0: none)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; rows interleaved in each, median reported")
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 clients, 8 requests, 8 tokens, 1 round")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens, args.rounds, args.adapters, args.switch = 4, 8, 8, 1, "1,4", 4
    ks = [int(k) for k in args.adapters.split(",") if k]
    rows = [("base", 0, "mixed"), *((f"mixed K={k}", k, "mixed") for k in ks)]
    if args.switch:
        rows.append((f"switch K={args.switch}", args.switch, "per_adapter"))
    texts = prompts(args.requests)
    results: dict[str, list[dict]] = {name: [] for name, _, _ in rows}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), max(k for _, k, _ in rows))
        names = list(adapters)
        for r in range(args.rounds):
            order = rows[r % len(rows) :] + rows[: r % len(rows)]
            for name, k, batching in order:
                chosen = {n: adapters[n] for n in names[:k]}
                process, url = start(args, chosen, batching, Path(tmp) / "server.log")
                try:
                    models = list(chosen) or ["smollm2-135m"]
                    res = asyncio.run(load(url, models, texts, args))
                finally:
                    process.terminate()
                    process.wait(30)
                results[name].append(res)
                print(f"round {r + 1} {name}: {res['tokens_per_s']:.1f} tok/s, failed {res['failed']}", file=sys.stderr)

    def med(name: str, key: str) -> float | None:
        xs = [x[key] for x in results[name] if x[key] is not None]
        return statistics.median(xs) if xs else None

    one = f"mixed K={ks[0]}" if ks else "base"
    table = []
    for name, _, _ in rows:
        tps = med(name, "tokens_per_s")
        table.append(
            [
                name,
                f"{tps:.1f}",
                _report.fmt_ratio(_report.ratio(tps, med("base", "tokens_per_s"))),
                _report.fmt_ratio(_report.ratio(tps, med(one, "tokens_per_s"))),
                f"{med(name, 'ttft_p50'):.2f} / {med(name, 'ttft_p99'):.2f}",
                f"{med(name, 'latency_p50'):.2f} / {med(name, 'latency_p99'):.2f}",
                sum(x["failed"] for x in results[name]),
            ]
        )
    title = (
        f"lorakit serve, smollm2-135m, {args.clients} clients, {args.requests} requests × {args.max_tokens} "
        f"tokens, --max-batch {args.max_batch}, {args.threads} threads, median of {args.rounds} round(s)"
    )
    print(title + "\n")
    print(
        _report.markdown_table(
            ["row", "tokens/s", "vs base", f"vs {one}", "TTFT p50 / p99 s", "latency p50 / p99 s", "failed"], table
        )
    )
    mixed = med(f"mixed K={max(ks)}", "tokens_per_s") if ks else None
    if args.switch and mixed:
        print(
            f"\nmixed K={max(ks)} / switch K={args.switch}: "
            f"{_report.fmt_ratio(_report.ratio(mixed, med(f'switch K={args.switch}', 'tokens_per_s')))}"
        )
    _report.write_json(
        args.out,
        {
            "title": title,
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": _report.machine_info(args),
            "rows": results,
        },
    )


if __name__ == "__main__":
    main()
