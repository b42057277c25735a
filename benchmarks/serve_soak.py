"""`lorakit serve` under load and faults: a soak at 1.5× the server's measured capacity (issue 28).

Question: asked for more than it can do, for minutes, while adapters come and go and clients walk
away mid-stream, does `lorakit serve` stay correct and bounded?

One `lorakit serve` process on the packaged SmolLM2-135M, `--adapters` (16) random q,v r=8 adapters
in its `--adapter-dir`, `--loaded` (12) of them loaded at start. Phases:

1. capacity (also the warm-up): a closed loop of `--max-batch` clients for `--calibrate` (60)
   seconds; capacity = requests served per second once the first `--max-batch` were served.
2. soak: an open loop for `--duration` seconds — Poisson arrivals at `--load` (1.5) × capacity,
   whatever the server answers. Each request: a ready adapter at random (or the base, one share),
   a prompt of the bundled E2E dev sample, `max_tokens` 8..32, greedy or sampled (seeded), streamed
   or not (half each); `--disconnect` (10%) of them are streams whose client closes the connection
   after 1-3 events. Every `--churn-every` seconds one adapter is loaded and another unloaded (it
   leaves the clients' choice half a second before its unload is sent, so no request names an
   adapter being unloaded). Every `--sample-every` seconds: `/metrics` (queue depth and its peak,
   batch rows, adapters) and the server's RSS (VmRSS of /proc/PID/status).
3. drain: the requests in flight finish; `/metrics` is read once more; SIGTERM stops the server.
4. parity: a sample of the greedy requests served during the soak is generated again with
   `lorakit.generate` (what `lorakit generate` runs) for the same adapter, prompt and `max_tokens`.

Goals (each printed PASS/FAIL): no response with status >= 500; every request served (200) or
refused with 429 and `Retry-After` (the cancelled ones are the clients' own disconnects); the
greedy sample equals `lorakit generate`; RSS after warm-up grows <= 5% (the median of the soak's
last tenth over the median of its second tenth: the first tenth still fills the queue); the queue
depth never exceeds `--max-queue` (every sample and the server's own peak gauge); `/metrics` adds
up: generation requests = served + refused + cancelled. Also reported: throughput, latency and
time to first token p50/p99, the load/unload calls, the exit status after SIGTERM.

Writes `serve_soak.json` (settings, machine, summary, checks, the samples, the churn calls, every
request without its text), `serve_soak.png` (RSS and queue over time) and `server.log` to `--out`.

    python benchmarks/serve_soak.py                     # 10 minutes of soak (about 14 in all)
    python benchmarks/serve_soak.py --quick             # 60 s soak, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report
from serve import launch, make_adapters, prompts

BASE = "smollm2-135m"
GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
OK_OUTCOMES = ("served", "refused", "cancelled")


@dataclass
class Request:
    """One request the soak sent, and what became of it.

    Args:
        outcome: `served` (200, read to the end), `refused` (429 with Retry-After), `cancelled`
            (the client closed the stream), or a failure: `refused_without_retry_after`,
            `client_error` (another 4xx), `server_error` (>= 500, or an error event in a stream),
            `failed` (connection error), `unfinished` (still running after the drain).
    """

    id: int
    phase: str
    model: str
    prompt: str
    max_tokens: int
    greedy: bool
    stream: bool
    disconnect_after: int | None
    sent: float = 0.0
    status: int | None = None
    outcome: str = "pending"
    latency: float | None = None
    ttft: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None


class Mix:
    """Draws the soak's requests (seeded): adapter, prompt, length, greedy or not, stream or not."""

    def __init__(self, rng: random.Random, texts: list[str], ready: set[str], disconnect: float) -> None:
        self.rng = rng
        self.texts = texts
        self.ready = ready  # the adapters clients may name now (shared with the churn)
        self.disconnect = disconnect
        self.count = 0

    def next(self, phase: str) -> Request:
        rng = self.rng
        leaves = phase == "soak" and rng.random() < self.disconnect
        self.count += 1
        return Request(
            id=self.count,
            phase=phase,
            model=rng.choice([*sorted(self.ready), BASE]),
            prompt=rng.choice(self.texts),
            max_tokens=rng.randint(8, 32),
            greedy=rng.random() < 0.5,
            # half the requests stream; the disconnecting ones are among them
            stream=leaves or rng.random() < (0.5 - self.disconnect) / (1 - self.disconnect),
            disconnect_after=rng.randint(1, 3) if leaves else None,
        )


