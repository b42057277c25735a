"""The LoRA paper's Table 1 on this machine: inference latency of adapter layers vs a merged LoRA.

One process, the packaged SmolLM2-135M, forward passes only (no KV cache, eval mode, no grad), a
sequence of `--seq` tokens of E2E text at batch 1, 16 and 32. Rows:

- merged LoRA: ΔW merged into W0, so the model *is* the base model (the paper's "Fine-Tune/LoRA").
- LoRA, not merged: lorakit's q,v r=8 branch computed beside W0 (what serving many adapters costs).
- AdapterL (Lin et al., 2020): one bottleneck adapter after each block's MLP (LayerNorm, down,
  ReLU, up, residual), built here as the paper's baseline, not part of lorakit.
- AdapterH (Houlsby et al., 2019): a bottleneck adapter after each block's attention output and
  one after its MLP output.

The adapters' bottleneck is chosen so that each has (about) the parameter count of the q,v r=8 LoRA.
Rows are timed interleaved (one forward of each, in rotating order, repeated), so drift on the
machine hits all alike; the table gives medians and the overhead against the merged model beside the
paper's (GPT-2 Medium, one V100: AdapterL +20.7%, AdapterH +30.3% at batch 1).

Usage:
    .venv/bin/python benchmarks/adapter_latency.py                      # batch 1, 16, 32
    .venv/bin/python benchmarks/adapter_latency.py --out benchmarks/results/adapter_latency.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _fixtures
import _flags
import _report
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PAPER_BATCH1 = {"AdapterL": 20.7, "AdapterH": 30.3}


class Bottleneck(nn.Module):
    """x + up(relu(down(norm(x)))) — an adapter layer, up initialised small so it changes the output."""

    def __init__(self, dim: int, width: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        nn.init.normal_(self.up.weight, std=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(self.norm(x))))


class After(nn.Module):
    """Run `inner`, then an adapter on its output (the sublayer output, before the residual add)."""

    def __init__(self, inner: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.inner(*args, **kwargs))


def lora_parameters(model: nn.Module, r: int) -> int:
    per_layer = 0
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.v_proj):
        per_layer += r * (proj.in_features + proj.out_features)
    return per_layer


def add_adapters(model: nn.Module, style: str, budget: int) -> int:
    """Insert Houlsby (`H`) or Lin (`L`) adapters into every block, `budget` parameters over the whole
    model; returns the parameters added."""
    dim = model.config.hidden_size
    count = 2 if style == "H" else 1
    width = max(1, round(budget / len(model.model.layers) / count / (2 * dim)))
    added = 0
    for layer in model.model.layers:
        if style == "H":
            layer.self_attn.o_proj = After(layer.self_attn.o_proj, Bottleneck(dim, width, norm=False))
            added += sum(p.numel() for p in layer.self_attn.o_proj.adapter.parameters())
        layer.mlp.down_proj = After(layer.mlp.down_proj, Bottleneck(dim, width, norm=style == "L"))
        added += sum(p.numel() for p in layer.mlp.down_proj.adapter.parameters())
    return added


def build(kind: str, r: int):
    import lorakit
    from lorakit.models import load_model

    model, tokenizer, _ = load_model(_flags.MODEL)
    model.config.use_cache = False
    budget = lora_parameters(model, r) * model.config.num_hidden_layers
    extra = 0
    if kind in ("merged", "lora"):
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
        _fixtures.randomize_lora_B(model)
        extra = budget
        if kind == "merged":
            model = lorakit.merge_and_unload(model)
    elif kind == "AdapterL":
        extra = add_adapters(model, "L", budget)
    elif kind == "AdapterH":
        extra = add_adapters(model, "H", budget)
    return model.eval(), tokenizer, extra


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,16,32")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=8, help="LoRA rank; the adapters match its parameter count")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds per batch size (batch 1: x4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    kinds = ["merged", "lora", "AdapterL", "AdapterH"]
    built = {k: build(k, args.r) for k in kinds}
    tokenizer = built["merged"][1]
    text = " ".join(
        line.rsplit(",", 1)[-1]
        for line in (REPO.parent / "shared/data/e2e/trainset.csv").read_text().splitlines()[1:1000]
    )
    ids_all = torch.tensor(tokenizer(text)["input_ids"])
    rows = []
    raw = {}
    started = time.perf_counter()
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = ids_all[: batch * args.seq].reshape(batch, args.seq)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        rounds = args.repeats * (4 if batch == 1 else 1)
        with torch.no_grad():
            for k in kinds:  # warm-up
                built[k][0](input_ids=ids)
            for i in range(rounds):
                order = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]
                for k in order:
                    t0 = time.perf_counter()
                    built[k][0](input_ids=ids)
                    times[k].append(time.perf_counter() - t0)
        raw[batch] = times
        base = statistics.median(times["merged"])
        for k in kinds:
            ms = statistics.median(times[k]) * 1e3
            overhead = (statistics.median(times[k]) / base - 1) * 100
            paper = f"+{PAPER_BATCH1[k]}%" if batch == 1 and k in PAPER_BATCH1 else ""
            rows.append([batch, k, f"{built[k][2]:,}", f"{ms:.1f}", f"{overhead:+.1f}%", paper])
    title = (
        f"Forward latency, {_flags.MODEL}, seq {args.seq}, {args.threads} threads, median of interleaved rounds "
        f"({time.perf_counter() - started:.0f} s); extra parameters matched to LoRA q,v r={args.r}"
    )
    headers = ["batch", "model", "extra parameters", "forward ms", "vs merged LoRA", "paper (GPT-2 M)"]
    _report.print_and_save(
        args.out,
        title,
        headers,
        rows,
        {
            "command": "python benchmarks/adapter_latency.py " + " ".join(sys.argv[1:]),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows,
            "raw_seconds": {str(b): t for b, t in raw.items()},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
