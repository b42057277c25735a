"""A whole training run around `fit`: load the model and data, inject, evaluate before and after, write files.

This is what `lorakit train` runs: the CLI builds `TrainRun`, `LoraConfig` and `TrainConfig` from
flags and TOML and calls `train_run`. Everything here is plain library code a script can call.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorakit import atomic
from lorakit import data as D
from lorakit.adapters import trainable_parameters
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, DataError
from lorakit.extras import require_extra
from lorakit.inject import inject
from lorakit.models import Task
from lorakit.state import lora_layers
from lorakit.train.config import TrainConfig

__all__ = ["TrainRun", "train_run"]

Printer = Callable[[str], None]


@dataclass
class TrainRun:
    """What a training run reads and where it writes (the hyper-parameters are `TrainConfig`'s).

    Args:
        model: base model: `smollm2-135m` (packaged default), `minilm-l6` (packaged encoder, for
            classification), a local transformers model directory, or a `.gguf` file.
        data: training data: a JSONL/JSON file (`text`, `prompt`/`completion` or chat `messages`),
            a CSV, an E2E file (official `mr,ref` CSV or the LoRA `.txt` format), a GLUE TSV for
            classification, or `e2e` (the bundled sample).
        eval_data: held-out data in the same formats (default: `e2e-dev` for `e2e`, else a
            held-out fraction of the training data).
        eval_fraction: fraction of the training data held out for eval when no eval data is given.
        task: `causal-lm`, or `classification` (a sequence-classification head, trained in full).
        num_labels: classes, for classification.
        quantize: store the base's frozen linear weights as `nf4` (QLoRA: 4-bit NormalFloat, about
            0.13× the fp32 bytes; needs lorakit[quantize]) or `bf16`; `none` keeps full precision.
        seq_len: maximum tokens per example; longer rows are cut at the end (counted in the summary).
        samples: prompts from the eval data to generate from before and after training.
        out: output directory (adapter/, checkpoints/, metrics.jsonl, loss.png, run_config.json,
            summary.json).
        resume: continue from the latest checkpoint in `out`.
        overwrite: allow writing into an `out` that already holds a run.
        threads: torch CPU threads (default: torch's choice).
        progress: show a progress bar.
    """

    model: str | None = None
    data: str = "e2e"
    eval_data: str | None = None
    eval_fraction: float = 0.1
    task: Task = "causal-lm"
    num_labels: int = 2
    quantize: Literal["none", "nf4", "bf16"] = "none"
    seq_len: int = 128
    samples: int = 2
    out: str = "runs/lorakit-train"
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None
    progress: bool = True


def train_run(run: TrainRun, lora: LoraConfig, train: TrainConfig, echo: Printer = print) -> dict[str, Any]:
    """Load model and data, inject LoRA, train with `fit`, evaluate before/after, write the run's files.

    Args:
        run: model, data and output directory.
        lora: the adapter to train (`modules_to_save` defaults to the head for classification;
            `base_model_name_or_path` to the model's name).
        train: the optimiser, schedule, batching and checkpointing.
        echo: where progress lines go (rank 0 only under torchrun).

    Returns:
        A summary dict (also written to `out/summary.json`); empty on ranks other than 0.

    Raises:
        LorakitError subclasses for bad options, data, models or files; nothing in `out` is
        overwritten unless `overwrite`/`resume` says so.
    """
    from lorakit.evaluate import loss_on
    from lorakit.models import load_model
    from lorakit.train import fit, init_distributed, is_sharded
    from lorakit.train.plot import plot_losses

    require_extra("cli", "lorakit train")
    if run.threads:
        torch.set_num_threads(run.threads)
    info = init_distributed()
    main = info.is_main
    if info.enabled and train.strategy == "fsdp" and run.quantize == "nf4":
        raise ConfigError(
            "--strategy fsdp with --quantize nf4 is not supported: lorakit does not shard NF4 weights; "
            "use --strategy ddp with an NF4 base, or --quantize bf16 with FSDP"
        )
    say = echo if main else (lambda _msg: None)
    out = _check_out(run)
    for source in (run.data, run.eval_data):
        if source and run.task != "classification":
            D.resolve_source(source)  # a missing file is reported before the model loads
    torch.manual_seed(train.seed)
    t0 = time.perf_counter()
    scheme = None if run.quantize == "none" else run.quantize
    model, tokenizer, name = load_model(run.model, task=run.task, num_labels=run.num_labels, quantize=scheme)
    stored = f"; linear weights stored as {scheme}" if scheme else ""
    say(
        f"model: {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"loaded in {time.perf_counter() - t0:.1f}s{stored})"
    )
    train_ds, eval_ds, eval_examples = _load_data(run, tokenizer, train.seed)
    truncated = train_ds.truncated
    say(
        f"data: {len(train_ds)} training rows, {len(eval_ds)} eval rows"
        + (f"; {truncated} rows truncated to seq_len={run.seq_len}" if truncated else "")
    )

    if run.task == "classification" and lora.modules_to_save is None:
        lora = dataclasses.replace(lora, modules_to_save=[_classifier_name(model)])
    if lora.base_model_name_or_path is None:
        lora = dataclasses.replace(lora, base_model_name_or_path=name)
    inject(model, lora)
    trainable, total = trainable_parameters(model)
    adapted = sum(1 for _ in lora_layers(model))
    say(
        f"LoRA: r={lora.r}, alpha={lora.lora_alpha} on {adapted} layers; trainable {trainable:,} of {total:,} "
        f"parameters ({100 * trainable / total:.3f}%)"
    )

    prompts = _distinct_prompts(eval_examples, run.samples) if run.task == "causal-lm" else []
    before_loss = loss_on(model, eval_ds, train.batch_size)
    before_samples = _samples(model, tokenizer, prompts)
    say(f"eval loss before: {before_loss:.4f}")
    for ex, text in zip(prompts, before_samples, strict=True):
        say(f"  before | {ex.prompt.strip()}\n         -> {text}")

    per_epoch = D.num_batches(train_ds, train.batch_size)
    steps = train.max_steps or math.ceil(per_epoch / train.grad_accum) * train.epochs

    def batches(epoch: int, start: int):
        return D.iterate_batches(train_ds, train.batch_size, seed=train.seed, epoch=epoch, start=start)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"eval_loss": loss_on(m, eval_ds, train.batch_size)}

    if main:
        out.mkdir(parents=True, exist_ok=True)
        if run.overwrite and not run.resume:
            # Everything is validated by now. The earlier run's checkpoints would make fit() refuse
            # to start (after run_config.json was already replaced) or a later --resume pick them up.
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        atomic.write_json(
            out / "run_config.json",
            {"run": dataclasses.asdict(run), "lora": dataclasses.asdict(lora), "train": train.to_dict()},
        )
    result = fit(
        model,
        batches,
        train,
        out,
        batches_per_epoch=per_epoch,
        eval_fn=evaluate,
        resume=run.resume,
        progress=run.progress,
    )
    sharded = is_sharded(model)
    if not main and not sharded:
        return {}
    model.eval()
    # A sharded model's forward gathers each block from every rank: all ranks run these.
    after_loss = loss_on(model, eval_ds, train.batch_size)
    after_samples = _samples(model, tokenizer, prompts)
    if not main:
        return {}
    say(f"eval loss after: {after_loss:.4f} (before {before_loss:.4f})")
    for ex, text in zip(prompts, after_samples, strict=True):
        say(f"  after  | {ex.prompt.strip()}\n         -> {text}")
    if (out / "metrics.jsonl").is_file():
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    adapter_dir = out / "adapter"
    size = sum(p.stat().st_size for p in adapter_dir.iterdir() if p.is_file())
    summary = {
        "model": name,
        "steps": steps,
        "eval_loss_before": before_loss,
        "eval_loss_after": after_loss,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_fraction": trainable / total,
        "adapter_bytes": size,
        "truncated_rows": truncated,
        "samples_before": before_samples,
        "samples_after": after_samples,
        "seconds": time.perf_counter() - t0,
        "final_train_loss": result.final_loss,
    }
    atomic.write_json(out / "summary.json", summary)
    checkpoints = f" | checkpoints: {result.last_checkpoint.parent}" if result.last_checkpoint else ""
    say(
        f"adapter: {adapter_dir} ({size / 1e6:.2f} MB; PEFT format) | metrics: {out / 'metrics.jsonl'} | "
        f"curves: {out / 'loss.png'}{checkpoints}"
    )
    return summary


# ------------------------------------------------------------------------------------------ helpers
def _check_out(run: TrainRun) -> Path:
    out = Path(run.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    finished = (out / "adapter" / "adapter_config.json").is_file()
    started = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*"))
    if finished and not (run.resume or run.overwrite):
        raise ConfigError(f"{out} already holds a finished run; pass --overwrite, --resume, or another --out")
    if started and not (run.resume or run.overwrite):
        raise ConfigError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it, or another --out")
    return out


def _load_data(run: TrainRun, tokenizer: Any, seed: int):
    """(train dataset, eval dataset, eval examples for samples)."""
    if run.task == "classification":
        a, b, y = D.load_classification(run.data)
        if run.eval_data:
            ea, eb, ey = D.load_classification(run.eval_data)
        else:
            # A seeded random held-out fraction (files are often sorted by label or source).
            n_eval = max(1, int(len(y) * run.eval_fraction))
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).tolist()
            held, kept = order[:n_eval], order[n_eval:]

            def pick(values, rows):
                return [values[i] for i in rows] if values else None

            ea, eb, ey = pick(a, held), pick(b, held), pick(y, held)
            a, b, y = pick(a, kept), pick(b, kept), pick(y, kept)
        train = D.tokenize_classification(a, b, y, tokenizer, run.seq_len)
        evald = D.tokenize_classification(ea, eb, ey, tokenizer, run.seq_len)
        return train, evald, []
    examples = D.load_examples(run.data, tokenizer=tokenizer)
    if run.eval_data or run.data == "e2e":
        eval_examples = D.load_examples(run.eval_data or "e2e-dev", tokenizer=tokenizer)
        train_examples = examples
    else:
        train_examples, eval_examples = D.split_holdout(examples, run.eval_fraction, seed)
    train = D.tokenize_examples(train_examples, tokenizer, run.seq_len)
    evald = D.tokenize_examples(eval_examples, tokenizer, run.seq_len)
    if len(train) == 0:
        raise DataError(f"{run.data}: no usable rows after tokenisation (seq_len={run.seq_len} too small?)")
    return train, evald, eval_examples


def _distinct_prompts(examples: list[D.Example], n: int) -> list[D.Example]:
    seen, out = set(), []
    if n <= 0:
        return out
    for ex in examples:
        key = ex.group or ex.prompt
        if key in seen or not ex.prompt:
            continue
        seen.add(key)
        out.append(ex)
        if len(out) == n:
            break
    return out


def _classifier_name(model: nn.Module) -> str:
    for name in ("classifier", "score"):
        if hasattr(model, name):
            return name
    raise ConfigError("could not find the classification head (classifier/score); pass --modules-to-save")


def _samples(model: nn.Module, tokenizer: Any, prompts: list[D.Example]) -> list[str]:
    if not prompts:
        return []
    from lorakit.generate import Decoding, generate

    return generate(model, tokenizer, [p.prompt for p in prompts], Decoding(max_new_tokens=40))