async def send(client: Any, req: Request, t0: float) -> None:
    """Send `req` with the openai async client and record what happened."""
    import openai

    start = time.perf_counter()
    req.sent = start - t0
    kwargs: dict[str, Any] = dict(model=req.model, prompt=req.prompt, max_tokens=req.max_tokens)
    if req.greedy:
        kwargs["temperature"] = 0
    else:
        kwargs.update(temperature=0.8, seed=req.id)
    try:
        if req.stream:
            stream = await client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
            req.status, events = 200, 0
            try:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        req.ttft = req.ttft or time.perf_counter() - start
                        req.text += chunk.choices[0].text
                        events += 1
                    if chunk.usage is not None:
                        req.tokens = chunk.usage.completion_tokens
                    if req.disconnect_after is not None and events >= req.disconnect_after:
                        req.outcome = "cancelled"
                        break
            finally:
                await stream.close()  # before the end: closes the connection, the server cancels the row
            if req.outcome != "cancelled":
                req.outcome = "served"
        else:
            reply = await client.completions.create(**kwargs)
            req.status, req.outcome = 200, "served"
            req.text, req.tokens = reply.choices[0].text, reply.usage.completion_tokens
    except openai.RateLimitError as err:
        req.status = 429
        req.outcome = "refused" if err.response.headers.get("retry-after") else "refused_without_retry_after"
    except openai.APIStatusError as err:
        req.status = err.status_code
        req.outcome = "server_error" if err.status_code >= 500 else "client_error"
        req.error = str(err.message)[:300]
    except openai.APIConnectionError as err:
        req.outcome, req.error = "failed", f"{type(err).__name__}: {err}"[:300]
    except openai.APIError as err:  # an error event inside a 200 stream
        req.outcome, req.error = "server_error", str(err.message)[:300]
    req.latency = time.perf_counter() - start


async def closed_loop(client: Any, mix: Mix, seconds: float, clients: int, log: list[Request], t0: float) -> float:
    """`clients` clients, each sending its next request when the last one ends, for `seconds`.

    Returns:
        Requests served per second, counted from the moment the first `clients` requests were
        served (the first wave starts together and runs on a cold server) to the end of the
        window; over the whole run when fewer than twice `clients` were served.
    """
    start = time.perf_counter()
    end = start + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            req = mix.next("capacity")
            log.append(req)
            await send(client, req, t0)

    await asyncio.gather(*(worker() for _ in range(clients)))
    done = sorted(r.sent + r.latency for r in log if r.phase == "capacity" and r.outcome == "served")
    if len(done) >= 2 * clients and done[clients - 1] < end - t0:
        warm = done[clients - 1]
        return sum(warm < d <= end - t0 for d in done) / (end - t0 - warm)
    return len(done) / (time.perf_counter() - start)


async def open_loop(
    client: Any, mix: Mix, rate: float, seconds: float, log: list[Request], t0: float, rng: random.Random
) -> list[asyncio.Task]:
    """Poisson arrivals at `rate` per second for `seconds`, each sent whatever is still running."""
    tasks = []
    start = time.perf_counter()
    due = start
    while True:
        due += rng.expovariate(rate)
        if due - start >= seconds:
            return tasks
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        req = mix.next("soak")
        log.append(req)
        tasks.append(asyncio.create_task(send(client, req, t0)))


# ---------------------------------------------------------------------- the server's side
def http_json(url: str, body: dict | None = None, timeout: float = 600) -> tuple[int, Any]:
    """GET (no body) or POST JSON; (status, decoded JSON or text)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """Prometheus exposition text -> {(name, labels): value} (labels as written, '' for none)."""
    out = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.e+-]+|NaN|\+Inf|-Inf)$", line)
        if match:
            out[match[1], match[2] or ""] = float(match[3])
    return out


def labelled(metrics: dict[tuple[str, str], float], name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of `name` with its labels as a dict."""
    return [
        (dict(re.findall(r'(\w+)="([^"]*)"', labels)), value) for (n, labels), value in metrics.items() if n == name
    ]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sampler(url: str, pid: int, t0: float, every: float, stop: asyncio.Event, samples: list[dict]) -> None:
    """Every `every` seconds until `stop`: the server's RSS and its gauges."""
    while True:
        _, text = await asyncio.to_thread(http_json, url + "/metrics", None, 30)
        m = parse_metrics(text if isinstance(text, str) else "")
        samples.append(
            {
                "t": time.perf_counter() - t0,
                "rss_mib": rss_mib(pid),
                "queue": m.get(("lorakit_queue_depth", "")),
                "queue_peak": m.get(("lorakit_queue_depth_max", "")),
                "rows": m.get(("lorakit_batch_rows", "")),
                "adapters": m.get(("lorakit_adapters_loaded", "")),
            }
        )
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except TimeoutError:
            pass


