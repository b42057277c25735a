"""What the two paper experiments (`e2e.py`, `glue.py`) share: training through `fit`, PEFT set-up, data, tables.

Every method trains through `lorakit.train.fit` — a lorakit adapter, a PEFT model and a fully
fine-tuned model alike (`fit` trains whatever requires grad when the model carries no lorakit
adapter) — so only the LoRA implementation, or its absence, differs between methods: same
optimizer groups (AdamW, no decay on < 2-D parameters), same warmup/decay schedule, same
token-normalised label-smoothed loss, same seeding point and the same batch order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit import atomic
from lorakit.data import ClassificationDataset, TokenizedDataset, iterate_batches, num_batches
from lorakit.train import TrainConfig, fit

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""Default of `--data-dir`: the shared datasets beside the repository (`../shared/data`)."""


def add_data_dir_flag(parser: argparse.ArgumentParser) -> None:
    """`--data-dir DIR`: where the datasets are (default `../shared/data` beside the repository)."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DATA_DIR,
        help=f"folder holding the datasets (e2e/, glue/), default {DATA_DIR}",
    )


def data_file(data_dir: Path, *parts: str) -> Path:
    """`data_dir/parts...`, or exit with a message saying what is missing and how to point at it.

    Raises:
        SystemExit: the folder or the file does not exist.
    """
    if not data_dir.is_dir():
        raise SystemExit(
            f"data directory {data_dir} not found: pass --data-dir with the folder that holds {'/'.join(parts)} "
            "(the shared datasets, see benchmarks/README.md)"
        )
    path = data_dir.joinpath(*parts)
    if not path.is_file():
        raise SystemExit(f"{path} not found in --data-dir {data_dir}: the folder must hold {'/'.join(parts)}")
    return path


@dataclass
class TrainStats:
    """What one training run did.

    Attributes:
        steps: optimizer steps taken.
        losses: the token-normalised (label-smoothed) training loss of every step.
        seconds: wall time of all steps (data collation included, model loading not).
        seconds_per_step: median wall time of one step, the first (warm-up) step left out.
        step_seconds: wall time of every step.
        saved: what `fit` saved: the adapter directory (lorakit) or the model directory (others).
    """

    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    saved: Path | None = None


def total_steps(dataset: TokenizedDataset | ClassificationDataset, cfg: TrainConfig) -> int:
    """Optimizer steps of a run: `cfg.max_steps`, else `cfg.epochs` passes over `dataset`."""
    per_epoch = num_batches(dataset, cfg.batch_size)
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch


def train(
    model: nn.Module,
    dataset: TokenizedDataset | ClassificationDataset,
    cfg: TrainConfig,
    folder: Path,
    *,
    log_every: int = 50,
    label: str = "train",
) -> TrainStats:
    """Train the parameters of `model` that require grad with `fit`, into `folder`.

    Args:
        model: any model (lorakit-injected, a PEFT model, or a plain one for full fine-tuning),
            already on its device.
        dataset: from `tokenize_examples` (token labels) or `tokenize_classification` (class labels).
        cfg: the run's `TrainConfig`.
        folder: `fit`'s output directory (metrics.jsonl, and adapter/ or model/).
        log_every: print the loss every this many steps.
        label: prefix of the log lines.

    Returns:
        Steps, per-step losses and timings, and what was saved.
    """
    steps = total_steps(dataset, cfg)
    stats = TrainStats(steps=0)

    def batches(epoch: int, start: int):
        return iterate_batches(dataset, cfg.batch_size, seed=cfg.seed, epoch=epoch, start=start)

    def on_step(step: int, record: dict[str, Any]) -> None:
        stats.steps = step
        stats.losses.append(record["loss"])
        stats.step_seconds.append(record["seconds"])
        if step % log_every == 0 or step == steps:
            recent = stats.losses[-log_every:]
            print(
                f"  {label} step {step}/{steps}: loss {sum(recent) / len(recent):.4f} ({record['seconds']:.2f} s/step)",
                flush=True,
            )

    result = fit(
        model,
        batches,
        cfg,
        folder,
        batches_per_epoch=num_batches(dataset, cfg.batch_size),
        on_step=on_step,
        progress=False,
    )
    stats.seconds = sum(stats.step_seconds)
    stats.seconds_per_step = statistics.median(stats.step_seconds[1:] or stats.step_seconds)
    stats.saved = result.adapter_dir or result.model_dir
    return stats


def peft_from_lorakit(model: nn.Module, config: lorakit.LoraConfig, seed: int, init_dir: Path) -> nn.Module:
    """A trainable PEFT LoRA model that starts exactly where lorakit's would, built on `model`.

    Injects lorakit's adapter after `torch.manual_seed(seed)` (as the lorakit run does), writes it
    to `init_dir` in PEFT's format, removes it again and loads that file with
    `peft.PeftModel.from_pretrained(..., is_trainable=True)`: the same A (and B = 0, and the same
    `modules_to_save` copies) in PEFT's own layers, which then train with PEFT's code.

    Args:
        model: the base model (untouched by lorakit so far).
        config: the LoRA config the lorakit run uses.
        seed: the seed the lorakit run injects under.
        init_dir: where the initial adapter is written.

    Returns:
        The `PeftModel`.
    """
    from peft import PeftModel

    torch.manual_seed(seed)
    lorakit.inject(model, config)
    lorakit.save_adapter(model, init_dir)
    lorakit.unload(model)
    return PeftModel.from_pretrained(model, str(init_dir), is_trainable=True)


LORAKIT_VARIANTS = ("lora", "qlora", "dora", "qdora")
"""The lorakit methods `set_up_method` builds: LoRA, over an NF4 base, DoRA, DoRA over an NF4 base."""


def set_up_method(
    method: str, model: nn.Module, config: lorakit.LoraConfig, seed: int, folder: Path, device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """`method` on a freshly loaded model: `lora` (lorakit, injected after seeding), `qlora` (the
    same over the base quantized to NF4 first, `lorakit.quantize`), `dora` (the same config with
    `use_dora=True`), `qdora` (both), `peft` (PEFT, from lorakit's initial adapter,
    `peft_from_lorakit`), `full` (every weight as loaded trains) or `base` (nothing trains). Every
    lorakit variant seeds the same way before `inject`, so all start from the same A.

    Returns:
        (the model on `device`, {"trainable_parameters", and "init_lora_A_abs_sum" for LoRA}).
    """
    result: dict[str, Any] = {}
    if method in LORAKIT_VARIANTS:
        if method in ("qlora", "qdora"):
            lorakit.quantize(model.to(device), "nf4")  # quantized where it will run
        if method in ("dora", "qdora"):
            config = dataclasses.replace(config, use_dora=True)
        torch.manual_seed(seed)
        lorakit.inject(model, config)
        result["init_lora_A_abs_sum"] = lora_a_checksum(model)
    elif method == "peft":
        model = peft_from_lorakit(model, config, seed, folder / "init_adapter")
        result["init_lora_A_abs_sum"] = lora_a_checksum(model)
    model.to(device)
    trainable, _ = lorakit.trainable_parameters(model)
    result["trainable_parameters"] = trainable if method != "base" else 0
    return model, result


def run_methods(args: argparse.Namespace, run_method) -> dict[str, Any]:
    """{method: run_method(method) with the run's settings} for each of `args.methods`."""
    settings = {k: v for k, v in vars(args).items() if k != "methods"}
    return {method: {**run_method(method), "settings": settings} for method in args.methods}


def finish(out: Path, update: dict[str, Any], table) -> tuple[dict[str, Any], str]:
    """Merge `update` into `out/results.json`, write `table(results)` to `out/table.md` and print it.

    Returns:
        (all results, the table text).
    """
    results = merge_results(out / "results.json", update)
    text = table(results)
    atomic.write_text(out / "table.md", text + "\n")
    print()
    print(text)
    return results, text


def lora_a_checksum(model: nn.Module) -> float:
    """Sum of |A| over every LoRA A matrix (lorakit's or PEFT's), to show two runs start alike."""
    total = 0.0
    for name, param in model.named_parameters():
        if "lora_A" in name.split("."):  # lorakit: ...adapters.<name>.lora_A; PEFT: ...lora_A.<name>.weight
            total += float(param.detach().double().abs().sum())
    return total


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`, tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def train_record(stats: TrainStats, dataset: TokenizedDataset | ClassificationDataset, cfg: TrainConfig) -> dict:
    """What results.json keeps of one training run."""
    return dict(
        train_rows=len(dataset),
        train_truncated=dataset.truncated,
        train=cfg.to_dict(),
        steps=stats.steps,
        train_seconds=stats.seconds,
        seconds_per_step=stats.seconds_per_step,
        step_seconds=stats.step_seconds,
        final_loss=sum(stats.losses[-50:]) / len(stats.losses[-50:]),
        losses=stats.losses,
    )


def directory_bytes(path: Path) -> int:
    """Total size of the files directly in `path`."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def human_bytes(size: int | None) -> str:
    """`1.23 MB` style (decimal units), or `-`."""
    if size is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def human_count(count: int | None) -> str:
    """`0.23M` style, or `-`."""
    return "-" if count is None else f"{count / 1e6:.2f}M"


def setup_device(device: str, threads: int | None) -> torch.device:
    """The torch device for `--device`, with CPU threads and TF32 matmuls on CUDA set.

    Raises:
        SystemExit: `cuda` was asked for and no GPU is visible.
    """
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(device)


def release_memory() -> None:
    """Collect garbage and return cached GPU memory (call after dropping a method's model)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment() -> dict[str, Any]:
    """Versions and machine facts for the results file."""
    import platform

    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lorakit": lorakit.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_problems(args: argparse.Namespace, known_methods: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the chosen methods, every problem with the flags both experiments share).

    Checks `--methods` against `known_methods`, the sizes (`--train-size`, `--eval-size`,
    `--max-steps`, `--epochs`: ≥ 1 when set) and that the run has a length.
    """
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known_methods]
    problems = [f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(known_methods)}"] if unknown else []
    for flag in ("train_size", "eval_size", "max_steps", "epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.max_steps is None and args.epochs is None:
        problems.append("set --max-steps or --epochs")
    return methods, problems


def parse_with_preset(parser: Any, presets: dict[str, dict[str, Any]], argv: Sequence[str] | None = None) -> Any:
    """Parse flags where `--preset NAME` supplies defaults and any flag given explicitly wins.

    Args:
        parser: an `argparse.ArgumentParser` that has a `--preset` option with `choices=presets`.
        presets: preset name -> {argparse dest: value}.
        argv: the arguments (default `sys.argv[1:]`).

    Returns:
        The parsed namespace.
    """
    first, _ = parser.parse_known_args(argv)
    parser.set_defaults(**presets[first.preset])
    return parser.parse_args(argv)


def merge_results(path: Path, update: dict[str, Any]) -> dict[str, Any]:
    """Merge a run's results into `path` (kept methods from earlier runs are overwritten per method).

    Runs of single methods into the same `--out` (e.g. `--methods lora`, then `--methods full`)
    thus build one results file; each method entry keeps the settings it ran with.
    """
    old: dict[str, Any] = {}
    if Path(path).is_file():
        try:
            old = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
    methods = {**old.get("methods", {}), **update.get("methods", {})}
    merged = {**old, **update, "methods": methods}
    atomic.write_json(path, merged)
    return merged
