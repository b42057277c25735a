"""A whole training run around `fit`: load the model and data, inject, evaluate before and after, write files.

This is what `lorakit train` runs: the CLI builds `TrainRun`, `LoraConfig` and `TrainConfig` from
flags and TOML and calls `train_run`. Everything here is plain library code a script can call.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shlex
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorakit import atomic, memory
from lorakit import data as D
from lorakit.adapters import trainable_parameters
from lorakit.config import LoraConfig
from lorakit.data.packing import packing_stats
from lorakit.errors import CheckpointError, ConfigError, FileWriteError, TargetNotFoundError, UnsupportedLayerError
from lorakit.evaluate import loss_on
from lorakit.extras import require_extra
from lorakit.generate import Decoding, generate
from lorakit.inject import inject
from lorakit.models import Task, load_model, load_tokenizer
from lorakit.quantization import storage_summary
from lorakit.state import lora_layers
from lorakit.train.checkpoint import latest_checkpoint, resumable
from lorakit.train.checkpointing import checkpointable_blocks
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import DistInfo, init_distributed
from lorakit.train.lock import LOCK_FILE, run_lock
from lorakit.train.loop import check_resume, fit
from lorakit.train.packed import check_packable
from lorakit.train.plot import plot_losses
from lorakit.train.preference_run import preference_run
from lorakit.train.reporting import check_reporters
from lorakit.train.sharding import is_sharded

__all__ = ["TrainRun", "recorded_settings", "train_run"]

Printer = Callable[[str], None]


@dataclass
class TrainRun:
    """What a training run reads and where it writes (the hyper-parameters are `TrainConfig`'s).

    Args:
        model: base model: a packaged alias (`smollm2-135m`, or the encoder `minilm-l6` for
            classification), a local transformers model directory, or a `.gguf` file (default:
            `smollm2-135m`).
        data: training data: a `.jsonl`, `.json`, `.csv` or `.parquet` file or a Hugging Face
            `datasets` folder (`save_to_disk`) of chat `messages`, ShareGPT `conversations`, Alpaca
            `instruction`/`input`/`output`, `prompt`/`completion` (strings or message lists),
            `text` or E2E `mr`/`ref` records (detected from their fields; conversations are
            rendered with the model's chat template); the LoRA `.txt` E2E format; a GLUE TSV for
            classification; or `e2e` (the bundled sample). With `--method dpo`, `ipo` or `orpo`:
            preference records, `prompt`, `chosen` and `rejected` (strings or message lists).
        fields: the records' names for the standard fields, when they differ (`messages=dialog`,
            `instruction=question,output=answer`; keys: messages, conversations, prompt,
            completion, instruction, input, output, system, text).
        train_on: which tokens of a conversation train: `assistant` (every assistant turn),
            `last` (the last assistant turn only) or `all` (every token; for prompt/completion
            records the prompt too).
        train_on_eos: train the token that ends each assistant turn (`<|im_end|>`, `<|eot_id|>`,
            the EOS after a completion), so the model learns to stop.
        eval_data: held-out data in the same formats (default: `e2e-dev` for `e2e`, else a
            held-out fraction of the training data).
        eval_fraction: fraction of the training data held out for eval when no eval data is given.
        task: `causal-lm`, or `classification` (a sequence-classification head, trained in full).
        num_labels: classes, for classification.
        quantize: store the base's frozen linear weights as `nf4` (QLoRA: 4-bit NormalFloat, about
            0.13× the fp32 bytes; needs lorakit[quantize]) or `bf16`; `none` keeps full precision.
        seq_len: maximum tokens per example; longer ones are cut (see `truncate`) and counted, and
            one left with no trained token is dropped.
        truncate: which end of a long example is cut: `right` keeps its start, `left` its end.
        init_adapter: start from this adapter folder (PEFT format, e.g. an SFT run's `adapter/`)
            instead of a fresh adapter: it is trained further and its own config sets the LoRA
            settings; for `--method dpo`/`ipo` it is also the reference, loaded a second time frozen
            (one base model in memory). Preference methods only.
        samples: prompts from the eval data to generate from before and after training.
        eval_max_rows: evaluate on at most this many rows of the eval data (a sample fixed by
            the seed, in file order), before, during and after training; None: every row.
        eval_batch_size: rows per evaluation forward (default: twice `batch_size`; no gradients
            are kept, so it can be larger).
        out: output directory (adapter/, checkpoints/, metrics.jsonl, loss.png, run_config.json,
            summary.json).
        resume: continue from the latest checkpoint in `out`.
        overwrite: allow writing into an `out` that already holds a run.
        threads: torch CPU threads (default: torch's choice).
        progress: show a progress bar.
    """

    model: str | None = None
    data: str = "e2e"
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    train_on: Literal["assistant", "last", "all"] = "assistant"
    train_on_eos: bool = True
    eval_data: str | None = None
    eval_fraction: float = 0.1
    task: Task = "causal-lm"
    num_labels: int = 2
    quantize: Literal["none", "nf4", "bf16"] = "none"
    seq_len: int = 128
    truncate: Literal["right", "left"] = "right"
    init_adapter: str | None = None
    samples: int = 2
    eval_max_rows: int | None = 200
    eval_batch_size: int | None = None
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
        overwritten unless `overwrite`/`resume` says so. `RunLockedError`: another run is training
        into `out` (`train.lock.run_lock`, held for the whole call). `FileWriteError`: a file
        could not be written; the message says how to continue.
    """
    require_extra("cli", "lorakit train")
    check_reporters(train.report_to)  # --report-to's extras, before anything is read
    _check_sizes(run)
    if run.threads:
        torch.set_num_threads(run.threads)
    info = init_distributed()
    if info.enabled and train.strategy == "fsdp" and run.quantize == "nf4":
        raise ConfigError(
            "--strategy fsdp with --quantize nf4 is not supported: lorakit does not shard NF4 weights; "
            "use --strategy ddp with an NF4 base, or --quantize bf16 with FSDP"
        )
    out = atomic.check_target(run.out, directory=True)  # a folder, or one that can be made
    with run_lock(out, info):  # one run at a time in `out`, from here to the end
        try:
            return _train(run, lora, train, echo, info)
        except FileWriteError as err:
            raise _continue_hint(err, out) from None


def _train(run: TrainRun, lora: LoraConfig, train: TrainConfig, echo: Printer, info: DistInfo) -> dict[str, Any]:
    """`train_run`'s work, under the run lock."""
    main = info.is_main
    say = echo if main else (lambda _msg: None)
    # Everything is checked before anything slow runs or any file is written: the output folder,
    # the resumed checkpoint's settings, then the data (read and tokenised), then the model.
    out, checkpoint, note = _check_out(run, info)
    resume = checkpoint is not None
    if checkpoint is not None:
        check_resume(checkpoint, train)
    if note:
        say(note)
    if train.method != "sft":  # preference tuning: pairs, a reference, its own step (train.preference_run)
        if main:
            scheme = None if run.quantize == "none" else run.quantize
            _warn_if_short_of_memory(run, lora, dataclasses.replace(train, batch_size=2 * train.batch_size), scheme)
        return preference_run(run, lora, train, say, info, out=out, checkpoint=checkpoint)
    if run.init_adapter:
        raise ConfigError("--init-adapter starts preference tuning (--method dpo, ipo or orpo) from an SFT adapter")
    for source in (run.data, run.eval_data):
        if source and run.task != "classification":
            D.resolve_source(source)  # a missing file is reported before anything is read
    torch.manual_seed(train.seed)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(run.model, task=run.task)
    train_ds, eval_ds, eval_examples, eval_total = _load_data(run, tokenizer, train.seed)
    truncated = train_ds.truncated
    capped = f" (a sample of {eval_total}; --eval-max-rows)" if len(eval_ds) < eval_total else ""
    if isinstance(train_ds, D.TokenizedDataset):  # the numbers `lorakit data preview` prints
        for line in D.stats_lines(train_ds, name="training data"):
            say(line)
        capped = f" (a sample of {eval_total}; --eval-max-rows)" if eval_ds.examples < eval_total else ""
        lost = f", {eval_ds.dropped} dropped with nothing to train" if eval_ds.dropped else ""
        say(f"eval data: {len(eval_ds)} rows{lost}{capped}")
    else:
        say(
            f"data: {len(train_ds)} training rows, {len(eval_ds)} eval rows{capped}"
            + (f"; {truncated} rows truncated to seq_len={run.seq_len}" if truncated else "")
        )
    per_epoch = D.num_batches(train_ds, train.batch_size, packing=train.packing)
    if train.packing:
        say(f"{packing_stats(train_ds)}; {per_epoch} batches of up to {train.batch_size} rows an epoch")
    if checkpoint is not None:
        check_resume(checkpoint, train, batches_per_epoch=per_epoch)
    scheme = None if run.quantize == "none" else run.quantize
    if main:
        _warn_if_short_of_memory(run, lora, train, scheme)
    say(
        f"loading model {run.model or 'smollm2-135m'}"
        + (f" ({scheme} linear weights, bf16 embeddings and head)" if scheme else "")
        + " ..."
    )
    t1 = time.perf_counter()
    model, tokenizer, name = load_model(run.model, task=run.task, num_labels=run.num_labels, quantize=scheme)
    if train.grad_checkpointing:
        checkpointable_blocks(model)  # a model without decoder blocks is refused before anything is written
    if train.packing:
        check_packable(model)  # so is one whose attention crosses packed examples
    stored = f"; {storage_summary(model)}" if scheme else ""
    say(
        f"model: {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"loaded in {time.perf_counter() - t1:.1f}s{stored})"
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

    eval_batch = run.eval_batch_size or 2 * train.batch_size
    prompts = _distinct_prompts(eval_examples, run.samples) if run.task == "causal-lm" else []
    before_loss = loss_on(
        model, eval_ds, eval_batch, progress=run.progress and main, desc="eval before", loss=train.loss
    )
    before_samples = _samples(model, tokenizer, prompts, run.progress and main)
    say(f"eval loss before: {before_loss:.4f}")
    for ex, text in zip(prompts, before_samples, strict=True):
        say(f"  before | {_shown_prompt(ex)}\n         -> {text}")

    steps = train.max_steps or math.ceil(per_epoch / train.grad_accum) * train.epochs

    def batches(epoch: int, start: int):
        return D.iterate_batches(
            train_ds,
            train.batch_size,
            seed=train.seed,
            epoch=epoch,
            start=start,
            packing=train.packing,
            group_by_length=train.group_by_length,
        )

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"eval_loss": loss_on(m, eval_ds, eval_batch, progress=run.progress and main, loss=train.loss)}

    if main:
        out.mkdir(parents=True, exist_ok=True)
        if run.overwrite and not resume:
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
        resume=resume,
        progress=run.progress,
        resume_hint=f"run `lorakit train --out {shlex.quote(str(out))} --resume`",
    )
    sharded = is_sharded(model)
    if not main and not sharded:
        return {}
    # A sharded model's forward gathers each block from every rank: all ranks run these.
    last = result.evals[-1] if result.evals else {}
    if last.get("step") == result.steps and "eval_loss" in last:
        after_loss = last["eval_loss"]  # fit's own evaluation of the final weights, not run twice
    else:
        after_loss = loss_on(
            model, eval_ds, eval_batch, progress=run.progress and main, desc="eval after", loss=train.loss
        )
    after_samples = _samples(model, tokenizer, prompts, run.progress and main)
    if not main:
        return {}
    say(f"eval loss after: {after_loss:.4f} (before {before_loss:.4f})")
    for ex, text in zip(prompts, after_samples, strict=True):
        say(f"  after  | {_shown_prompt(ex)}\n         -> {text}")
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


