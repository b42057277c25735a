"""How long do merging an adapter into the weights, and unmerging it again, take?

For r=8 on q,v and r=16 on all seven linear layers per block, lorakit against PEFT, each in a
fresh process: one loop step is merge (timed) then unmerge (timed), repeated; the medians are
reported. lorakit: `lorakit.merge(model)` / `lorakit.unmerge(model)`; PEFT:
`model.merge_adapter()` / `model.unmerge_adapter()`. B is random (not zero), as after training.

Usage:
    .venv/bin/python benchmarks/merge_time.py            # full size (all 30 layers)
    .venv/bin/python benchmarks/merge_time.py --quick    # ~1 minute smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import _children
import _fixtures
import _flags
import _measure
import _report

# batch/seq are unused here (no forward); layers: merging all 30 is cheap, so --quick keeps them.
FULL = _flags.Sizes(batch=1, seq=1, layers=None, warmup=2, steps=20, repeats=3)
QUICK = _flags.Sizes(batch=1, seq=1, layers=None, warmup=1, steps=5, repeats=1)


def rows_for(args: argparse.Namespace) -> list[_flags.Row]:
    rows = []
    for aset in args.adapter_sets:
        for lib, name in (("peft", "PEFT"), ("lorakit", "lorakit")):
            rows.append(
                _flags.Row(
                    f"{lib}-{aset}", f"{name}, {_flags.ADAPTER_SET_LABELS[aset]}", {"kind": lib, "adapters": aset}
                )
            )
    return rows


def run_row(args: argparse.Namespace, row: _flags.Row) -> dict[str, Any]:
    model = _fixtures.load_base(args)
    aset = row.params["adapters"]
    if row.params["kind"] == "peft":
        import peft

        model = peft.get_peft_model(model, _fixtures.lora_configs("peft", aset, 0.0))
        merge, unmerge = model.base_model.merge_adapter, model.base_model.unmerge_adapter
    else:
        import lorakit

        lorakit.inject(model, _fixtures.lora_configs("lorakit", aset, 0.0))

        def merge() -> None:
            lorakit.merge(model)

        def unmerge() -> None:
            lorakit.unmerge(model)

    n_b = _fixtures.randomize_lora_B(model)
    model.eval()
    probe = _probe_weight(model)
    before = probe.detach().clone()

    def timed(fn) -> float:
        _measure.sync(args.device)
        t0 = time.perf_counter()
        fn()
        _measure.sync(args.device)
        return time.perf_counter() - t0

    result: dict[str, Any] = {"peak_since_setup": _measure.reset_peak(args.device)}
    for _ in range(args.warmup):
        merge()
        unmerge()
    merges, unmerges, changed = [], [], True
    for _ in range(args.steps):
        merges.append(timed(merge))
        changed = changed and not _same(probe, before)  # merge really wrote ΔW into the weight
        unmerges.append(timed(unmerge))
    result.update(
        timings={"merge": merges, "unmerge": unmerges},
        peak_mib=_measure.peak_mib(args.device),
        process_peak_mib=_measure.process_peak_mib(),
        lora_B_tensors=n_b,
        merge_changed_weight=changed,
        unmerge_max_abs_drift=float((probe.detach().float() - before.float()).abs().max()),
    )
    return result


def _probe_weight(model):
    # The first adapted q_proj's base weight, whatever the wrapper calls its base layer.
    for name, p in model.named_parameters():
        if name.endswith("q_proj.base_layer.weight"):
            return p
    raise RuntimeError("no adapted q_proj base weight found")


def _same(a, b) -> bool:
    import torch

    return bool(torch.equal(a.detach(), b))


def report(args: argparse.Namespace, rows: list[_flags.Row], s: dict[str, dict]) -> str:
    headers = [
        "configuration",
        "merge ms",
        "unmerge ms",
        "lorakit / PEFT (merge)",
        "lorakit / PEFT (unmerge)",
        "spread",
    ]
    notes: list[str] = []

    def line(row: _flags.Row, r: dict) -> list:
        m, u = r["ms"]["merge"], r["ms"]["unmerge"]
        vs_m = vs_u = "–"
        if row.params["kind"] == "lorakit":
            peft = row.name.replace("lorakit-", "peft-", 1)
            vs_m = _report.fmt_ratio(_report.ratio(m, _report.ms_of(s, peft, "merge")))
            vs_u = _report.fmt_ratio(_report.ratio(u, _report.ms_of(s, peft, "unmerge")))
        if r.get("merge_changed_weight") is False:
            notes.append(f"`{row.name}`: merge did not change the probed weight (is B zero?)")
        notes.append(f"`{row.name}`: max |W after unmerge − W0| = {r.get('unmerge_max_abs_drift', float('nan')):.2e}")
        return [row.label, _report.fmt_ms(m), _report.fmt_ms(u), vs_m, vs_u, _report.fmt_spread(r, "merge", "unmerge")]

    lines = _report.table_lines(rows, s, len(headers), line)
    layers = args.layers if args.layers is not None else 30
    settings = (
        f"smollm2-135m ({layers} of 30 layers), {args.dtype}, {args.device}, {args.threads} threads, "
        f"median of {args.steps} merge/unmerge pairs after {args.warmup} warm-up, "
        f"median over {args.repeats} repeat(s), each row in a fresh process"
    )
    return settings + "\n\n" + _report.markdown_table(headers, lines) + "\n\n" + "\n".join(notes)


def main() -> int:
    parser = _flags.make_parser(__doc__, FULL, QUICK)
    _flags.add_adapter_set_flag(parser)
    return _children.main(__file__, parser, rows_for, run_row, report)


if __name__ == "__main__":
    sys.exit(main())