async def churn(
    url: str,
    names: list[str],
    loaded: set[str],
    ready: set[str],
    every: float,
    stop: asyncio.Event,
    calls: list[dict],
    t0: float,
    rng: random.Random,
) -> None:
    """Every `every` seconds: load an adapter that is not loaded, and unload another one.

    An unload answers once the requests already on the adapter have finished, which under load
    takes longer than `every`: each runs as its own task, and the adapter counts as loaded (not
    to be loaded again) until it answers.
    """
    unloads: set[asyncio.Task] = set()

    async def call(kind: str, name: str, body: dict) -> int:
        start = time.perf_counter()
        status, reply = await asyncio.to_thread(http_json, f"{url}/v1/{kind}_lora_adapter", body)
        calls.append(
            {
                "t": start - t0,
                "call": kind,
                "adapter": name,
                "status": status,
                "seconds": time.perf_counter() - start,
                "error": None if status == 200 else str(reply)[:300],
            }
        )
        return status

    async def unload(name: str) -> None:
        await asyncio.sleep(0.5)  # requests sent before it left the clients' choice reach the server
        if await call("unload", name, {"lora_name": name}) == 200:
            loaded.discard(name)

    while True:
        try:
            await asyncio.wait_for(stop.wait(), every)
            await asyncio.gather(*unloads)
            return
        except TimeoutError:
            pass
        free = [n for n in names if n not in loaded]
        if free:
            coming = rng.choice(free)
            loaded.add(coming)
            if await call("load", coming, {"lora_name": coming, "lora_path": coming}) == 200:
                ready.add(coming)
            else:
                loaded.discard(coming)
        if len(ready) > 1:
            leaving = rng.choice(sorted(ready))
            ready.discard(leaving)  # no new request names it
            task = asyncio.create_task(unload(leaving))
            unloads.add(task)
            task.add_done_callback(unloads.discard)


# ---------------------------------------------------------------------- the run
async def run(args: argparse.Namespace, root: Path, names: list[str], out: Path) -> dict[str, Any]:
    import openai

    loaded = set(names[: args.loaded])
    ready = set(loaded)
    flags = ["--adapter-dir", str(root), "--max-adapters", str(len(names)), "--max-batch", str(args.max_batch)]
    flags += ["--max-queue", str(args.max_queue), "--threads", str(args.threads), "--shutdown-timeout", "30"]
    flags += [f"--adapter={n}={root / n}" for n in sorted(loaded)]
    process, url = await asyncio.to_thread(launch, flags, out / "server.log")
    log: list[Request] = []
    samples: list[dict] = []
    calls: list[dict] = []
    mix = Mix(random.Random(args.seed), prompts(200), ready, args.disconnect)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    stop_sampling = asyncio.Event()
    sampling = asyncio.create_task(sampler(url, process.pid, t0, args.sample_every, stop_sampling, samples))
    try:
        print(f"capacity: {args.max_batch} closed-loop clients for {args.calibrate:.0f} s", file=sys.stderr)
        capacity = await closed_loop(client, mix, args.calibrate, args.max_batch, log, t0)
        rate = args.load * capacity
        print(f"capacity {capacity:.2f} req/s; soak at {rate:.2f} req/s for {args.duration:.0f} s", file=sys.stderr)
        stop_churn = asyncio.Event()
        churning = asyncio.create_task(
            churn(url, names, loaded, ready, args.churn_every, stop_churn, calls, t0, random.Random(args.seed + 1))
        )
        soak_start = time.perf_counter() - t0
        tasks = await open_loop(client, mix, rate, args.duration, log, t0, random.Random(args.seed + 2))
        soak_end = time.perf_counter() - t0
        stop_churn.set()
        _, pending = await asyncio.wait(tasks, timeout=args.drain) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for req in log:
            if req.outcome == "pending":
                req.outcome = "unfinished"
        await churning
        await asyncio.sleep(1.0)  # the engine's gauges refresh after each of its turns
        stop_sampling.set()
        await sampling
        _, text = await asyncio.to_thread(http_json, url + "/metrics", None, 30)
        final = parse_metrics(text if isinstance(text, str) else "")
    finally:
        await client.close()
        stop_sampling.set()
        process.send_signal(signal.SIGTERM)
        try:
            exit_status = await asyncio.to_thread(process.wait, 60)
        except subprocess.TimeoutExpired:
            process.kill()
            exit_status = f"still running 60 s after SIGTERM (killed, {process.wait()})"
    return {
        "capacity": capacity,
        "rate": rate,
        "soak_start": soak_start,
        "soak_end": soak_end,
        "requests": log,
        "samples": samples,
        "calls": calls,
        "metrics": final,
        "exit_status": exit_status,
    }


