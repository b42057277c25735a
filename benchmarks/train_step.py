"""How long does one LoRA training step take, and how much memory, against the frozen-model floor?

Rows (each in a fresh process, interleaved over repeats):

- full fine-tuning: every weight trains, AdamW over all of them.
- floor: every weight frozen, no optimiser; the input embeddings' output requires grad, so the
  backward still runs through every layer (input gradients only). No LoRA step can cost less.
- PEFT / lorakit LoRA r=8 on q,v and r=16 on all seven linear layers per block, dropout 0.05,
  AdamW over A and B; B drawn small and random (not zero) so the branch does real work.
- lorakit r=8 q,v (the first of `--adapter-sets`) under `torch.compile` (first-step compile
  time and graph breaks reported; a compile failure is reported in the row, not raised).
- with `--baseline REV`: every lorakit row again, in children that import lorakit as of git
  revision REV — a change's time and peak memory before and after, in the same run.

Every row runs `lorakit.train.train_step`, what `fit` runs each step (token-normalised loss,
clipping at 1.0, PyTorch's fused AdamW from `build_optimizer`): the loop and optimiser are the
caller's choice, not the LoRA implementation's, so all rows get the same ones.

Usage:
    .venv/bin/python benchmarks/train_step.py            # full size (SmolLM2-135M, batch 4×128)
    .venv/bin/python benchmarks/train_step.py --quick    # ~1 minute smoke run
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import _children
import _fixtures
import _flags
import _measure
import _report

DROPOUT = 0.05
LR = 1e-5

FULL = _flags.Sizes(batch=4, seq=128, layers=None, warmup=2, steps=5, repeats=3)
QUICK = _flags.Sizes(batch=4, seq=64, layers=2, warmup=1, steps=3, repeats=1)


def rows_for(args: argparse.Namespace) -> list[_flags.Row]:
    rows = [
        _flags.Row("full", "full fine-tuning", {"kind": "full"}),
        _flags.Row("floor", "floor: frozen, input-gradient backward, no optimiser", {"kind": "floor"}),
    ]
    for aset in args.adapter_sets:
        for lib in ("peft", "lorakit"):
            label = (
                f"{'PEFT' if lib == 'peft' else 'lorakit'} LoRA {_flags.ADAPTER_SET_LABELS[aset]}, dropout {DROPOUT}"
            )
            rows.append(_flags.Row(f"{lib}-{aset}", label, {"kind": lib, "adapters": aset}))
    if args.compile:
        aset = args.adapter_sets[0]
        rows.append(_flags.compile_row(aset, f"lorakit LoRA {_flags.ADAPTER_SET_LABELS[aset]}, dropout {DROPOUT}"))
    return rows + _flags.baseline_rows(args, rows)


def run_row(args: argparse.Namespace, row: _flags.Row) -> dict[str, Any]:

    model = _fixtures.load_base(args)
    kind = row.params["kind"]
    extra: dict[str, Any] = {}
    if kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif kind == "floor":
        _fixtures.make_floor(model)  # the frozen model's own backward: input gradients only, every layer
    elif kind in ("peft", "lorakit"):
        model, extra["lora_B_tensors"] = _fixtures.add_lora(model, kind, row.params["adapters"], DROPOUT)
    else:
        raise ValueError(kind)

    model.train()
    extra["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids = _fixtures.random_ids(args, model.config.vocab_size)
    compiled = _measure.maybe_compile(model, row, args)
    step = _fixtures.training_step(compiled, ids, LR)
    return {**_measure.measure_row(step, args, row), **extra}


def report(args: argparse.Namespace, rows: list[_flags.Row], s: dict[str, dict]) -> str:
    floor = s.get("floor", {})
    floor_ms = floor.get("ms", {}).get("step")
    floor_mib = floor.get("peak_mib")
    mem = "peak MiB" if args.device == "cuda" else "peak RSS MiB"
    headers = ["configuration", "step ms", "vs floor", "lorakit / PEFT", mem, "mem vs floor", "trainable", "spread"]
    notes: list[str] = []

    def line(row: _flags.Row, r: dict) -> list:
        ms = r["ms"]["step"]
        vs_peft = "–"
        if row.params.get("kind") == "lorakit":
            vs_peft = _report.fmt_ratio(_report.ratio(ms, _report.ms_of(s, f"peft-{row.params['adapters']}")))
        return [
            _report.row_label(row, r, notes),
            _report.fmt_ms(ms),
            _report.fmt_ratio(_report.ratio(ms, floor_ms)),
            vs_peft,
            _report.fmt_mib(r["peak_mib"]),
            _report.fmt_ratio(_report.ratio(r["peak_mib"], floor_mib)),
            f"{r.get('trainable_params', 0):,}",
            _report.fmt_spread(r),
        ]

    lines = _report.table_lines(rows, s, len(headers), line)
    text = _report.describe_settings(args, f"; fused AdamW lr {LR} on the trainable parameters") + "\n\n"
    text += _report.markdown_table(headers, lines)
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text


def main() -> int:
    parser = _flags.make_parser(__doc__, FULL, QUICK)
    _flags.add_adapter_set_flag(parser)
    _flags.add_compile_flag(parser)
    _flags.add_baseline_flag(parser)
    return _children.main(__file__, parser, rows_for, run_row, report)


if __name__ == "__main__":
    sys.exit(main())
