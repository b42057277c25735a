"""How much does an unmerged adapter slow inference down, and is a merged one free?

Rows (each in a fresh process, interleaved over repeats), a no-grad forward of batch 8×128 in
eval mode (dropout off), for r=8 on q,v and r=16 on all seven linear layers per block:

- base: the model without adapters (the reference of every ratio).
- PEFT unmerged: `get_peft_model`, the LoRA branch computed in every forward.
- lorakit unmerged: `lorakit.inject`, likewise.
- lorakit merged: `lorakit.merge` (ΔW added into W0): the same graph as the base model.
- lorakit unmerged under `torch.compile` (compile time and graph breaks reported; a compile
  failure is reported in the row).

B is drawn small and random (not zero), so the branch does real work.

Usage:
    .venv/bin/python benchmarks/inference.py            # full size
    .venv/bin/python benchmarks/inference.py --quick    # ~1 minute smoke run
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

DROPOUT = 0.05  # as trained; a no-op in eval mode, but the module is there as in real use

FULL = _flags.Sizes(batch=8, seq=128, layers=None, warmup=2, steps=10, repeats=3)
QUICK = _flags.Sizes(batch=8, seq=64, layers=2, warmup=1, steps=3, repeats=1)


def rows_for(args: argparse.Namespace) -> list[_flags.Row]:
    rows = [_flags.Row("base", "base model", {"kind": "base"})]
    for aset in args.adapter_sets:
        label = _flags.ADAPTER_SET_LABELS[aset]
        rows += [
            _flags.Row(f"peft-{aset}", f"PEFT unmerged, {label}", {"kind": "peft", "adapters": aset}),
            _flags.Row(f"lorakit-{aset}", f"lorakit unmerged, {label}", {"kind": "lorakit", "adapters": aset}),
            _flags.Row(
                f"lorakit-{aset}-merged",
                f"lorakit merged, {label}",
                {"kind": "lorakit", "adapters": aset, "merged": True},
            ),
        ]
        if args.compile:
            rows.append(_flags.compile_row(aset, f"lorakit unmerged, {label}"))
    return rows


def run_row(args: argparse.Namespace, row: _flags.Row) -> dict[str, Any]:
    import torch

    model = _fixtures.load_base(args)
    kind = row.params["kind"]
    extra: dict[str, Any] = {}
    if kind in ("peft", "lorakit"):
        model, extra["lora_B_tensors"] = _fixtures.add_lora(model, kind, row.params["adapters"], DROPOUT)
        if row.params.get("merged"):
            import lorakit

            lorakit.merge(model)
    model.eval()
    ids = _fixtures.random_ids(args, model.config.vocab_size)
    forward = _measure.maybe_compile(model, row, args)

    def step() -> None:
        with torch.no_grad():
            forward(input_ids=ids, use_cache=False)

    return {**_measure.measure_row(step, args, row), **extra}


def report(args: argparse.Namespace, rows: list[_flags.Row], s: dict[str, dict]) -> str:
    base_ms = _report.ms_of(s, "base")
    mem = "peak MiB" if args.device == "cuda" else "peak RSS MiB"
    headers = ["configuration", "forward ms", "vs base", "lorakit / PEFT", mem, "spread"]
    notes: list[str] = []

    def line(row: _flags.Row, r: dict) -> list:
        ms = r["ms"]["step"]
        vs_peft = "–"
        if row.params.get("kind") == "lorakit":
            vs_peft = _report.fmt_ratio(_report.ratio(ms, _report.ms_of(s, f"peft-{row.params['adapters']}")))
        label, ratio_base = _report.row_label(row, r, notes), _report.fmt_ratio(_report.ratio(ms, base_ms))
        return [label, _report.fmt_ms(ms), ratio_base, vs_peft, _report.fmt_mib(r["peak_mib"]), _report.fmt_spread(r)]

    lines = _report.table_lines(rows, s, len(headers), line)
    text = (
        _report.describe_settings(args, "; torch.no_grad, eval mode") + "\n\n" + _report.markdown_table(headers, lines)
    )
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text


def main() -> int:
    parser = _flags.make_parser(__doc__, FULL, QUICK)
    _flags.add_adapter_set_flag(parser, full="qv8,all16", quick="qv8")
    _flags.add_compile_flag(parser)
    return _children.main(__file__, parser, rows_for, run_row, report)


if __name__ == "__main__":
    sys.exit(main())