_NOT_RECORDED = frozenset({"out", "resume", "overwrite", "threads", "progress"})
"""TrainRun fields that say how this invocation runs, not what the run is: never taken from a record."""


def recorded_settings(out: str | Path) -> dict[str, Any] | None:
    """The settings a run in `out` was started with (its `run_config.json`), as one flat dict of
    `TrainRun`, `LoraConfig` and `TrainConfig` fields (how this invocation runs — `out`, `resume`,
    `overwrite`, `threads`, `progress` — left out); None when `out` holds no run_config.json.

    Raises:
        ConfigError: run_config.json is unreadable.
    """
    path = Path(out) / "run_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        sections = [data["run"], data["lora"], data["train"]]
        if not all(isinstance(section, dict) for section in sections):
            raise TypeError("a section is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path}: not a lorakit run configuration ({err}); pass the run's settings as flags"
        ) from None
    return {k: v for section in sections for k, v in section.items() if k not in _NOT_RECORDED}


# ------------------------------------------------------------------------------------------ helpers
def _check_sizes(run: TrainRun) -> None:
    problems = [
        f"{name} must be an integer >= 1 or None, got {value!r}"
        for name in ("eval_max_rows", "eval_batch_size")
        if (value := getattr(run, name)) is not None
        and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
    ]
    for name, allowed in (("train_on", D.TRAIN_ON), ("truncate", ("right", "left"))):
        if getattr(run, name) not in allowed:
            problems.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(run, name)!r}")
    try:
        D.check_fields(run.fields)
    except ConfigError as err:
        problems.append(str(err))
    if problems:
        raise ConfigError("invalid TrainRun:\n" + "\n".join(f"  - {p}" for p in problems))


