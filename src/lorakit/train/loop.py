"""`fit()`: one plain training loop of named stages — step, evaluate, log, checkpoint, stop — with exact resume, DDP
and FSDP (docs/design.md, "Training")."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model as save_model_file
from torch import nn
from tqdm.auto import tqdm

from lorakit import atomic
from lorakit.atomic import build_directory
from lorakit.errors import ConfigError, TrainingError
from lorakit.io import save_adapter
from lorakit.modes import evaluating
from lorakit.state import adapter_owner, require_adapter
from lorakit.train.checkpoint import (
    CHECKPOINTS_DIR,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    remove_partial,
    resumable,
    save_checkpoint,
)
from lorakit.train.checkpointing import checkpointable_blocks, enable_grad_checkpointing
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import DistInfo, barrier, init_distributed
from lorakit.train.optim import build_optimizer, build_scheduler
from lorakit.train.packed import check_packable
from lorakit.train.preference_step import preference_step
from lorakit.train.reporting import Reporter, check_reporters, open_reporters
from lorakit.train.sharding import gathered, shard
from lorakit.train.step import train_step

try:
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

__all__ = ["ADAPTER_DIR", "METRICS_FILE", "MODEL_DIR", "FitResult", "check_resume", "fit"]

logger = logging.getLogger("lorakit.train")

METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"

BatchesFn = Callable[[int, int], Iterator[dict[str, Any]]]
EvalFn = Callable[[nn.Module], dict[str, float]]
StepHook = Callable[[int, dict[str, Any]], None]


@dataclass
class FitResult:
    """What a finished `fit` run produced.

    Attributes:
        steps: optimizer steps of the whole run (including those before a resume).
        final_loss: training loss of the last step (None if no step ran at all).
        evals: every evaluation, oldest first: `{"step": s, "eval_<key>": value, ...}`.
        adapter_dir: `out_dir/adapter`, the final adapter in PEFT's format; None when the model
            carries no lorakit adapter.
        model_dir: `out_dir/model`, the trained model (`save_pretrained`, else a safetensors
            state dict) when it carries no lorakit adapter (full fine-tuning); else None.
        out_dir: the run's directory (also holds `metrics.jsonl` and `checkpoints/`).
        last_checkpoint: the newest checkpoint directory, if any was written.
        resumed_from: the step this call resumed from, or None for a fresh run.
    """

    steps: int
    final_loss: float | None
    evals: list[dict[str, float]]
    adapter_dir: Path | None
    out_dir: Path
    model_dir: Path | None = None
    last_checkpoint: Path | None = None
    resumed_from: int | None = None

    @property
    def eval_losses(self) -> list[tuple[int, float]]:
        """(step, eval_loss) for each evaluation that reported a loss."""
        return [(int(e["step"]), e["eval_loss"]) for e in self.evals if "eval_loss" in e]


@dataclass
class _Position:
    """Optimizer steps done, and the next batch to read: batch `batch` of epoch `epoch`."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class _Run:
    """Loss and eval history carried in checkpoints."""

    last_loss: float | None = None
    evals: list[dict[str, float]] = field(default_factory=list)


