"""What does serving several adapters in one batch cost, against one adapter for the whole batch?

Every adapter row holds the same 16 adapters (different random A and B), so the rows differ only
in how the batch is routed. A no-grad forward in eval mode; batch 16×64 (16 rows, so that 16
adapters get one row each; the same 1024 tokens as 8×128). Rows, each in a fresh process:

- base: the model without adapters (reference).
- single: one adapter active for the whole batch (the plain forward): the reference of ratios.
- per-row, 1 adapter: the per-row API with every row naming the same adapter (its overhead alone).
- per-row, 4 / 16 adapters: row i uses adapter i mod k.

lorakit routes rows with `with lorakit.adapter_per_row(model, names): model(ids)`; PEFT with
`model(input_ids=ids, adapter_names=names)`.

Usage:
    .venv/bin/python benchmarks/mixed_batch.py            # full size
    .venv/bin/python benchmarks/mixed_batch.py --quick    # ~1 minute smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import _children
import _fixtures
import _flags
import _measure
import _report

N_ADAPTERS = 16
DROPOUT = 0.05  # as trained; a no-op in eval mode
MIXES = (1, 4, 16)

FULL = _flags.Sizes(batch=16, seq=64, layers=None, warmup=2, steps=10, repeats=3)
QUICK = _flags.Sizes(batch=16, seq=32, layers=2, warmup=1, steps=3, repeats=1)


def rows_for(args: argparse.Namespace) -> list[_flags.Row]:
    rows = [_flags.Row("base", "base model (no adapters)", {"kind": "base"})]
    for aset in args.adapter_sets:
        label = _flags.ADAPTER_SET_LABELS[aset]
        for lib, name in (("peft", "PEFT"), ("lorakit", "lorakit")):
            rows.append(
                _flags.Row(
                    f"{lib}-{aset}-single",
                    f"{name}, {label}: single adapter",
                    {"kind": lib, "adapters": aset, "mix": 0},
                )
            )
            for k in MIXES:
                what = "1 adapter" if k == 1 else f"{k} adapters"
                rows.append(
                    _flags.Row(
                        f"{lib}-{aset}-mix{k}",
                        f"{name}, {label}: per-row, {what}",
                        {"kind": lib, "adapters": aset, "mix": k},
                    )
                )
    return rows


def run_row(args: argparse.Namespace, row: _flags.Row) -> dict[str, Any]:
    import torch

    model = _fixtures.load_base(args)
    kind = row.params["kind"]
    mix = row.params.get("mix", 0)
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    if mix and args.batch < mix:
        raise SystemExit(f"--batch {args.batch} is smaller than {mix} adapters: each needs a row")
    per_row = [names[i % mix] for i in range(args.batch)] if mix else None
    extra: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    context = contextlib.nullcontext
    if kind == "peft":
        import peft

        aset = row.params["adapters"]
        model = peft.get_peft_model(model, _fixtures.lora_configs("peft", aset, DROPOUT), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, _fixtures.lora_configs("peft", aset, DROPOUT))
        model.set_adapter(names[0])
        if per_row:
            kwargs["adapter_names"] = per_row
    elif kind == "lorakit":
        import lorakit

        aset = row.params["adapters"]
        for name in names:
            lorakit.inject(model, _fixtures.lora_configs("lorakit", aset, DROPOUT), adapter_name=name)
        lorakit.set_adapter(model, names[0])
        if per_row:

            def context():
                return lorakit.adapter_per_row(model, per_row)

    if kind != "base":
        extra["lora_B_tensors"] = _fixtures.randomize_lora_B(model)
    model.eval()
    ids = _fixtures.random_ids(args, model.config.vocab_size)

    def step() -> None:
        with torch.no_grad(), context():
            model(input_ids=ids, use_cache=False, **kwargs)

    return {**_measure.measure_row(step, args, row), **extra}


def report(args: argparse.Namespace, rows: list[_flags.Row], s: dict[str, dict]) -> str:
    base_ms = _report.ms_of(s, "base")
    headers = ["configuration", "forward ms", "vs single adapter", "vs base", "lorakit / PEFT", "spread"]
    notes: list[str] = []

    def line(row: _flags.Row, r: dict) -> list:
        ms = r["ms"]["step"]
        vs_single = vs_peft = "–"
        if row.params["kind"] != "base":
            lib, aset = row.params["kind"], row.params["adapters"]
            vs_single = _report.fmt_ratio(_report.ratio(ms, _report.ms_of(s, f"{lib}-{aset}-single")))
            if lib == "lorakit":
                vs_peft = _report.fmt_ratio(
                    _report.ratio(ms, _report.ms_of(s, row.name.replace("lorakit-", "peft-", 1)))
                )
        ratio_base = _report.fmt_ratio(_report.ratio(ms, base_ms))
        return [
            _report.row_label(row, r, notes),
            _report.fmt_ms(ms),
            vs_single,
            ratio_base,
            vs_peft,
            _report.fmt_spread(r),
        ]

    lines = _report.table_lines(rows, s, len(headers), line)
    extra = f"; torch.no_grad, eval mode; {N_ADAPTERS} adapters loaded in every adapter row"
    return _report.describe_settings(args, extra) + "\n\n" + _report.markdown_table(headers, lines)


def main() -> int:
    parser = _flags.make_parser(__doc__, FULL, QUICK)
    _flags.add_adapter_set_flag(parser, full="qv8,all16", quick="qv8")
    return _children.main(__file__, parser, rows_for, run_row, report)


if __name__ == "__main__":
    sys.exit(main())