def _check_out(run: TrainRun, info: DistInfo) -> tuple[Path, Path | None, str | None]:
    """(out, the checkpoint to resume from or None, a line to print) — or refuse, writing nothing
    but this: to resume, rank 0 sets incomplete checkpoints newer than the one chosen aside, with a
    warning (`checkpoint.resumable`)."""
    out = atomic.check_target(run.out, directory=True)  # a folder, or one that can be made
    finished = (out / "adapter" / "adapter_config.json").is_file()
    checkpoint = latest_checkpoint(out) if out.is_dir() else None
    if run.resume:
        checkpoint = resumable(out, set_aside=info.is_main, warn=info.is_main)
        if checkpoint is not None:
            return out, checkpoint, f"resuming {out} from {checkpoint.name}"
        if finished and not run.overwrite:
            raise ConfigError(
                f"--resume: {out} holds a finished run with no checkpoint to continue from; "
                "pass --overwrite to train it again, or another --out"
            )
        others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
        if others and not (out / "run_config.json").is_file():
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise ConfigError(
                f"--resume: {out} holds no lorakit run (no run_config.json, no checkpoints/; it has {shown}); "
                "give the --out of the run to continue"
            )
        why = "the run stopped before its first checkpoint" if others else "nothing has run there yet"
        return out, None, f"--resume: no checkpoint in {out} ({why}): starting the run from step 0"
    if finished and not run.overwrite:
        raise ConfigError(f"{out} already holds a finished run; pass --overwrite, --resume, or another --out")
    if checkpoint is not None and not run.overwrite:
        raise ConfigError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it, or another --out")
    return out, None, None


