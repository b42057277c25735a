"""Memory per rank and step time of sharded (FSDP2) vs replicated (DDP) LoRA training.

Rows (each a fresh job: `torchrun --nproc_per_node N` of this script's worker, or one plain process
for N = 1; interleaved over repeats), one training step (`lorakit.train.train_step`, what `fit`
runs) of the packaged SmolLM2-135M with LoRA q,v r=8 (or `--adapters all16`), a global batch of
`--batch` × `--seq` tokens of E2E training text (../shared/data), split over the ranks as `fit`
splits it:

- 1 process: the model whole (what `--strategy` means nothing to);
- DDP, N ranks: the model replicated on every rank (`--strategy ddp`);
- FSDP, N ranks: every parameter sharded over the ranks, each decoder block its own unit
  (`--strategy fsdp`, `lorakit.train.shard`), with and without `reshard_after_forward`.

Per rank it reports what the rank holds — parameters (the frozen base and the adapters: this
rank's rows of each under FSDP), gradients (of the trainable parameters, as reduced onto this rank)
and optimizer state (AdamW's two moments and step, this rank's rows) — counted from the tensors
themselves; and the peak resident set during the timed steps above the process's resident set
after its imports (glibc's mmap threshold fixed at 128 kB, so freed blocks go back to the system
and the peak is what is alive: the model, the gathered blocks of the moment, the activations).
Every rank loads the whole model before `shard` splits it; that load-time peak is reported too
(`load peak`), and is not what the steps need. The ranks' largest figure is shown.

Step time is rank 0's median step (the ranks step together); ratios against the 1-process row.
On this 2-core machine a rank has 1 thread and N = 4 overcommits the cores: its step time is not
comparable, its memory is.

Usage:
    .venv/bin/python benchmarks/fsdp.py                       # N = 1, 2, 4; table; JSON with --out
    .venv/bin/python benchmarks/fsdp.py --ranks 1,2 --repeats 3 --out benchmarks/results/fsdp.json
    .venv/bin/python benchmarks/fsdp.py --device cuda --dtype bf16 --ranks 1,2,4,8   # on GPUs
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _flags
import _measure
import _report

REPO = Path(__file__).resolve().parents[1]
TRAIN_TEXT = REPO.parent / "shared" / "data" / "e2e" / "trainset.csv"


def _rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)\s+kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def _local_bytes(tensor: Any) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def _batch(tokenizer: Any, rows: int, seq: int, device: str) -> dict[str, Any]:
    """`rows` × `seq` token ids cut from the E2E training references, in order (real text)."""
    import torch

    text = " ".join(line.rsplit(",", 1)[-1] for line in TRAIN_TEXT.read_text(encoding="utf-8").splitlines()[1:400])
    ids = torch.tensor(tokenizer(text)["input_ids"][: rows * seq]).reshape(rows, seq).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def worker(args: argparse.Namespace) -> None:
    """One rank of a row: set up, measure, write `<result>.<rank>.json`."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: freed blocks above 128 kB go back at once
    import torch

    import lorakit
    from lorakit.models import load_model
    from lorakit.train import TrainConfig, build_optimizer, init_distributed, shard, train_step

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    base_rss = _rss_mib()
    info = init_distributed()
    device = args.device
    if device == "cuda":
        device = f"cuda:{info.local_rank}"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, tokenizer, _ = load_model(_flags.MODEL, dtype=dtype)
    model.config.use_cache = False
    model.to(device)
    r, alpha, targets = _flags.ADAPTER_SETS[args.adapters]
    lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    model.train()
    strategy = args.strategy
    if strategy == "fsdp" and info.enabled:
        shard(model, reshard_after_forward=not args.keep_gathered)
        train_model = model
    elif info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.local_rank] if device.startswith("cuda") else None
        train_model = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    else:
        train_model = model
    optimizer = build_optimizer(model, TrainConfig(lr=1e-5))
    batch = _batch(tokenizer, args.batch, args.seq, device)
    load_peak = _measure.process_peak_mib() - base_rss
    libc.malloc_trim(0)

    def step() -> None:
        train_step(train_model, [batch], optimizer, max_grad_norm=1.0, info=info)

    first = time.perf_counter()
    step()
    first = time.perf_counter() - first
    _measure.reset_peak(args.device)
    times = _measure.time_steps(step, args.device, 0, args.steps)
    peak = _measure.peak_mib(args.device) - (base_rss if args.device == "cpu" else 0)
    params = sum(_local_bytes(p) for p in model.parameters())
    trainable = sum(_local_bytes(p) for p in model.parameters() if p.requires_grad)
    # train_step frees the gradients after the step; between backward and step each trainable
    # tensor has one of its own local size.
    grads = trainable
    optim = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    result = {
        "rank": info.rank,
        "world_size": info.world_size,
        "step_s": statistics.median(times),
        "steps_s": times,
        "first_step_s": first,
        "params_mib": params / 2**20,
        "trainable_mib": trainable / 2**20,
        "grads_mib": grads / 2**20,
        "optimizer_mib": optim / 2**20,
        "peak_mib": peak,
        "load_peak_mib": load_peak,
        "rss_after_mib": _rss_mib() - base_rss,
    }
    Path(f"{args.result}.{info.rank}.json").write_text(json.dumps(result))
    if info.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()


