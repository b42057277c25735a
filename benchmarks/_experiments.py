"""What the two paper experiments (`e2e.py`, `glue.py`) share: one training loop, PEFT set-up, sizes, tables.

The loop is `lorakit.train.fit`'s optimizer step built from the same public parts (`build_optimizer`,
`build_scheduler`, `loss_sum`, `count_targets`, `iterate_batches`; one batch per step, no DDP) for
one reason: `fit` trains and saves a *lorakit* adapter and refuses a model without one, and these
experiments must train a PEFT model and a fully fine-tuned model through the very same loop, so
that only the LoRA implementation (or its absence) differs between methods. Same optimizer groups
(AdamW, no decay on < 2-D parameters), same warmup/decay schedule, same token-normalised
label-smoothed loss, same seeding point (after the optimizer is built) and same batch order.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import lorakit
from lorakit.data import ClassificationDataset, TokenizedDataset, iterate_batches, num_batches
from lorakit.errors import TrainingError
from lorakit.io import atomic_write
from lorakit.train import TrainConfig, build_optimizer, build_scheduler, count_targets, loss_sum
from lorakit.train.loss import logits_of


def seed_everything(seed: int) -> None:
    """Seed `random`, numpy and torch (CPU and CUDA), as `fit` does at the start of a fresh run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainStats:
    """What one training run did.

    Attributes:
        steps: optimizer steps taken.
        losses: the token-normalised (label-smoothed) training loss of every step.
        seconds: wall time of all steps (data collation included, model loading not).
        seconds_per_step: median wall time of one step, the first (warm-up) step left out.
        step_seconds: wall time of every step.
    """

    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    step_seconds: list[float] = field(default_factory=list)


def total_steps(dataset: TokenizedDataset | ClassificationDataset, cfg: TrainConfig) -> int:
    """Optimizer steps of a run: `cfg.max_steps`, else `cfg.epochs` passes over `dataset`."""
    per_epoch = num_batches(dataset, cfg.batch_size)
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch


def train(
    model: nn.Module,
    dataset: TokenizedDataset | ClassificationDataset,
    cfg: TrainConfig,
    *,
    log_every: int = 50,
    label: str = "train",
) -> TrainStats:
    """Train the parameters of `model` that require grad, one batch per step (see the module docstring).

    Args:
        model: any model (lorakit-injected, a PEFT model, or a plain one for full fine-tuning),
            already on its device.
        dataset: from `tokenize_examples` (token labels) or `tokenize_classification` (class labels).
        cfg: lr, weight decay, warmup, schedule, max_steps/epochs, batch size, max_grad_norm, seed
            and label smoothing are used; `grad_accum` must be 1.
        log_every: print the loss every this many steps.
        label: prefix of the log lines.

    Returns:
        Steps, per-step losses and timings.

    Raises:
        TrainingError: a non-finite loss or gradient norm (the bad update is not applied).
    """
    if cfg.grad_accum != 1:
        raise TrainingError("these experiments take one batch per step; set grad_accum=1")
    torch.set_flush_denormal(True)  # DESIGN.md: CPU steps slow down 4x once values turn denormal.
    steps = total_steps(dataset, cfg)
    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    seed_everything(cfg.seed)  # fit seeds here too: after building the optimizer, before step 1
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
    stats = TrainStats(steps=0)
    durations: list[float] = []
    epoch = 0
    started_all = time.perf_counter()
    while stats.steps < steps:
        for batch in iterate_batches(dataset, cfg.batch_size, seed=cfg.seed, epoch=epoch):
            started = time.perf_counter()
            batch = {key: value.to(device) for key, value in batch.items()}
            labels = batch.pop("labels")
            targets = max(count_targets(labels), 1)
            summed = loss_sum(logits_of(model(**batch)), labels, cfg.label_smoothing)
            loss = float(summed.detach()) / targets
            if not math.isfinite(loss):
                raise TrainingError(f"{label}: loss became {loss} at step {stats.steps + 1}; lower the lr")
            (summed / targets).backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
            if not math.isfinite(grad_norm):
                raise TrainingError(f"{label}: gradient norm became {grad_norm} at step {stats.steps + 1}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            durations.append(time.perf_counter() - started)
            stats.steps += 1
            stats.losses.append(loss)
            if stats.steps % log_every == 0 or stats.steps == steps:
                recent = stats.losses[-log_every:]
                print(
                    f"  {label} step {stats.steps}/{steps}: loss {sum(recent) / len(recent):.4f} "
                    f"({durations[-1]:.2f} s/step)",
                    flush=True,
                )
            if stats.steps == steps:
                break
        epoch += 1
    stats.seconds = time.perf_counter() - started_all
    stats.step_seconds = durations
    timed = sorted(durations[1:] or durations)
    stats.seconds_per_step = timed[len(timed) // 2]
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


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as a safetensors file would hold them (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel() * param.element_size()
    return total


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


def save_trained(method: str, model: nn.Module, folder: Path) -> int:
    """Write a LoRA method's adapter to `folder/adapter` and return its size in bytes; for full
    fine-tuning, the model's weight bytes (the whole model is the "adapter"; not written)."""
    if method == "lora":
        return directory_bytes(lorakit.save_adapter(model, folder / "adapter"))
    if method == "peft":
        model.save_pretrained(str(folder / "adapter"), save_embedding_layers=False)
        return directory_bytes(folder / "adapter")
    return weights_bytes(model)


def directory_bytes(path: Path) -> int:
    """Total size of the files directly in `path`."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_text(path: Path, text: str) -> None:
    """Write text atomically."""
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers are expected to be formatted already."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


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
    write_json(path, merged)
    return merged