def parity(args: argparse.Namespace, root: Path, log: list[Request]) -> list[dict]:
    """Greedy soak requests generated again by `lorakit.generate`, one adapter loaded at a time."""
    import torch

    import lorakit
    from lorakit.adapters import delete_adapter
    from lorakit.generate import Decoding, generate
    from lorakit.models import load_model

    greedy = [r for r in log if r.phase == "soak" and r.greedy and r.outcome == "served"]
    sample = random.Random(args.seed).sample(greedy, min(args.parity, len(greedy)))
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(None)
    model.eval()
    results = []
    for name in sorted({r.model for r in sample}):
        if name != BASE:
            lorakit.load_adapter(model, root / name, adapter_name=name)
        for req in (r for r in sample if r.model == name):
            (expected,) = generate(model, tokenizer, [req.prompt], Decoding(max_new_tokens=req.max_tokens))
            results.append(
                {
                    "id": req.id,
                    "model": name,
                    "max_tokens": req.max_tokens,
                    "stream": req.stream,
                    "equal": req.text.strip() == expected,
                    "served": req.text.strip(),
                    "generate": expected,
                }
            )
        if name != BASE:
            delete_adapter(model, name)
    return results


# ---------------------------------------------------------------------- the report
def pct(xs: list[float], q: int) -> float | None:
    if not xs:
        return None
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def window_median(samples: list[dict], start: float, end: float) -> float | None:
    xs = [s["rss_mib"] for s in samples if start <= s["t"] <= end and s["rss_mib"] is not None]
    return statistics.median(xs) if xs else None


def summarise(args: argparse.Namespace, res: dict[str, Any], matches: list[dict]) -> tuple[dict, list[dict]]:
    log: list[Request] = res["requests"]
    soak = [r for r in log if r.phase == "soak"]
    outcomes = Counter(r.outcome for r in log)
    served = [r for r in soak if r.outcome == "served"]
    span = res["soak_end"] - res["soak_start"]
    lat = [r.latency for r in served if r.latency is not None]
    ttft = [r.ttft for r in served if r.stream and r.ttft is not None]

    start, length = res["soak_start"], span
    warm = window_median(res["samples"], start + 0.1 * length, start + 0.2 * length)
    last = window_median(res["samples"], start + 0.9 * length, start + length + args.drain)
    growth = last / warm - 1 if warm and last else None

    m = res["metrics"]
    requests = labelled(m, "lorakit_requests_total")
    generations = dict((lab["finish_reason"], v) for lab, v in labelled(m, "lorakit_generations_total"))
    gen_requests = sum(v for lab, v in requests if lab["endpoint"] in GENERATION_ENDPOINTS)
    refused_429 = sum(v for lab, v in requests if lab["endpoint"] in GENERATION_ENDPOINTS and lab["status"] == "429")
    server_5xx = sum(v for lab, v in requests if lab["status"].startswith("5"))
    m_served = generations.get("stop", 0) + generations.get("length", 0)
    m_cancelled = generations.get("cancelled", 0)
    queue_seen = max((s["queue"] for s in res["samples"] if s["queue"] is not None), default=None)
    queue_peak = m.get(("lorakit_queue_depth_max", ""))
    bad_calls = [c for c in res["calls"] if c["status"] != 200]

    summary = {
        "capacity_rps": res["capacity"],
        "offered_rps": res["rate"],
        "soak_seconds": span,
        "requests": len(log),
        "soak_requests": len(soak),
        "outcomes": dict(outcomes),
        "served_rps": len(served) / span if span else None,
        "served_tokens_per_s": sum(r.tokens for r in served) / span if span else None,
        "latency_p50": pct(lat, 50),
        "latency_p99": pct(lat, 99),
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "rss_warm_mib": warm,
        "rss_last_mib": last,
        "rss_max_mib": max((s["rss_mib"] for s in res["samples"] if s["rss_mib"] is not None), default=None),
        "rss_growth": growth,
        "queue_max_sampled": queue_seen,
        "queue_peak_gauge": queue_peak,
        "metrics": {
            "generation_requests": gen_requests,
            "served": m_served,
            "refused_429": refused_429,
            "cancelled": m_cancelled,
            "errors": generations.get("error", 0),
            "responses_5xx": server_5xx,
        },
        "churn_calls": Counter(f"{c['call']} {c['status']}" for c in res["calls"]),
        "exit_status_after_sigterm": res["exit_status"],
        "parity": f"{sum(x['equal'] for x in matches)}/{len(matches)}",
    }
    client_5xx = sum((r.status is not None and r.status >= 500) or r.outcome == "server_error" for r in log)
    checks = [
        ("no response >= 500", client_5xx == 0 and server_5xx == 0 and not any(c["status"] >= 500 for c in bad_calls)),
        ("every request served or 429 + Retry-After", all(r.outcome in OK_OUTCOMES for r in log)),
        ("greedy sample == lorakit generate", bool(matches) and all(x["equal"] for x in matches)),
        ("RSS growth after warm-up <= 5%", growth is not None and growth <= 0.05),
        (
            f"queue <= --max-queue {args.max_queue}",
            queue_seen is not None and queue_peak is not None and max(queue_seen, queue_peak) <= args.max_queue,
        ),
        ("/metrics: requests = served + refused + cancelled", gen_requests == m_served + refused_429 + m_cancelled),
        ("adapter loads and unloads all 200", not bad_calls),
        ("SIGTERM: exit status 0", res["exit_status"] == 0),
    ]
    return summary, [{"check": name, "pass": bool(ok)} for name, ok in checks]


