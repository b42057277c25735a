"""End-to-end jobs behind the CLI: train, eval, generate, merge, inspect.

Each job is one function over an options dataclass; the CLI only parses flags into it. The
options' docstrings are the CLI's `--help` text.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import lorakit
from lorakit import atomic
from lorakit import data as D
from lorakit.errors import ConfigError, DataError
from lorakit.state import lora_layers
from lorakit.targeting import adaptable_modules, resolve_targets

__all__ = [
    "EvalOptions",
    "GenerateOptions",
    "InspectOptions",
    "MergeOptions",
    "TrainOptions",
    "eval_run",
    "generate_run",
    "inspect_run",
    "merge_run",
    "train_run",
]

Printer = Callable[[str], None]


@dataclass
class TrainOptions:
    """Fine-tune a model with LoRA. With no flags: the packaged SmolLM2-135M-Instruct on the bundled E2E sample.

    Args:
        model: base model: `smollm2-135m` (packaged default), `minilm-l6` (packaged encoder, for
            classification), a local transformers model directory, or a `.gguf` file.
        data: training data: a JSONL/JSON file (`text`, `prompt`/`completion` or chat `messages`), a CSV, an
            E2E file (official `mr,ref` CSV or the LoRA `.txt` format), a GLUE TSV for classification, or
            `e2e` (the bundled sample).
        eval_data: held-out data in the same formats (default: `e2e-dev` for `e2e`, else a held-out fraction).
        eval_fraction: fraction of the training data held out for eval when no eval data is given.
        task: `causal-lm` or `classification` (sequence-classification head trained in full).
        num_labels: classes, for classification.
        target: modules to adapt: comma-separated names (`q_proj,v_proj`), a regex, or `all-linear`.
            Default: the attention query and value projections (the paper's choice).
        r: LoRA rank.
        lora_alpha: LoRA alpha; the update is scaled by alpha/r.
        lora_dropout: dropout on the LoRA branch input.
        rslora: scale by alpha/sqrt(r) (rank-stabilised LoRA).
        modules_to_save: comma-separated modules trained in full (default for classification: the head).
        lr: peak learning rate (AdamW on the trainable parameters only).
        weight_decay: AdamW weight decay (not applied to biases and norms).
        schedule: learning-rate schedule after warm-up: `cosine`, `linear` or `constant`.
        warmup_steps: linear warm-up steps.
        batch_size: examples per micro-batch (the global batch: split over processes under torchrun).
        grad_accum: micro-batches per optimizer step (effective batch = batch_size × grad_accum).
        max_grad_norm: gradient clipping norm (0 disables).
        epochs: passes over the training data (ignored when max_steps is set).
        max_steps: optimizer steps to run.
        seq_len: maximum tokens per example; longer rows are truncated (counted in the summary).
        label_smoothing: label smoothing of the cross-entropy loss.
        loraplus_lr_ratio: LoRA+: the B matrices learn this many times faster than A.
        grad_checkpointing: recompute activations in the backward pass to save memory.
        seed: random seed (initialisation, data order, dropout).
        eval_every: evaluate every N steps (default: at the start and the end only).
        save_every: write a checkpoint every N steps (default: only at the end).
        samples: prompts from the eval data to generate from before and after training.
        out: output directory (adapter/, checkpoints/, metrics.jsonl, loss.png, run_config.json).
        resume: continue from the latest checkpoint in `out`.
        overwrite: allow writing into an `out` that already holds a finished run.
        threads: torch CPU threads (default: torch's choice).
        progress: show a progress bar.
    """

    model: str | None = None
    data: str = "e2e"
    eval_data: str | None = None
    eval_fraction: float = 0.1
    task: Literal["causal-lm", "classification"] = "causal-lm"
    num_labels: int = 2
    target: str | None = None
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    rslora: bool = False
    modules_to_save: str | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup_steps: int = 10
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = 60
    seq_len: int = 96
    label_smoothing: float = 0.0
    loraplus_lr_ratio: float | None = None
    grad_checkpointing: bool = False
    seed: int = 0
    eval_every: int | None = None
    save_every: int | None = None
    samples: int = 2
    out: str = "runs/lorakit-train"
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None
    progress: bool = True


@dataclass
class GenerateOptions:
    """Generate text with a base model plus a LoRA adapter.

    Args:
        adapter: adapter directory (PEFT format), or a training run's `out` directory.
        model: base model (default: the one recorded in the adapter, else the packaged default).
        prompt: the prompt text (E2E style `name : X | area : Y ||` for an E2E adapter).
        max_new_tokens: tokens to generate.
        num_beams: beam search width (1 = greedy or sampling).
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus-sampling threshold.
        length_penalty: beam-search length penalty.
        no_repeat_ngram_size: forbid repeated n-grams of this size (0 = off).
        seed: sampling seed.
    """

    adapter: str | None = None
    model: str | None = None
    prompt: str = "name : The Eagle | Type : coffee shop | food : French | area : riverside ||"
    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int = 0


@dataclass
class EvalOptions:
    """Evaluate a model (with an adapter, or the base model alone) on a dataset.

    Args:
        adapter: adapter directory or training run directory (omit to evaluate the base model).
        model: base model (default: the one recorded in the adapter, else the packaged default).
        data: evaluation data (same formats as `train`; `e2e-dev` is the bundled E2E dev sample).
        task: `causal-lm` or `classification`.
        num_labels: classes, for classification.
        seq_len: maximum tokens per example.
        batch_size: examples per forward pass.
        e2e_metrics: for E2E data, also decode every MR (beam search) and score BLEU, NIST, METEOR,
            ROUGE-L and CIDEr against all its references.
        max_mrs: score only the first N MRs (E2E metrics).
        num_beams: beam width for E2E decoding (the paper: 10).
        max_new_tokens: decoding length limit (the paper: 64).
    """

    adapter: str | None = None
    model: str | None = None
    data: str = "e2e-dev"
    task: Literal["causal-lm", "classification"] = "causal-lm"
    num_labels: int = 2
    seq_len: int = 128
    batch_size: int = 16
    e2e_metrics: bool = False
    max_mrs: int | None = None
    num_beams: int = 10
    max_new_tokens: int = 64


@dataclass
class MergeOptions:
    """Merge an adapter into its base model and write a plain transformers model directory.

    Args:
        adapter: adapter directory or training run directory.
        model: base model (default: the one recorded in the adapter, else the packaged default).
        out: directory for the merged model (must not exist, or be empty).
        task: `causal-lm` or `classification`.
        num_labels: classes, for classification.
    """

    adapter: str | None = None
    model: str | None = None
    out: str | None = None
    task: Literal["causal-lm", "classification"] = "causal-lm"
    num_labels: int = 2


@dataclass
class InspectOptions:
    """List a model's adaptable layers and what a LoRA config would adapt.

    Args:
        model: base model (default: the packaged SmolLM2-135M-Instruct).
        target: modules to adapt: comma-separated names, a regex, or `all-linear` (default: q and v).
        r: LoRA rank.
        task: `causal-lm` or `classification`.
    """

    model: str | None = None
    target: str | None = None
    r: int = 8
    task: Literal["causal-lm", "classification"] = "causal-lm"


# ------------------------------------------------------------------------------------------ helpers
def parse_target(text: str | None) -> list[str] | str | None:
    """`q_proj,v_proj` -> a list; `all-linear` or anything with regex characters -> as is."""
    if text is None or text == "all-linear":
        return text
    if re.search(r"[\\^$*+?()\[\]{}|]", text):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def _resolve_adapter_dir(path: str | None) -> Path:
    if not path:
        raise ConfigError("--adapter is required: an adapter directory or a training run's output directory")
    p = Path(path)
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    return p


def _load_with_adapter(adapter: str | None, model_spec: str | None, task: str, num_labels: int):
    from lorakit.models import PACKAGED_NAMES, load_model

    adapter_dir = _resolve_adapter_dir(adapter) if adapter else None
    spec = model_spec
    if adapter_dir is not None and spec is None:
        cfg = lorakit.read_adapter_config(adapter_dir)
        recorded = cfg.base_model_name_or_path
        if recorded in PACKAGED_NAMES.values():  # a packaged model records its upstream id, not its alias
            spec = next(alias for alias, name in PACKAGED_NAMES.items() if name == recorded)
        else:
            spec = recorded if recorded and Path(recorded).exists() else None
    model, tokenizer, name = load_model(spec, task=task, num_labels=num_labels)
    if adapter_dir is not None:
        lorakit.load_adapter(model, adapter_dir)
    model.eval()
    return model, tokenizer, name


@torch.no_grad()
def eval_loss(model: nn.Module, dataset: Any, batch_size: int, label_smoothing: float = 0.0) -> float:
    """Mean token cross-entropy (causal LM) or mean example cross-entropy (classification)."""
    from lorakit.train.loss import count_targets, loss_sum

    was = model.training
    model.eval()
    total = count = 0.0
    for batch in D.iterate_batches(dataset, batch_size, seed=0, epoch=0, shuffle=False):
        labels = batch.pop("labels")
        total += loss_sum(model(**batch).logits, labels, label_smoothing).item()
        count += count_targets(labels)
    model.train(was)
    return total / max(count, 1)


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


def _write_json(path: Path, data: Any) -> None:
    atomic.write_json(path, data)


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    """Draw training and eval loss curves from metrics.jsonl into a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, eval_steps, eval_losses = [], [], [], []
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and row.get("loss") is not None:
            steps.append(row["step"])
            losses.append(row["loss"])
        if row.get("eval_loss") is not None:
            eval_steps.append(row["step"])
            eval_losses.append(row["eval_loss"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, label="train loss", linewidth=1)
    if eval_losses:
        ax.plot(eval_steps, eval_losses, "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    atomic.write_file(out_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ------------------------------------------------------------------------------------------ train
def _load_data(opts: TrainOptions, tokenizer: Any):
    if opts.task == "classification":
        a, b, y = D.load_classification(opts.data)
        if opts.eval_data:
            ea, eb, ey = D.load_classification(opts.eval_data)
        else:
            # A seeded random held-out fraction (files are often sorted by label or source).
            n_eval = max(1, int(len(y) * opts.eval_fraction))
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(opts.seed)).tolist()
            held, kept = order[:n_eval], order[n_eval:]

            def pick(values, rows):
                return [values[i] for i in rows] if values else None

            ea, eb, ey = pick(a, held), pick(b, held), pick(y, held)
            a, b, y = pick(a, kept), pick(b, kept), pick(y, kept)
        train = D.tokenize_classification(a, b, y, tokenizer, opts.seq_len)
        evald = D.tokenize_classification(ea, eb, ey, tokenizer, opts.seq_len)
        return train, evald, [], train.truncated
    examples = D.load_examples(opts.data, tokenizer=tokenizer)
    if opts.eval_data or opts.data == "e2e":
        eval_examples = D.load_examples(opts.eval_data or "e2e-dev", tokenizer=tokenizer)
        train_examples = examples
    else:
        train_examples, eval_examples = D.split_holdout(examples, opts.eval_fraction, opts.seed)
    train = D.tokenize_examples(train_examples, tokenizer, opts.seq_len)
    evald = D.tokenize_examples(eval_examples, tokenizer, opts.seq_len)
    if len(train) == 0:
        raise DataError(f"{opts.data}: no usable rows after tokenisation (seq_len={opts.seq_len} too small?)")
    return train, evald, eval_examples, train.truncated


def _check_out(opts: TrainOptions) -> Path:
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    finished = (out / "adapter" / "adapter_config.json").is_file()
    started = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*"))
    if finished and not (opts.resume or opts.overwrite):
        raise ConfigError(f"{out} already holds a finished run; pass --overwrite, --resume, or another --out")
    if started and not (opts.resume or opts.overwrite):
        raise ConfigError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it, or another --out")
    return out


def train_run(opts: TrainOptions, echo: Printer = print) -> dict[str, Any]:
    """Load model and data, inject LoRA, train, evaluate before/after, and write the run's files.

    Returns:
        A summary dict (also written to `out/summary.json`).

    Raises:
        LorakitError subclasses for bad options, data, models or files; nothing in `out` is
        overwritten unless `overwrite`/`resume` says so.
    """
    from lorakit.models import load_model
    from lorakit.train import TrainConfig, fit, init_distributed

    if opts.threads:
        torch.set_num_threads(opts.threads)
    main = init_distributed().is_main
    say = echo if main else (lambda _msg: None)
    out = _check_out(opts)
    for source in (opts.data, opts.eval_data):
        if source and opts.task != "classification":
            D.resolve_source(source)  # a missing file is reported before the model loads
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    model, tokenizer, name = load_model(opts.model, task=opts.task, num_labels=opts.num_labels)
    say(
        f"model: {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"loaded in {time.perf_counter() - t0:.1f}s)"
    )
    train_ds, eval_ds, eval_examples, truncated = _load_data(opts, tokenizer)
    say(
        f"data: {len(train_ds)} training rows, {len(eval_ds)} eval rows"
        + (f"; {truncated} rows truncated to seq_len={opts.seq_len}" if truncated else "")
    )

    modules_to_save = [m.strip() for m in opts.modules_to_save.split(",")] if opts.modules_to_save else None
    if opts.task == "classification" and modules_to_save is None:
        modules_to_save = [_classifier_name(model)]
    config = lorakit.LoraConfig(
        r=opts.r,
        lora_alpha=opts.lora_alpha,
        lora_dropout=opts.lora_dropout,
        target_modules=parse_target(opts.target),
        use_rslora=opts.rslora,
        modules_to_save=modules_to_save,
        base_model_name_or_path=name,
    )
    lorakit.inject(model, config)
    trainable, total = lorakit.trainable_parameters(model)
    adapted = sum(1 for _ in lora_layers(model))
    say(
        f"LoRA: r={opts.r}, alpha={opts.lora_alpha} on {adapted} layers; trainable {trainable:,} of {total:,} "
        f"parameters ({100 * trainable / total:.3f}%)"
    )

    prompts = _distinct_prompts(eval_examples, opts.samples) if opts.task == "causal-lm" else []
    before_loss = eval_loss(model, eval_ds, opts.batch_size)
    before_samples = _samples(model, tokenizer, prompts)
    say(f"eval loss before: {before_loss:.4f}")
    for ex, text in zip(prompts, before_samples, strict=True):
        say(f"  before | {ex.prompt.strip()}\n         -> {text}")

    per_epoch = D.num_batches(train_ds, opts.batch_size)
    max_steps = opts.max_steps or math.ceil(per_epoch / opts.grad_accum) * opts.epochs
    tcfg = TrainConfig(
        lr=opts.lr,
        weight_decay=opts.weight_decay,
        warmup_steps=opts.warmup_steps,
        schedule=opts.schedule,
        max_steps=max_steps,
        batch_size=opts.batch_size,
        grad_accum=opts.grad_accum,
        max_grad_norm=opts.max_grad_norm or None,
        seed=opts.seed,
        eval_every=opts.eval_every,
        save_every=opts.save_every or max_steps,  # default: one checkpoint, at the end (see --help)
        loraplus_lr_ratio=opts.loraplus_lr_ratio,
        label_smoothing=opts.label_smoothing,
        grad_checkpointing=opts.grad_checkpointing,
    )

    def batches(epoch: int, start: int):
        return D.iterate_batches(train_ds, opts.batch_size, seed=opts.seed, epoch=epoch, start=start)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"eval_loss": eval_loss(m, eval_ds, opts.batch_size)}

    if main:
        out.mkdir(parents=True, exist_ok=True)
        if opts.overwrite and not opts.resume:
            # Everything is validated by now. The earlier run's checkpoints would make fit() refuse
            # to start (after run_config.json was already replaced) or a later --resume pick them up.
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        _write_json(out / "run_config.json", {"options": asdict(opts), "lora": asdict(config), "train": asdict(tcfg)})
    result = fit(
        model,
        batches,
        tcfg,
        out,
        batches_per_epoch=per_epoch,
        eval_fn=evaluate,
        resume=opts.resume,
        progress=opts.progress,
    )
    if not main:
        return {}
    model.eval()
    after_loss = eval_loss(model, eval_ds, opts.batch_size)
    after_samples = _samples(model, tokenizer, prompts)
    say(f"eval loss after: {after_loss:.4f} (before {before_loss:.4f})")
    for ex, text in zip(prompts, after_samples, strict=True):
        say(f"  after  | {ex.prompt.strip()}\n         -> {text}")
    if (out / "metrics.jsonl").is_file():
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    adapter_dir = out / "adapter"
    size = sum(p.stat().st_size for p in adapter_dir.iterdir() if p.is_file())
    summary = {
        "model": name,
        "steps": max_steps,
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
        "final_train_loss": getattr(result, "final_loss", None),
    }
    _write_json(out / "summary.json", summary)
    say(
        f"adapter: {adapter_dir} ({size / 1e6:.2f} MB; PEFT format) | metrics: {out / 'metrics.jsonl'} | "
        f"curves: {out / 'loss.png'} | checkpoints: {out / 'checkpoints'}"
    )
    return summary


def _classifier_name(model: nn.Module) -> str:
    for name in ("classifier", "score"):
        if hasattr(model, name):
            return name
    raise ConfigError("could not find the classification head (classifier/score); pass --modules-to-save")


def _samples(model: nn.Module, tokenizer: Any, prompts: list[D.Example]) -> list[str]:
    if not prompts:
        return []
    from lorakit.generate import generate

    return generate(model, tokenizer, [p.prompt for p in prompts], max_new_tokens=40)


# ------------------------------------------------------------------------------------------ others
def generate_run(opts: GenerateOptions, echo: Printer = print) -> str:
    """Generate from one prompt with base model + adapter; print and return the text."""
    from lorakit.generate import generate

    model, tokenizer, _ = _load_with_adapter(opts.adapter, opts.model, "causal-lm", 2)
    (text,) = generate(
        model,
        tokenizer,
        [opts.prompt],
        max_new_tokens=opts.max_new_tokens,
        num_beams=opts.num_beams,
        do_sample=opts.do_sample,
        temperature=opts.temperature,
        top_p=opts.top_p,
        length_penalty=opts.length_penalty,
        no_repeat_ngram_size=opts.no_repeat_ngram_size,
        seed=opts.seed,
    )
    echo(text)
    return text


def eval_run(opts: EvalOptions, echo: Printer = print) -> dict[str, float]:
    """Loss and perplexity (causal LM), accuracy/F1 (classification), E2E metrics on request."""
    from lorakit import metrics

    model, tokenizer, _ = _load_with_adapter(opts.adapter, opts.model, opts.task, opts.num_labels)
    result: dict[str, float] = {}
    if opts.task == "classification":
        a, b, y = D.load_classification(opts.data)
        ds = D.tokenize_classification(a, b, y, tokenizer, opts.seq_len)
        preds: list[int] = []
        with torch.no_grad():
            for batch in D.iterate_batches(ds, opts.batch_size, seed=0, epoch=0, shuffle=False):
                batch.pop("labels")
                preds += model(**batch).logits.argmax(-1).tolist()
        result = {"loss": eval_loss(model, ds, opts.batch_size), "accuracy": metrics.accuracy(preds, y)}
        if opts.num_labels == 2:
            result["f1"] = metrics.f1_binary(preds, y)
    else:
        examples = D.load_examples(opts.data, tokenizer=tokenizer)
        ds = D.tokenize_examples(examples, tokenizer, opts.seq_len)
        loss = eval_loss(model, ds, opts.batch_size)
        result = {"loss": loss, "perplexity": metrics.perplexity(loss)}
        if opts.e2e_metrics:
            result.update(_e2e_scores(model, tokenizer, examples, opts))
    for k, v in result.items():
        echo(f"{k}: {v:.4f}")
    return result


def _e2e_scores(model, tokenizer, examples: list[D.Example], opts: EvalOptions) -> dict[str, float]:
    from lorakit.e2e import e2e_metrics
    from lorakit.generate import generate

    groups: dict[str, tuple[str, list[str]]] = {}
    for ex in examples:
        if ex.group is None:
            raise DataError("--e2e-metrics needs E2E data (MRs with references)")
        _, refs = groups.setdefault(ex.group, (ex.prompt, []))
        refs.append(ex.completion.strip())
    items = list(groups.values())[: opts.max_mrs or None]
    preds = generate(
        model,
        tokenizer,
        [p for p, _ in items],
        max_new_tokens=opts.max_new_tokens,
        num_beams=opts.num_beams,
        length_penalty=0.8,
        no_repeat_ngram_size=4,
    )
    return e2e_metrics(preds, [refs for _, refs in items])


def merge_run(opts: MergeOptions, echo: Printer = print) -> Path:
    """Write base + adapter merged as a plain transformers model directory (atomically)."""
    if not opts.out:
        raise ConfigError("--out is required: the directory for the merged model")
    out = Path(opts.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not empty; nothing was written")
    model, tokenizer, _ = _load_with_adapter(opts.adapter, opts.model, opts.task, opts.num_labels)
    plain = lorakit.merge_and_unload(model, safe=True)

    def build(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    if out.exists():
        out.rmdir()  # empty, checked above
    atomic.build_directory(out, build)
    echo(f"merged model written to {out}")
    return out


def inspect_run(opts: InspectOptions, echo: Printer = print) -> dict[str, Any]:
    """Print the adaptable layers (with shapes) and what a config would adapt."""
    from lorakit.models import load_model

    model, _, name = load_model(opts.model, task=opts.task)
    layers = adaptable_modules(model)
    shapes: dict[str, tuple[str, list[int], int]] = {}
    for path, module in layers.items():
        leaf = path.rsplit(".", 1)[-1]
        entry = shapes.setdefault(leaf, (type(module).__name__, list(module.weight.shape), 0))
        shapes[leaf] = (entry[0], entry[1], entry[2] + 1)
    echo(f"{name}: {len(layers)} adaptable layers")
    for leaf, (kind, shape, count) in shapes.items():
        echo(f"  {leaf:<24} {kind:<10} weight {shape} ×{count}")
    config = lorakit.LoraConfig(r=opts.r, target_modules=parse_target(opts.target))
    targets = resolve_targets(model, config)
    total = sum(p.numel() for p in model.parameters())
    params = 0
    for t in targets:
        w = t.base.weight
        if isinstance(t.base, nn.Embedding):
            params += opts.r * (w.shape[0] + w.shape[1])
        else:
            params += (
                opts.r * (w.shape[0] + w.shape[1]) if w.dim() == 2 else opts.r * (math.prod(w.shape[1:]) + w.shape[0])
            )
    echo(
        f"config r={opts.r}, target={opts.target or 'default (q, v)'}: adapts {len(targets)} layers, "
        f"{params:,} trainable parameters ({100 * params / total:.3f}% of {total:,})"
    )
    return {"layers": len(layers), "adapted": len(targets), "trainable": params, "total": total}