def _continue_hint(err: FileWriteError, out: Path) -> FileWriteError:
    """`err` with what to do next: once there is room, resume from the newest complete checkpoint
    (or, with none yet, run the same command again)."""
    try:
        checkpoint = resumable(out, warn=False)
    except CheckpointError:
        checkpoint = None
    if checkpoint is not None:
        then = (
            f"the newest complete checkpoint is {checkpoint.name}: once there is room, "
            f"`lorakit train --out {shlex.quote(str(out))} --resume` continues from it"
        )
    else:
        then = "no checkpoint was written yet: once there is room, run the same command again"
    hinted = FileWriteError(f"{err}; {then}")
    hinted.errno, hinted.strerror, hinted.filename = err.errno, err.strerror, err.filename
    return hinted


def _warn_if_short_of_memory(run: TrainRun, lora: LoraConfig, train: TrainConfig, scheme: str | None) -> None:
    """Warn, in one line and before the model loads, when `lorakit.memory`'s estimate of this run
    exceeds the memory available (`memory.available_memory`, or `$LORAKIT_AVAILABLE_MEMORY`).

    A warning, not a refusal: the run goes on. Targets the model does not have are refused here
    (inject would refuse them after the load); anything else the estimate cannot read only skips it.
    """
    available = memory.available_memory("cpu")
    if available is None:
        return
    loss = train.loss
    try:
        est = memory.estimate(
            run.model,
            quantize=scheme,
            lora=lora,
            batch_size=train.batch_size,
            seq_len=run.seq_len,
            grad_checkpointing=train.grad_checkpointing,
            loss=loss,
            task=run.task,
            num_labels=run.num_labels,
        )
    except (TargetNotFoundError, UnsupportedLayerError):
        raise
    except Exception:  # advice only: a model the estimate cannot read may still train
        return
    total = est.total
    if total > available:
        warnings.warn(
            f"this run may run out of memory: its estimated peak, {memory.format_bytes(total)} (weights "
            f"{memory.format_bytes(est.weight_bytes)}, activations "
            f"{memory.format_bytes(est.activations.total(train.grad_checkpointing))}), exceeds the "
            f"{memory.format_bytes(available)} available; "
            + memory.advice(est, grad_checkpointing=train.grad_checkpointing, loss=loss),
            stacklevel=2,
        )


