"""Ratios that survive a noisy machine: every configuration in one process, steps alternated.

The other scripts run each row in a fresh process, which measures memory cleanly but lets the
machine's drift between processes (20–50% here) into the ratios. This script builds all
configurations side by side in one process, warms each up, then runs one step of each in turn
(the order reversed every other round) and reports, per configuration, the median over rounds
of its step time divided by the reference's step time in the same round, and its fastest step
divided by the reference's fastest step: other load on the machine only ever slows a step down,
so the fastest steps are the closest to each configuration's own cost.

- `--mode train`: reference = the floor (frozen model, input-gradient backward, no optimiser);
  rows: lorakit, lorakit with the gated-MLP node off (`lorakit.kernels.disabled("gated_mlp")`),
  lorakit with every kernel off (the reference path), lorakit with dropout 0, PEFT — each
  dropout 0.05 unless named, each step `lorakit.train.train_step` (what `fit` runs: token-normalised
  loss, clipping, fused AdamW), as in `train_step.py`. `--baseline REV` adds lorakit as of
  git revision REV (imported beside the working tree, `_baseline.py`), to measure a change before
  and after in the same run.
- `--mode dora`: reference = the lorakit LoRA step (dropout 0.05, as `train`); rows: lorakit
  DoRA (`use_dora=True`, same targets and rank), lorakit DoRA with every kernel off, PEFT LoRA,
  PEFT DoRA, and the floor — so DoRA's cost reads against lorakit's LoRA step, against PEFT's
  DoRA step, and against what no adapter can go below.
- `--mode inference`: reference = the base model; rows: lorakit unmerged, PEFT unmerged, lorakit
  merged (the same graph as the base: its spread shows what the machine can resolve).

Usage:
    .venv/bin/python benchmarks/paired.py --mode train --adapter-set all16
    .venv/bin/python benchmarks/paired.py --mode train --adapter-set qv8 --baseline HEAD~5
    .venv/bin/python benchmarks/paired.py --mode dora --adapter-set qv8
    .venv/bin/python benchmarks/paired.py --mode inference --adapter-set qv8 --pairs 8 --out runs/paired.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import _baseline
import _fixtures
import _flags
import _report


def _train_rows(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    import contextlib

    import lorakit

    old = _baseline.load(args.baseline) if args.baseline else None
    ids = None
    rows: dict[str, Callable[[], None]] = {}
    # label -> (what, dropout, paths disabled: None = none, () = all)
    specs: dict[str, tuple[str, float, tuple[str, ...] | None]] = {
        "floor": ("floor", 0.0, None),
        "lorakit": ("lorakit", 0.05, None),
        "lorakit, gated-MLP node off": ("lorakit", 0.05, ("gated_mlp",)),
        "lorakit, kernels disabled (reference)": ("lorakit", 0.05, ()),
        "lorakit, dropout 0": ("lorakit", 0.0, None),
    }
    if old is not None:
        specs[f"lorakit@{args.baseline}"] = ("baseline", 0.05, None)
    specs["PEFT"] = ("peft", 0.05, None)
    for label, (kind, dropout, off) in specs.items():
        model = _fixtures.load_base(args)
        ids = ids if ids is not None else _fixtures.random_ids(args, model.config.vocab_size)
        if kind == "floor":
            _fixtures.make_floor(model)
        elif kind == "baseline":
            old.inject(model, _fixtures.lora_configs(old, args.adapter_set, dropout))
            _fixtures.randomize_lora_B(model)
        else:
            model, _ = _fixtures.add_lora(model, kind, args.adapter_set, dropout)
        model.train()
        train = _fixtures.training_step(model, ids)

        def step(train=train, off=off) -> None:
            with lorakit.kernels.disabled(*off) if off is not None else contextlib.nullcontext():
                train()

        rows[label] = step
    return rows


def _dora_rows(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    import contextlib

    import lorakit

    ids = None
    rows: dict[str, Callable[[], None]] = {}
    # label -> (library, use_dora, kernels off)
    specs = {
        "lorakit LoRA": ("lorakit", False, False),
        "lorakit DoRA": ("lorakit", True, False),
        "lorakit DoRA, kernels disabled (reference)": ("lorakit", True, True),
        "PEFT LoRA": ("peft", False, False),
        "PEFT DoRA": ("peft", True, False),
        "floor": ("floor", False, False),
    }
    for label, (lib, dora, off) in specs.items():
        model = _fixtures.load_base(args)
        ids = ids if ids is not None else _fixtures.random_ids(args, model.config.vocab_size)
        if lib == "floor":
            _fixtures.make_floor(model)
        else:
            model, _ = _fixtures.add_lora(model, lib, args.adapter_set, 0.05, use_dora=dora)
        model.train()
        train = _fixtures.training_step(model, ids)

        def step(train=train, off=off) -> None:
            with lorakit.kernels.disabled() if off else contextlib.nullcontext():
                train()

        rows[label] = step
    return rows


def _inference_rows(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    import torch

    import lorakit

    ids = None
    rows: dict[str, Callable[[], None]] = {}
    for label in ("base", "lorakit unmerged", "PEFT unmerged", "lorakit merged"):
        model = _fixtures.load_base(args)
        ids = ids if ids is not None else _fixtures.random_ids(args, model.config.vocab_size)
        if label != "base":
            model, _ = _fixtures.add_lora(
                model, "peft" if label.startswith("PEFT") else "lorakit", args.adapter_set, 0.0
            )
        if label == "lorakit merged":
            lorakit.merge(model)
        model.eval()

        def step(model=model, ids=ids) -> None:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)

        rows[label] = step
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["train", "dora", "inference"], required=True)
    parser.add_argument("--adapter-set", choices=sorted(_flags.ADAPTER_SETS), default="all16")
    parser.add_argument("--pairs", type=int, default=6, help="rounds of one step per configuration")
    parser.add_argument("--batch", type=int, default=None, help="default: 4 (train), 8 (inference)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument(
        "--baseline", metavar="REV", help="train mode: add a row for lorakit as of this git revision (e.g. HEAD~3)"
    )
    args = parser.parse_args()
    args.batch = args.batch or (8 if args.mode == "inference" else 4)
    args.device, args.dtype = "cpu", "fp32"

    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    rows = {"train": _train_rows, "dora": _dora_rows, "inference": _inference_rows}[args.mode](args)
    reference = next(iter(rows))
    for step in rows.values():  # warm-up: two steps each
        step()
        step()
    times: dict[str, list[float]] = {label: [] for label in rows}
    order = list(rows)
    for i in range(args.pairs):
        for label in order if i % 2 == 0 else reversed(order):
            started = time.perf_counter()
            rows[label]()
            times[label].append(time.perf_counter() - started)
    lines, summary = [], {}
    for label, ts in times.items():
        ratios = [t / r for t, r in zip(ts, times[reference], strict=True)]
        summary[label] = {
            "ms": [t * 1e3 for t in ts],
            "median_ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "min_ratio": min(ts) / min(times[reference]),
        }
        lines.append(
            [
                label,
                f"{statistics.median(ts) * 1e3:.0f}",
                f"{min(ts) * 1e3:.0f}",
                f"{statistics.median(ratios):.2f}×",
                f"{min(ratios):.2f}–{max(ratios):.2f}×",
                f"{summary[label]['min_ratio']:.2f}×",
            ]
        )
    what = "no-grad forward" if args.mode == "inference" else "training step"
    title = (
        f"{_flags.MODEL}, {what}, batch {args.batch}×{args.seq}, {_flags.ADAPTER_SET_LABELS[args.adapter_set]}, "
        f"{args.threads} threads, {args.pairs} rounds, all configurations in one process"
    )
    headers = [
        "configuration",
        "step ms (median)",
        "step ms (fastest)",
        f"vs {reference} (median of per-round ratios)",
        "range",
        f"vs {reference} (fastest / fastest)",
    ]
    _report.report_in_process(args, title, headers, lines, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