ROWS = {
    "single": ("1 process (the model whole)", 1, "ddp", False),
    "ddp2": ("DDP, 2 ranks", 2, "ddp", False),
    "fsdp2": ("FSDP, 2 ranks", 2, "fsdp", False),
    "fsdp2-keep": ("FSDP, 2 ranks, reshard_after_forward off", 2, "fsdp", True),
    "ddp4": ("DDP, 4 ranks", 4, "ddp", False),
    "fsdp4": ("FSDP, 4 ranks", 4, "fsdp", False),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_row(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    _, ranks, strategy, keep = ROWS[name]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result"
        flags = ["--worker", "--result", str(result), "--strategy", strategy, "--threads", str(args.threads)]
        flags += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
        flags += ["--device", args.device, "--dtype", args.dtype, "--adapters", args.adapters]
        flags += ["--keep-gathered"] if keep else []
        script = str(Path(__file__).resolve())
        if ranks == 1:
            command = [sys.executable, script, *flags]
        else:
            torchrun = str(Path(sys.executable).with_name("torchrun"))
            command = [torchrun, "--nnodes", "1", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1"]
            command += ["--master_port", str(_free_port()), script, *flags]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "benchmarks"), env.get("PYTHONPATH", "")])
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return [json.loads(Path(f"{result}.{r}.json").read_text()) for r in range(ranks)]


def summarise(per_repeat: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Largest figure over ranks, median over repeats."""

    def median_of(key: str) -> float:
        return statistics.median(max(rank[key] for rank in ranks) for ranks in per_repeat)

    keys = ("params_mib", "trainable_mib", "grads_mib", "optimizer_mib", "peak_mib", "load_peak_mib", "rss_after_mib")
    out = {key: median_of(key) for key in keys}
    out["step_s"] = statistics.median(ranks[0]["step_s"] for ranks in per_repeat)
    out["step_s_per_repeat"] = [ranks[0]["step_s"] for ranks in per_repeat]
    out["peak_per_repeat"] = [max(rank["peak_mib"] for rank in ranks) for ranks in per_repeat]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2,4", help="which N to run (1, 2, 4)")
    p.add_argument("--batch", type=int, default=4, help="global rows per step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--adapters", choices=sorted(_flags.ADAPTER_SETS), default="qv8")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--keep-gathered", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    wanted = {int(n) for n in args.ranks.split(",")}
    names = [n for n, (_, ranks, _, _) in ROWS.items() if ranks in wanted]
    results: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in names}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            print(f"repeat {repeat + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
            results[name].append(run_row(name, args))
    summary = {n: summarise(r) for n, r in results.items()}
    one = summary.get("single")
    headers = [
        "configuration",
        "params / rank MiB",
        "grads / rank MiB",
        "optimizer / rank MiB",
        "params+grads+optim vs 1 process",
        "peak RSS / rank MiB",
        "peak vs 1 process",
        "load peak MiB",
        "step ms",
        "step vs 1 process",
    ]
    lines = []
    for name in names:
        s = summary[name]
        held = s["params_mib"] + s["grads_mib"] + s["optimizer_mib"]
        one_held = one["params_mib"] + one["grads_mib"] + one["optimizer_mib"] if one else None
        lines.append(
            [
                ROWS[name][0],
                f"{s['params_mib']:.1f}",
                f"{s['grads_mib']:.2f}",
                f"{s['optimizer_mib']:.2f}",
                _report.fmt_ratio(_report.ratio(held, one_held)),
                f"{s['peak_mib']:.0f}",
                _report.fmt_ratio(_report.ratio(s["peak_mib"], one["peak_mib"] if one else None)),
                f"{s['load_peak_mib']:.0f}",
                f"{s['step_s'] * 1e3:.0f}",
                _report.fmt_ratio(_report.ratio(s["step_s"], one["step_s"] if one else None)),
            ]
        )
    title = (
        f"FSDP vs DDP: {_flags.MODEL}, LoRA {_flags.ADAPTER_SET_LABELS[args.adapters]}, "
        f"global batch {args.batch}×{args.seq}, {args.dtype}, {args.device}, {args.threads} thread(s) per rank, "
        f"median of {args.steps} steps after 1 warm-up, median over {args.repeats} repeat(s); largest rank shown "
        f"({time.perf_counter() - started:.0f} s)"
    )
    _report.print_and_save(
        args.out,
        title,
        headers,
        lines,
        {
            "command": "python benchmarks/fsdp.py " + " ".join(sys.argv[1:]),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": _report.machine_info(args),
            "summary": summary,
            "raw": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