def _load_data(run: TrainRun, tokenizer: Any, seed: int):
    """(train dataset, eval dataset, eval examples for samples, eval rows before `eval_max_rows`)."""
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
        total = len(ey)
        chosen = _sample(list(range(total)), run.eval_max_rows, seed)
        ea, eb, ey = ([v[i] for i in chosen] if v else v for v in (ea, eb, ey))
        train = D.tokenize_classification(a, b, y, tokenizer, run.seq_len)
        evald = D.tokenize_classification(ea, eb, ey, tokenizer, run.seq_len)
        return train, evald, [], total
    examples = D.load_examples(run.data, tokenizer=tokenizer, fields=run.fields)
    if run.eval_data or run.data == "e2e":
        eval_examples = D.load_examples(run.eval_data or "e2e-dev", tokenizer=tokenizer, fields=run.fields)
        train_examples = examples
    else:
        train_examples, eval_examples = D.split_holdout(examples, run.eval_fraction, seed)
    total = len(eval_examples)
    eval_examples = _sample(eval_examples, run.eval_max_rows, seed)
    options = {"train_on": run.train_on, "train_on_eos": run.train_on_eos, "truncate": run.truncate}
    train = D.tokenize_examples(train_examples, tokenizer, run.seq_len, source=run.data, **options)
    eval_source = run.eval_data or ("e2e-dev" if run.data == "e2e" else f"{run.data} (held out)")
    evald = D.tokenize_examples(eval_examples, tokenizer, run.seq_len, source=eval_source, **options)
    return train, evald, eval_examples, total


def _sample(rows: list, n: int | None, seed: int) -> list:
    """At most n of `rows`: a sample fixed by `seed`, kept in file order."""
    if n is None or len(rows) <= n:
        return rows
    chosen = sorted(random.Random(f"lorakit-eval:{seed}").sample(range(len(rows)), n))
    return [rows[i] for i in chosen]


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


def _shown_prompt(example: D.Example) -> str:
    """A sample's prompt as printed: a conversation's last message before its reply, else the prompt."""
    if example.messages:
        last = max(i for i, m in enumerate(example.messages) if m.get("role") == "assistant")
        before = [m for m in example.messages[:last] if isinstance(m.get("content"), str)]
        if before:
            return " ".join(before[-1]["content"].split())
    return example.prompt.strip()


def _classifier_name(model: nn.Module) -> str:
    for name in ("classifier", "score"):
        if hasattr(model, name):
            return name
    raise ConfigError("could not find the classification head (classifier/score); pass --modules-to-save")


def _samples(model: nn.Module, tokenizer: Any, prompts: list[D.Example], progress: bool) -> list[str]:
    if not prompts:
        return []
    return generate(model, tokenizer, [p.prompt for p in prompts], Decoding(max_new_tokens=40), progress=progress)