def _flushing_denormals(fn: Callable) -> Callable:
    """Run `fn` with subnormal floats flushed to zero, then restore the previous mode.

    Without flushing, CPU steps slowed 4x once the loss got small (denormals). The mode is
    process-wide (the CPU's FTZ/DAZ flags), so it is put back afterwards: a caller that relies on
    IEEE subnormals (hypothesis refuses to run without them) is not changed by having trained.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        was_flushing = float(torch.tensor([1e-40]) * 1.0) == 0.0  # a float32 subnormal survives unless flushed
        torch.set_flush_denormal(True)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_flush_denormal(was_flushing)

    return wrapper


@_flushing_denormals
def fit(
    model: nn.Module,
    train_batches_fn: BatchesFn,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    batches_per_epoch: int,
    eval_fn: EvalFn | None = None,
    resume: bool = False,
    on_step: StepHook | None = None,
    adapter_name: str = "default",
    progress: bool | None = None,
    resume_hint: str = "call fit(..., resume=True)",
) -> FitResult:
    """Train the trainable parameters of `model` (its LoRA adapter, or all of them) and save the result.

    A short loop of named stages: each optimizer step (`cfg.grad_accum` batches), then evaluate,
    log, checkpoint and, after a Ctrl-C, checkpoint and stop; at the end the adapter is saved in
    PEFT's format as `out_dir/adapter` (a model without a lorakit adapter is saved whole as
    `out_dir/model`). What a step computes, the files written, the stops (NaN/inf, Ctrl-C), exact
    resume and DDP/FSDP are described in docs/design.md, "Training".

    Args:
        model: a model with adapter `adapter_name` injected, or any model whose parameters to
            train require grad; on its device. Batches are moved to the device of its first
            parameter.
        train_batches_fn: `(epoch, start) -> iterator` over the batches of that epoch from batch
            `start` on. A batch is a dict with `input_ids`, `attention_mask` and `labels`
            ((batch, seq) token labels with -100 where there is no target; or (batch,) class
            labels, then the loss uses `outputs.logits` of shape (batch, classes)), plus any other
            keyword the model's forward takes. Everything but `labels` is passed to the model. For
            exact resume its order must depend only on (epoch, start).
        cfg: hyper-parameters.
        out_dir: the run's directory (created if missing).
        batches_per_epoch: how many batches `train_batches_fn(epoch, 0)` yields.
        eval_fn: `model -> {"loss": ..., ...}`, called every `cfg.eval_every` steps and at the
            end, in eval mode without gradients, with the RNG forked so evaluating never changes
            the training trajectory. Called on every rank.
        resume: continue from the newest checkpoint in `out_dir` (start fresh if there is none).
        on_step: called after every step (after its eval and checkpoint) as
            `on_step(step, record)` with the metrics record; on every rank.
        adapter_name: the adapter to train and save (when the model carries lorakit adapters).
        progress: show a tqdm bar (step, loss, tokens/s, ETA); None: only on rank 0 when stderr
            is a terminal.
        resume_hint: what the Ctrl-C message tells the user to do to continue (`lorakit train`
            names its command line).

    Returns:
        Steps, final loss, eval history and paths.

    Raises:
        ConfigError: `batches_per_epoch < 1`; `cfg.grad_checkpointing` on a model without decoder blocks
            (`train.checkpointing`); both before anything is written.
        TrainingError: NaN/inf loss, a `train_batches_fn` that yields fewer batches than
            `batches_per_epoch`, existing checkpoints in `out_dir` with `resume=False`, a
            checkpoint that does not fit the model or config.
        KeyboardInterrupt: after Ctrl-C, once the checkpoint is saved.
        LorakitError: the model carries lorakit adapters, none named `adapter_name`.
    """
    if isinstance(batches_per_epoch, bool) or not isinstance(batches_per_epoch, int) or batches_per_epoch < 1:
        raise ConfigError(f"batches_per_epoch must be an integer >= 1, got {batches_per_epoch!r}")
    adapted = adapter_owner(model)  # the model, or the injected model inside a wrapper
    if adapted is not None:
        require_adapter(adapted, adapter_name)
    if cfg.grad_checkpointing:
        checkpointable_blocks(model)  # a model without blocks is refused before out_dir is made
    if cfg.packing:
        check_packable(model)  # a model whose attention crosses packed examples, likewise
    check_reporters(cfg.report_to)
    info = init_distributed()
    out = Path(out_dir)
    total_steps = _total_steps(cfg, batches_per_epoch)
    latest = _prepare_out_dir(out, info, resume)
    loop = _start(
        model,
        cfg,
        out,
        info,
        adapter_name=adapter_name if adapted is not None else None,  # None: train what requires grad
        resume_from=latest if resume else None,
        total_steps=total_steps,
        batches_per_epoch=batches_per_epoch,
        eval_fn=eval_fn,
        progress=progress,
    )
    status = "FAILED"  # what the reporters are told if the loop raises
    try:
        with _sigint_flag() as interrupted:
            while loop.position.step < loop.total_steps:
                record, stop = loop.step(train_batches_fn, stop=interrupted.is_set())
                loop.maybe_evaluate(record)
                loop.log_step(record)
                loop.maybe_checkpoint()
                if on_step is not None:
                    on_step(loop.position.step, record)
                loop.stop_if_interrupted(stop, resume_hint)
            loop.evaluate_at_end()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        loop.close(status)
    return _save_result(loop, adapted)


# ----------------------------------------------------------------------------------------- stages
def _total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """`cfg.max_steps`, else `cfg.epochs` epochs of `ceil(batches_per_epoch / cfg.grad_accum)` steps."""
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch


def _prepare_out_dir(out: Path, info: DistInfo, resume: bool) -> Path | None:
    """Create `out` and drop what a killed write left (rank 0); to resume, set incomplete newer
    checkpoints aside (`checkpoint.resumable`); return the newest checkpoint.

    Raises:
        TrainingError: `out` holds checkpoints and `resume` is False.
        CheckpointError: resuming, and no checkpoint is complete.
    """
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial(out)
        if resume:
            resumable(out, set_aside=True)
    barrier(info)
    latest = latest_checkpoint(out)
    if latest is not None and not resume:
        raise TrainingError(
            f"{out} already holds checkpoints (newest: {latest}); pass resume=True to continue that run, "
            "or choose another out_dir"
        )
    return latest


def _start(
    model: nn.Module,
    cfg: TrainConfig,
    out: Path,
    info: DistInfo,
    *,
    adapter_name: str | None,
    resume_from: Path | None,
    total_steps: int,
    batches_per_epoch: int,
    eval_fn: EvalFn | None,
    progress: bool | None,
) -> _Loop:
    """Put the model in training form (gradient checkpointing, train mode, FSDP shards before the
    optimizer, which must hold them), build the optimizer and schedule, restore `resume_from` or seed
    the RNGs, wrap the model for DDP, open `metrics.jsonl`, the reporters and the progress bar."""
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)  # before shard: FSDP's hooks stay around each checkpointed block
    model.train()
    sharded = cfg.strategy == "fsdp" and info.enabled
    if sharded:
        shard(model, reshard_after_forward=cfg.reshard_after_forward, cpu_offload=cfg.cpu_offload)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    position, run = _Position(), _Run()
    resumed_from: int | None = None
    if resume_from is not None:
        position, run = _resume(resume_from, model, optimizer, scheduler, cfg, info, total_steps, batches_per_epoch)
        resumed_from = position.step
        logger.info("resumed from %s (step %d of %d)", resume_from, position.step, total_steps)
    else:
        _seed_everything(cfg.seed + info.rank)
    device = next(model.parameters()).device
    train_model = model if sharded else _wrap_ddp(model, device, info)
    optimizer.zero_grad(set_to_none=True)
    metrics, kept = _open_metrics(out / METRICS_FILE, resumed_from, info)
    reporters = open_reporters(cfg.report_to, out, history=kept, params=cfg.to_dict()) if info.is_main else []
    show = progress if progress is not None else (info.is_main and sys.stderr.isatty())
    bar = tqdm(
        total=total_steps, initial=position.step, desc="train", unit="step", disable=not show, dynamic_ncols=True
    )
    return _Loop(
        model=model,
        train_model=train_model,
        device=device,
        adapter_name=adapter_name,
        cfg=cfg,
        out=out,
        info=info,
        optimizer=optimizer,
        scheduler=scheduler,
        eval_fn=eval_fn,
        total_steps=total_steps,
        batches_per_epoch=batches_per_epoch,
        position=position,
        run=run,
        resumed_from=resumed_from,
        metrics=metrics,
        reporters=reporters,
        bar=bar,
        last_saved=resumed_from,
        last_eval=run.evals[-1]["step"] if run.evals else None,
    )


@dataclass
class _Loop:
    """What one `fit` call carries from stage to stage, and the stages themselves."""

    model: nn.Module  # as given: evaluated, checkpointed and saved
    train_model: nn.Module  # what the steps run: `model`, or its DDP wrapper
    device: torch.device
    adapter_name: str | None  # None: no lorakit adapter, the whole model is saved
    cfg: TrainConfig
    out: Path
    info: DistInfo
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    eval_fn: EvalFn | None
    total_steps: int
    batches_per_epoch: int
    position: _Position
    run: _Run
    resumed_from: int | None
    metrics: atomic.AppendFile | None  # metrics.jsonl, on rank 0
    reporters: list[Reporter]  # where else each metrics.jsonl line goes (cfg.report_to), on rank 0
    bar: tqdm
    last_saved: int | None  # the step of the newest checkpoint
    last_eval: int | None  # the step of the newest evaluation
    data: Iterator[dict[str, Any]] | None = None  # the current epoch's batches

    @property
    def done(self) -> bool:
        return self.position.step == self.total_steps

    def step(self, batches_fn: BatchesFn, *, stop: bool) -> tuple[dict[str, Any], bool]:
        """One optimizer step on the next `cfg.grad_accum` batches of the epoch (fewer at its end).

        Returns:
            The step's metrics record, and whether some rank saw a Ctrl-C (`stop`; `train_step`
            makes every rank agree).

        Raises:
            TrainingError: a non-finite loss or gradient (nothing was updated), naming the last
                good checkpoint; a batch that is missing or not a dict with `labels`.
        """
        position, cfg = self.position, self.cfg
        started = time.perf_counter()
        if self.data is None:
            self.data = iter(batches_fn(position.epoch, position.batch))
        count = min(cfg.grad_accum, self.batches_per_epoch - position.batch)
        micro = [_next_batch(self.data, position, self.batches_per_epoch, i) for i in range(count)]
        # SFT's step, or a preference method's (`cfg.method`; its batches are concatenated pairs).
        method = {} if cfg.method == "sft" else {"method": cfg.method, "beta": cfg.beta}
        try:
            stats = (train_step if cfg.method == "sft" else preference_step)(
                self.train_model,
                micro,
                self.optimizer,
                self.scheduler,
                max_grad_norm=cfg.max_grad_norm,
                label_smoothing=cfg.label_smoothing,
                loss=cfg.loss,
                autocast=torch.bfloat16 if cfg.autocast == "bf16" else None,
                info=self.info,
                stop=stop,
                **method,
            )
        except TrainingError as err:  # a non-finite loss or gradient: nothing was updated
            raise TrainingError(f"{err} at step {position.step + 1}; {_last_good(self.out)}") from None
        position.step += 1
        position.batch += count
        if position.batch == self.batches_per_epoch:
            position.epoch, position.batch, self.data = position.epoch + 1, 0, None
        self.run.last_loss = stats.loss
        record: dict[str, Any] = {
            "step": position.step,
            "epoch": round(position.epoch + position.batch / self.batches_per_epoch, 6),
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            **stats.metrics,
            "tokens_per_s": stats.input_tokens / max(time.perf_counter() - started, 1e-9),
            "seconds": time.perf_counter() - started,
        }
        return record, stats.stop

    def maybe_evaluate(self, record: dict[str, Any]) -> None:
        """Every `cfg.eval_every` steps and on the last one: add `eval_*` to `record` and the history."""
        step, every = self.position.step, self.cfg.eval_every
        if self.eval_fn is None or not (self.done or (every and step % every == 0)):
            return
        record.update(_evaluate(self.model, self.eval_fn, self.device, step))
        self.run.evals.append({"step": step, **{k: v for k, v in record.items() if k.startswith("eval_")}})
        self.last_eval = step

    def log_step(self, record: dict[str, Any]) -> None:
        """A `metrics.jsonl` line every `cfg.log_every` steps, on evaluations and on the last step
        (flushed as written), also handed to each reporter; the progress bar every step."""
        step = self.position.step
        if self.metrics is not None and (step % self.cfg.log_every == 0 or self.done or "eval_loss" in record):
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            for reporter in self.reporters:
                reporter.log(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.bar.update(1)

    def maybe_checkpoint(self) -> None:
        """A checkpoint every `cfg.save_every` steps."""
        if self.cfg.save_every and self.position.step % self.cfg.save_every == 0:
            self.checkpoint()

    def checkpoint(self) -> Path:
        """Save parameters, optimizer, schedule, RNG states and data position (`train.checkpoint`)."""
        state = {
            "step": self.position.step,
            "epoch": self.position.epoch,
            "batch": self.position.batch,
            "total_steps": self.total_steps,
            "batches_per_epoch": self.batches_per_epoch,
            "config": self.cfg.to_dict(),
            "last_loss": self.run.last_loss,
            "evals": self.run.evals,
        }
        path = save_checkpoint(
            self.out,
            state,
            model=self.model,
            adapter_name=self.adapter_name,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            keep=self.cfg.keep_checkpoints,
            info=self.info,
        )
        self.last_saved = self.position.step
        return path

    def stop_if_interrupted(self, stop: bool, resume_hint: str) -> None:
        """After a Ctrl-C (`stop`): checkpoint this step, unless it is saved already, and stop.

        On the last step, finishing is the better stop: the run completes instead.

        Raises:
            KeyboardInterrupt: naming the checkpoint and `resume_hint`.
        """
        if not stop or self.done:
            return
        step, total = self.position.step, self.total_steps
        if self.last_saved != step:
            self.checkpoint()
        where = self.out / CHECKPOINTS_DIR / f"step-{step}"
        self.bar.close()
        logger.warning(
            "interrupted: saved checkpoint %s at step %d of %d; %s to continue", where, step, total, resume_hint
        )
        raise KeyboardInterrupt(
            f"training interrupted at step {step} of {total}; checkpoint {where}; {resume_hint} to continue"
        )

    def evaluate_at_end(self) -> None:
        """Evaluate the final step if no step did (a run resumed at its end)."""
        if self.eval_fn is not None and self.last_eval != self.position.step:
            entry = _evaluate(self.model, self.eval_fn, self.device, self.position.step)
            self.run.evals.append({"step": self.position.step, **entry})

    def close(self, status: str) -> None:
        """Close the progress bar, metrics.jsonl and the reporters (`status`: how the run ended)."""
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        for reporter in self.reporters:
            reporter.close(status)


def _save_result(loop: _Loop, adapted: nn.Module | None) -> FitResult:
    """Save the adapter (PEFT format) or, without one, the whole model; every rank returns the result."""
    out, adapter_name = loop.out, loop.adapter_name
    adapter_dir = out / ADAPTER_DIR if adapter_name is not None else None
    model_dir = out / MODEL_DIR if adapter_name is None else None
    with gathered(loop.model, frozen=adapter_dir is None):  # FSDP: whole tensors for the files (a collective)
        if loop.info.is_main:
            if adapter_dir is not None:  # a whole directory: a failed write keeps an earlier one
                build_directory(adapter_dir, lambda tmp: save_adapter(adapted, tmp, adapter_name), replace=True)
            else:
                save_model(loop.model, model_dir)
    barrier(loop.info)
    return FitResult(
        steps=loop.position.step,
        final_loss=loop.run.last_loss,
        evals=loop.run.evals,
        adapter_dir=adapter_dir,
        model_dir=model_dir,
        out_dir=out,
        last_checkpoint=latest_checkpoint(out),
        resumed_from=loop.resumed_from,
    )


# ---------------------------------------------------------------------------------------- helpers
def _last_good(out: Path) -> str:
    latest = latest_checkpoint(out)
    if latest is None:
        return "no checkpoint was written before it; lower lr or add warmup and start again"
    return (
        f"the last good checkpoint is {CHECKPOINTS_DIR}/{latest.name} (in {out}); "
        "lower lr or add warmup, then resume=True continues from it"
    )


def _next_batch(data: Iterator[dict[str, Any]], position: _Position, per_epoch: int, offset: int) -> dict[str, Any]:
    try:
        batch = next(data)
    except StopIteration:
        raise TrainingError(
            f"train_batches_fn(epoch={position.epoch}, start=...) ran out at batch {position.batch + offset} of "
            f"epoch {position.epoch}, but batches_per_epoch is {per_epoch}"
        ) from None
    if not isinstance(batch, dict) or "labels" not in batch:
        raise TrainingError(
            f"a batch must be a dict with 'labels' (and the model's inputs); got {type(batch).__name__} "
            f"with keys {sorted(batch) if isinstance(batch, dict) else '-'}"
        )
    return batch


# ---------------------------------------------------------------------------------------- helpers
def save_model(model: nn.Module, directory: Path) -> Path:
    """Write a whole trained model to `directory` atomically (replacing an earlier one).

    `save_pretrained` (safetensors) when the model has it (transformers, PEFT), else its state dict
    as `model.safetensors` (tied weights stored once).
    """

    def build(tmp: Path) -> None:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            save_model_file(model, str(tmp / "model.safetensors"))

    return build_directory(directory, build, replace=True)


def _evaluate(model: nn.Module, eval_fn: EvalFn, device: torch.device, step: int) -> dict[str, float]:
    devices = [device.index or 0] if device.type == "cuda" else []
    with evaluating(model), torch.no_grad(), torch.random.fork_rng(devices=devices):
        result = eval_fn(model)
    if not isinstance(result, dict):
        raise TrainingError(f"eval_fn must return a dict of numbers, got {type(result).__name__} at step {step}")
    return {(k if k.startswith("eval_") else f"eval_{k}"): float(v) for k, v in result.items()}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_resume(checkpoint: Path, cfg: TrainConfig, *, batches_per_epoch: int | None = None) -> dict[str, Any]:
    """Refuse to resume from `checkpoint` with settings that would not continue the same run.

    Reads only the checkpoint's JSON, so a caller can check before loading a model or data
    (`batches_per_epoch` None: not checked yet).

    Returns:
        The checkpoint's trainer state.

    Raises:
        TrainingError: an unreadable trainer state, or the settings that changed, each named with
            its checkpoint and current value.
    """
    state = read_trainer_state(checkpoint)
    problems = cfg.resume_differences(state.get("config", {}))
    if batches_per_epoch is not None and state.get("batches_per_epoch") != batches_per_epoch:
        problems.append(f"batches_per_epoch: checkpoint {state.get('batches_per_epoch')!r}, now {batches_per_epoch!r}")
    if problems:
        raise TrainingError(
            f"cannot resume from {checkpoint}: the run's settings changed, so it would not continue the same run:\n"
            "  - " + "\n  - ".join(problems)
        )
    return state


def _resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    info: DistInfo,
    total_steps: int,
    batches_per_epoch: int,
) -> tuple[_Position, _Run]:
    state = check_resume(path, cfg, batches_per_epoch=batches_per_epoch)
    if state.get("world_size") != info.world_size:
        logger.warning(
            "resuming a run of %s processes on %d: the data and loss are the same, dropout masks are not",
            state.get("world_size"),
            info.world_size,
        )
    if state["step"] > total_steps:
        raise TrainingError(f"{path} is at step {state['step']}, beyond the run's {total_steps} steps")
    load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, info=info)
    position = _Position(step=int(state["step"]), epoch=int(state["epoch"]), batch=int(state["batch"]))
    return position, _Run(last_loss=state.get("last_loss"), evals=list(state.get("evals", [])))


def _open_metrics(path: Path, resumed_from: int | None, info: DistInfo) -> tuple[atomic.AppendFile | None, list[dict]]:
    """Open metrics.jsonl for whole-line appends; on resume drop lines past the checkpoint (they are redone).

    Returns:
        The file (None on ranks other than 0) and the records it keeps, oldest first.
    """
    if not info.is_main:
        return None, []
    if resumed_from is None or not path.exists():
        return atomic.open_append(path, truncate=True), []
    kept, records = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            if record["step"] <= resumed_from:
                kept.append(line + "\n")
                records.append(record)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill
    atomic.write_text(path, "".join(kept))
    return atomic.open_append(path), records


def _wrap_ddp(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # Buffers (e.g. rotary tables) are the same on every rank; syncing them every forward is waste.
    # Newer torch names the option forward_sync_buffers and deprecates broadcast_buffers.
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False, **no_sync)


@contextlib.contextmanager
def _sigint_flag() -> Iterator[threading.Event]:
    """An event set by the first Ctrl-C; a second Ctrl-C raises KeyboardInterrupt at once."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # installed from C; nothing Python can restore
        previous = signal.default_int_handler

    def handler(signum: int, frame: Any) -> None:
        if event.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        event.set()  # no logging here: a handler that writes to stderr can re-enter a write in progress

    signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)