def plot(res: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = res["samples"]
    t = [s["t"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, [s["rss_mib"] for s in samples], color="tab:blue")
    top.set_ylabel("server RSS (MiB)")
    bottom.plot(t, [s["queue"] for s in samples], label="queue depth", color="tab:orange")
    bottom.plot(t, [s["rows"] for s in samples], label="batch rows", color="tab:green")
    bottom.axhline(args.max_queue, color="tab:red", linestyle="--", label="--max-queue")
    bottom.set_ylabel("requests")
    bottom.set_xlabel("seconds since start")
    bottom.legend(loc="upper left", fontsize="small")
    for ax in (top, bottom):
        ax.axvspan(0, res["soak_start"], color="0.9", label="capacity / warm-up" if ax is top else None)
        ax.axvline(res["soak_end"], color="0.5", linestyle=":")
    start, length = res["soak_start"], res["soak_end"] - res["soak_start"]
    for a, b in ((0.1, 0.2), (0.9, 1.0)):  # the two windows whose median RSS the growth compares
        top.axvspan(start + a * length, start + b * length, color="tab:blue", alpha=0.1)
    top.legend(loc="lower right", fontsize="small")
    top.set_title(f"lorakit serve soak: {res['rate']:.2f} req/s offered ({args.load}× capacity)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=600, help="seconds of open-loop soak")
    p.add_argument("--adapters", type=int, default=16, help="adapters in --adapter-dir (the server's --max-adapters)")
    p.add_argument("--loaded", type=int, default=12, help="adapters loaded at start")
    p.add_argument("--out", type=Path, default=Path("runs/serve-soak"), help="folder for the JSON, plot and log")
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads (and the parity check's)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 60 s soak, 20 s capacity, --max-queue 6, 6 parity requests"
    )
    p.add_argument("--load", type=float, default=1.5, help="offered load, × the measured capacity")
    p.add_argument("--calibrate", type=float, default=60, help="seconds of closed-loop capacity measurement")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (and the capacity clients)")
    p.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue")
    p.add_argument("--churn-every", type=float, default=5, help="seconds between adapter load/unload pairs")
    p.add_argument("--sample-every", type=float, default=2, help="seconds between /metrics and RSS samples")
    p.add_argument("--disconnect", type=float, default=0.1, help="share of requests whose client leaves mid-stream")
    p.add_argument("--drain", type=float, default=120, help="seconds to wait for requests in flight after the soak")
    p.add_argument("--parity", type=int, default=24, help="greedy requests compared with lorakit generate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.duration, args.calibrate, args.churn_every, args.sample_every, args.parity = 60, 20, 3, 1, 6
        args.max_queue = 6  # so that a minute at 1.5× capacity fills it and 429s are part of the smoke run
    args.device = "cpu"  # for _report.machine_info
    if not 1 <= args.loaded < args.adapters:
        p.error("--loaded must be between 1 and --adapters - 1 (the churn loads adapters that are not loaded)")
    args.out.mkdir(parents=True, exist_ok=True)

    root = args.out / "adapters"
    names = [f"a{i}" for i in range(args.adapters)]
    if not all((root / n / "adapter_model.safetensors").is_file() for n in names):
        make_adapters(root, args.adapters)
    res = asyncio.run(run(args, root, names, args.out))
    print("parity: greedy requests generated again with lorakit.generate", file=sys.stderr)
    matches = parity(args, root, res["requests"])
    summary, checks = summarise(args, res, matches)

    plot(res, args, args.out / "serve_soak.png")
    title = (
        f"lorakit serve soak, smollm2-135m, {args.adapters} adapters ({args.loaded} loaded, one in/one out every "
        f"{args.churn_every:g} s), --max-batch {args.max_batch} --max-queue {args.max_queue}, {args.threads} "
        f"threads, {summary['soak_seconds']:.0f} s at {args.load}× capacity"
    )

    def fmt(x: float | None, spec: str = ".2f") -> str:
        return "–" if x is None else format(x, spec)

    o = summary["outcomes"]
    queue_peak = fmt(summary["queue_peak_gauge"], ".0f")
    identity = "{generation_requests:.0f} = {served:.0f} + {refused_429:.0f} + {cancelled:.0f}".format(
        **summary["metrics"]
    )
    growth = "–" if summary["rss_growth"] is None else f"{100 * summary['rss_growth']:+.1f}%"
    lines = [
        ["capacity (closed loop)", f"{fmt(summary['capacity_rps'])} req/s"],
        ["offered (open loop)", f"{fmt(summary['offered_rps'])} req/s"],
        ["served", f"{fmt(summary['served_rps'])} req/s, {fmt(summary['served_tokens_per_s'], '.1f')} tokens/s"],
        [
            "requests: served / 429 / cancelled / other",
            f"{o.get('served', 0)} / {o.get('refused', 0)} / "
            f"{o.get('cancelled', 0)} / {sum(v for k, v in o.items() if k not in OK_OUTCOMES)}",
        ],
        ["latency p50 / p99 (served)", f"{fmt(summary['latency_p50'])} / {fmt(summary['latency_p99'])} s"],
        ["TTFT p50 / p99 (served streams)", f"{fmt(summary['ttft_p50'])} / {fmt(summary['ttft_p99'])} s"],
        [
            "RSS warm / last / max",
            f"{fmt(summary['rss_warm_mib'], '.0f')} / {fmt(summary['rss_last_mib'], '.0f')} / "
            f"{fmt(summary['rss_max_mib'], '.0f')} MiB ({growth} growth)",
        ],
        ["queue max sampled / peak gauge", f"{fmt(summary['queue_max_sampled'], '.0f')} / {queue_peak}"],
        ["/metrics requests = served + 429 + cancelled", identity],
        ["adapter calls", ", ".join(f"{k}: {v}" for k, v in sorted(summary["churn_calls"].items())) or "none"],
        ["greedy == lorakit generate", summary["parity"]],
        ["exit status after SIGTERM", str(summary["exit_status_after_sigterm"])],
    ]
    print(title + "\n")
    print(_report.markdown_table(["measure", "value"], lines))
    print()
    print(_report.markdown_table(["goal", "result"], [[c["check"], "PASS" if c["pass"] else "FAIL"] for c in checks]))
    failures = [r for r in res["requests"] if r.outcome not in OK_OUTCOMES]
    for r in failures[:5]:
        print(f"  request {r.id} ({r.phase}, {r.model}): {r.outcome} {r.status} {r.error}", file=sys.stderr)
    _report.write_json(
        args.out / "serve_soak.json",
        {
            "title": title,
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": _report.machine_info(args),
            "summary": summary,
            "checks": checks,
            "samples": res["samples"],
            "churn": res["calls"],
            "parity": matches,
            "requests": [{k: v for k, v in dataclasses.asdict(r).items() if k != "text"} for r in res["requests"]],
        },
    )
    print(f"plot: {args.out / 'serve_soak.png'}", file=sys.stderr)
    sys.exit(0 if all(c["pass"] for c in checks) else 1)


if __name__ == "__main__":
    main()
