"""`fit()`: one plain training loop — accumulation, clipping, logging, checkpoints, exact resume, DDP."""

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
    save_checkpoint,
)
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import DistInfo, barrier, init_distributed
from lorakit.train.optim import build_optimizer, build_scheduler
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

    With a lorakit adapter injected, the adapter trains and is saved in PEFT's format. Without
    one, whatever requires grad trains (every weight: full fine-tuning; or a PEFT model's
    adapter) and the model is saved as a directory; the loop is the same, so methods compare on
    equal terms.

    One optimizer step reads `cfg.grad_accum` consecutive batches (fewer at the end of an
    epoch; a step never spans two epochs), sums the cross entropy over their target tokens and
    divides by the number of those tokens (over all ranks), so accumulation and data parallelism
    give the update of one big batch. Then: clip to `cfg.max_grad_norm`, AdamW step, schedule step.

    Files under `out_dir` (written by rank 0 only):

    - `metrics.jsonl`: one JSON line per step (step, epoch, loss, lr, grad_norm, tokens_per_s,
      seconds, and `eval_*` on evaluation steps), flushed as written;
    - `checkpoints/step-N/`: every `cfg.save_every` steps, the newest `cfg.keep_checkpoints`
      kept (see `lorakit.train.checkpoint`);
    - `adapter/`: the final adapter (PEFT format), written when the run completes; or `model/`,
      the whole model, for a model without a lorakit adapter.

    Stops: a NaN/inf loss or gradient norm raises `TrainingError` before the bad update is
    applied, naming the last good checkpoint; nothing of the bad state is saved. Ctrl-C (SIGINT,
    caught when fit runs in the main thread) finishes the current step, saves a checkpoint and
    raises `KeyboardInterrupt`; a second Ctrl-C aborts at once.

    Resume (`resume=True`): continues from the newest complete checkpoint — parameters,
    optimizer, scheduler, RNG states and data position — so a run killed at any moment and
    resumed ends with the same adapter as an uninterrupted one, provided `train_batches_fn`'s
    order depends only on (epoch, start) and the thread count is the same. Without a
    checkpoint it starts fresh.

    DDP: when `torch.distributed` is initialised, or `WORLD_SIZE > 1` from torchrun (then
    `init_distributed` is called here), the model is wrapped in `DistributedDataParallel`; every
    rank calls `train_batches_fn` for the same global batches and keeps rows `rank::world_size`.
    FSDP (`cfg.strategy == "fsdp"`, several processes): instead the model is sharded in place
    (`lorakit.train.shard`) and stays sharded when fit returns (a forward then needs every rank);
    the adapter is gathered for saving, and checkpoints hold each rank's shard
    (`lorakit.train.sharding`), so they resume on any number of ranks.

    Args:
        model: a model with adapter `adapter_name` injected, or any model whose parameters to
            train require grad; on its device. Batches are moved to the device of its first
            parameter.
        train_batches_fn: `(epoch, start) -> iterator` over the batches of that epoch from batch
            `start` on. A batch is a dict with `input_ids`, `attention_mask` and `labels`
            ((batch, seq) token labels with -100 where there is no target; or (batch,) class
            labels, then the loss uses `outputs.logits` of shape (batch, classes)), plus any other
            keyword the model's forward takes. Everything but `labels` is passed to the model.
        cfg: hyper-parameters.
        out_dir: the run's directory (created if missing).
        batches_per_epoch: how many batches `train_batches_fn(epoch, 0)` yields.
        eval_fn: `model -> {"loss": ..., ...}`, called every `cfg.eval_every` steps and at the
            end, under `torch.no_grad()` with `model.eval()` (then `train()` again), with the RNG
            forked so evaluating never changes the training trajectory. Called on every rank.
        resume: continue from the newest checkpoint in `out_dir`.
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
        ConfigError: `batches_per_epoch < 1`.
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
    else:
        adapter_name = None  # no lorakit adapter: train what requires grad, save the model
    info = init_distributed()
    out = Path(out_dir)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial(out)
    barrier(info)
    latest = latest_checkpoint(out)
    if latest is not None and not resume:
        raise TrainingError(
            f"{out} already holds checkpoints (newest: {latest}); pass resume=True to continue that run, "
            "or choose another out_dir"
        )

    if cfg.grad_checkpointing:
        _enable_grad_checkpointing(model)
    model.train()
    sharded = cfg.strategy == "fsdp" and info.enabled
    if sharded:  # before the optimizer, which must hold the sharded parameters
        shard(model, reshard_after_forward=cfg.reshard_after_forward, cpu_offload=cfg.cpu_offload)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    position, run = _Position(), _Run()
    resumed_from: int | None = None
    if resume and latest is not None:
        position, run = _resume(latest, model, optimizer, scheduler, cfg, info, total_steps, batches_per_epoch)
        resumed_from = position.step
        logger.info("resumed from %s (step %d of %d)", latest, position.step, total_steps)
    else:
        _seed_everything(cfg.seed + info.rank)

    device = next(model.parameters()).device
    train_model = model if sharded else _wrap_ddp(model, device, info)
    optimizer.zero_grad(set_to_none=True)

    metrics = _open_metrics(out / METRICS_FILE, resumed_from, info)
    show = progress if progress is not None else (info.is_main and sys.stderr.isatty())
    bar = tqdm(
        total=total_steps, initial=position.step, desc="train", unit="step", disable=not show, dynamic_ncols=True
    )
    last_saved = resumed_from
    last_eval = run.evals[-1]["step"] if run.evals else None
    data: Iterator[dict[str, Any]] | None = None

    def checkpoint() -> Path:
        state = {
            "step": position.step,
            "epoch": position.epoch,
            "batch": position.batch,
            "total_steps": total_steps,
            "batches_per_epoch": batches_per_epoch,
            "config": cfg.to_dict(),
            "last_loss": run.last_loss,
            "evals": run.evals,
        }
        return save_checkpoint(
            out,
            state,
            model=model,
            adapter_name=adapter_name,
            optimizer=optimizer,
            scheduler=scheduler,
            keep=cfg.keep_checkpoints,
            info=info,
        )

    try:
        with _sigint_flag() as interrupted:
            while position.step < total_steps:
                started = time.perf_counter()
                if data is None:
                    data = iter(train_batches_fn(position.epoch, position.batch))
                count = min(cfg.grad_accum, batches_per_epoch - position.batch)
                micro = [_next_batch(data, position, batches_per_epoch, i) for i in range(count)]
                try:
                    stats = train_step(
                        train_model,
                        micro,
                        optimizer,
                        scheduler,
                        max_grad_norm=cfg.max_grad_norm,
                        label_smoothing=cfg.label_smoothing,
                        autocast=torch.bfloat16 if cfg.autocast == "bf16" else None,
                        info=info,
                        stop=interrupted.is_set(),
                    )
                except TrainingError as err:  # a non-finite loss or gradient: nothing was updated
                    raise TrainingError(f"{err} at step {position.step + 1}; {_last_good(out)}") from None
                position.step += 1
                position.batch += count
                if position.batch == batches_per_epoch:
                    position.epoch, position.batch, data = position.epoch + 1, 0, None
                run.last_loss = stats.loss
                record: dict[str, Any] = {
                    "step": position.step,
                    "epoch": round(position.epoch + position.batch / batches_per_epoch, 6),
                    "loss": stats.loss,
                    "lr": stats.lr,
                    "grad_norm": stats.grad_norm,
                    "tokens_per_s": stats.input_tokens / max(time.perf_counter() - started, 1e-9),
                    "seconds": time.perf_counter() - started,
                }
                done = position.step == total_steps
                if eval_fn is not None and (done or (cfg.eval_every and position.step % cfg.eval_every == 0)):
                    record.update(_evaluate(model, eval_fn, device, position.step))
                    run.evals.append(
                        {"step": position.step, **{k: v for k, v in record.items() if k.startswith("eval_")}}
                    )
                    last_eval = position.step
                if metrics is not None and (position.step % cfg.log_every == 0 or done or "eval_loss" in record):
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
                if cfg.save_every and position.step % cfg.save_every == 0:
                    checkpoint()
                    last_saved = position.step
                if on_step is not None:
                    on_step(position.step, record)
                if stats.stop and not done:  # on the last step, finishing is the better stop
                    if last_saved != position.step:
                        checkpoint()
                        last_saved = position.step
                    where = out / CHECKPOINTS_DIR / f"step-{position.step}"
                    bar.close()
                    logger.warning(
                        "interrupted: saved checkpoint %s at step %d of %d; %s to continue",
                        where,
                        position.step,
                        total_steps,
                        resume_hint,
                    )
                    raise KeyboardInterrupt(
                        f"training interrupted at step {position.step} of {total_steps}; checkpoint {where}; "
                        f"{resume_hint} to continue"
                    )
            if eval_fn is not None and last_eval != position.step:
                entry = _evaluate(model, eval_fn, device, position.step)
                run.evals.append({"step": position.step, **entry})
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    adapter_dir = out / ADAPTER_DIR if adapter_name is not None else None
    model_dir = out / MODEL_DIR if adapter_name is None else None
    with gathered(model, frozen=adapter_dir is None):  # FSDP: whole tensors for the files (a collective)
        if info.is_main:
            if adapter_dir is not None:
                save_adapter(adapted, adapter_dir, adapter_name)
            else:
                save_model(model, model_dir)
    barrier(info)
    return FitResult(
        steps=position.step,
        final_loss=run.last_loss,
        evals=run.evals,
        adapter_dir=adapter_dir,
        model_dir=model_dir,
        out_dir=out,
        last_checkpoint=latest_checkpoint(out),
        resumed_from=resumed_from,
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


def _open_metrics(path: Path, resumed_from: int | None, info: DistInfo):
    """Open metrics.jsonl for appending; on resume drop lines past the checkpoint (they are redone)."""
    if not info.is_main:
        return None
    if resumed_from is None or not path.exists():
        return open(path, "w", encoding="utf-8")
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= resumed_from:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill
    atomic.write_text(path, "".join(kept))
    return open(path, "a", encoding="utf-8")


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


def _enable_grad_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    # transformers ≥ 5 names it activation checkpointing; gradient_checkpointing_enable is its deprecated alias.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TrainingError(
            f"grad_checkpointing needs a transformers model (gradient_checkpointing_enable); "
            f"{type(model).__name__} has none"
        )
    # Non-reentrant checkpointing gives the LoRA weights their gradients even though the frozen
    # embeddings' output does not require grad, so enable_input_require_grads is not needed
    # (pinned by test_grad_checkpointing_gives_the_same_training).


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
