"""What does one dropout mask on a LoRA branch input cost: torch's dropout (PEFT) vs lorakit's?

Dropout on the branch input is one of a LoRA step's largest costs on CPU (a training step draws
one mask per adapted input: four per SmolLM2 block with q/k/v and gate/up sharing, seven
without). For the branch inputs of SmolLM2-135M at batch 4×128 — (512, 576) for attention and
gate/up, (512, 1536) for down_proj — each row times, in one process with the rows interleaved:

- forward: draw the mask, keep what the backward needs, produce x·keep;
- backward: rebuild the mask from what was kept and apply it to a gradient;

and reports what the backward keeps per mask. Rows: `torch.ops.aten.native_dropout` (what
`nn.Dropout`, hence PEFT, runs: a `bernoulli_` mask kept as bool), lorakit dense (16-bit draws,
kept as bits; lorakit's form on GPU, under `torch.compile` and for p > 0.2) and lorakit sparse
(dropped positions; lorakit's form on CPU for p ≤ 0.2). Ratios are to torch's row.

Usage:
    .venv/bin/python benchmarks/dropout_masks.py
    .venv/bin/python benchmarks/dropout_masks.py --quick --out runs/dropout_masks.json
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import _measure
import _report


def _median_ms(fn: Callable[[], object], calls: int) -> float:
    return statistics.median(_measure.time_steps(fn, "cpu", 0, calls)) * 1e3


def _rows(shape: tuple[int, int], p: float):
    """{label: (forward, backward, bytes kept)} for one input shape and p."""
    import torch

    from lorakit.kernels import dropout as D

    x = torch.randn(*shape)
    grad = torch.randn(*shape)
    scale = 1 / (1 - p)
    rows = {}

    _, torch_mask = torch.ops.aten.native_dropout(x, p, True)
    rows["torch native_dropout (PEFT)"] = (
        lambda: torch.ops.aten.native_dropout(x, p, True),
        lambda: torch.ops.aten.native_dropout_backward(grad, torch_mask, scale),
        torch_mask.numel() * torch_mask.element_size(),
    )
    for label, sampler in (("lorakit dense", D.dense_mask), ("lorakit sparse", D.sparse_mask)):
        kept = sampler(shape, p, "cpu").saved()

        def forward(sampler=sampler):
            mask = sampler(shape, p, "cpu")
            return mask.saved(), mask.apply(x)

        def backward(kept=kept):
            return D.KeepMask.from_saved(kept, shape, p).apply(grad)

        rows[label] = (forward, backward, kept.numel() * kept.element_size())
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    parser.add_argument("--calls", type=int, default=50, help="calls per timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 10 calls")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.calls = 2, 10
    args.device, args.dtype = "cpu", "fp32"

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines, results = [], []
    for shape in ((512, 576), (512, 1536)):
        for p in (0.05, 0.1):
            rows = _rows(shape, p)
            for fwd, bwd, _ in rows.values():  # warm-up
                _measure.time_steps(fwd, "cpu", 3, 0)
                _measure.time_steps(bwd, "cpu", 3, 0)
            times = {label: ([], []) for label in rows}
            for i in range(args.rounds):
                for label in list(rows) if i % 2 == 0 else reversed(list(rows)):
                    fwd, bwd, _ = rows[label]
                    times[label][0].append(_median_ms(fwd, args.calls))
                    times[label][1].append(_median_ms(bwd, args.calls))
            ref = next(iter(rows))
            ref_total = statistics.median(times[ref][0]) + statistics.median(times[ref][1])
            for label, (fw, bw) in times.items():
                f, b = statistics.median(fw), statistics.median(bw)
                kept = rows[label][2]
                results.append(
                    {"shape": shape, "p": p, "row": label, "forward_ms": f, "backward_ms": b, "kept_bytes": kept}
                )
                lines.append(
                    [
                        f"{shape[0]}×{shape[1]}",
                        f"{p}",
                        label,
                        f"{f:.3f}",
                        f"{b:.3f}",
                        f"{(f + b) / ref_total:.2f}×",
                        f"{kept / 1024:.0f}",
                    ]
                )
    title = f"one dropout mask, fp32, {args.threads} threads, median of {args.rounds} interleaved rounds"
    headers = ["input", "p", "row", "forward ms", "backward ms", "fwd+bwd vs torch", "kept KiB"]
    _report.report_in_process(args, title, headers, lines, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
