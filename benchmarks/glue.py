"""GLUE (LoRA paper, Table 2): MiniLM-L6 + LoRA with a trained head vs PEFT LoRA vs full fine-tuning.

Question: on SST-2, MRPC, RTE (and CoLA), does LoRA on the query and value projections plus a
trained classification head reach full fine-tuning's accuracy with ~1% of the weights, and does
lorakit agree with PEFT trained identically?

Model: the packaged all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) with a fresh
2-way classification head (`BertForSequenceClassification`); the paper used RoBERTa-base (125M).

Data: only the GLUE *training* files are in `../shared/data/glue/` (the dev sets are held out
elsewhere), so by default a seeded `--holdout-fraction` of the training rows (10%) is set aside
and every method is scored on it; the tables say "held-out train". `--eval-file F` scores on any
GLUE TSV of the task instead (columns by header name: `sentence` or `sentence1`/`sentence2`, and
`label`; or the headerless CoLA format) and then all training rows are used.

Methods, each on a freshly loaded model (the same head initialisation: seeded before loading),
all trained by the same loop (`_experiments.train`), with the same seed and batch order:

- `lora`: `lorakit.inject`, r=8, alpha=8 on `query` and `value` (the paper's RoBERTa-base setting,
  Table 9), with `modules_to_save` = the head: `classifier` and BERT's `pooler` (the pooler's
  dense+tanh and the classifier are together what RoBERTa's classification head is: dense, tanh,
  out_proj; the paper trains that head in full).
- `peft`: PEFT 0.21 LoRA, same config, starting from exactly lorakit's initial A, B and head copies.
- `full`: every weight trained (`--full-lr`).

Training: AdamW, batch 16, weight decay 0.1, 6% linear warmup then linear decay, gradient norm
clipped to 1.0 (transformers' Trainer default, which the paper's `run_glue.py` used); LoRA lr per
task as the paper's Table 9 (SST-2 5e-4, MRPC 4e-4, RTE 5e-4, CoLA 4e-4). Not reproduced: the
paper's MRPC and RTE runs start from the MNLI-trained LoRA checkpoint, and its 30-80 epochs.

Run:

    .venv/bin/python benchmarks/glue.py --task rte --max-steps 5 --eval-size 32     # smoke
    .venv/bin/python benchmarks/glue.py --task mrpc                                 # CPU budget
    .venv/bin/python benchmarks/glue.py --task sst2 --preset paper --device cuda    # paper's epochs
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import _experiments as X
import _report
import torch

import lorakit
from lorakit import atomic, metrics
from lorakit import data as D
from lorakit.models import load_model
from lorakit.train import TrainConfig

METHODS = ("lora", "peft", "full")
TASKS = ("sst2", "mrpc", "rte", "cola")
TRAIN_FILES = {
    "sst2": ["sst2/train.tsv"],
    "mrpc": ["mrpc/train.tsv"],
    "rte": ["rte/train.tsv"],
    "cola": ["cola/train.tsv", "cola/val.tsv"],  # both are GLUE train (README: a random split of it)
}
# The paper's metric per task (Table 2 caption): Matthews correlation for CoLA, accuracy otherwise.
PAPER_METRIC = {"sst2": "accuracy", "mrpc": "accuracy", "rte": "accuracy", "cola": "mcc"}
# LoRA paper Table 9 (RoBERTa-base LoRA): learning rate and epochs per task.
PAPER_LR = {"sst2": 5e-4, "mrpc": 4e-4, "rte": 5e-4, "cola": 4e-4}
PAPER_EPOCHS = {"sst2": 60, "mrpc": 30, "rte": 80, "cola": 80}
# LoRA paper Table 2, RoBERTa-base on the GLUE dev sets: LoRA (0.3M) and full fine-tuning (125M).
PAPER = {
    "RoBERTa-base LoRA (paper)": (0.3e6, {"sst2": 95.1, "mrpc": 89.7, "rte": 86.6, "cola": 63.4}),
    "RoBERTa-base FT (paper)": (125.0e6, {"sst2": 94.8, "mrpc": 90.2, "rte": 78.7, "cola": 63.6}),
}

PRESETS: dict[str, dict[str, Any]] = {
    # A 2-core CPU budget: 1,000 steps of batch 16 (~7 epochs of RTE, ~1/4 epoch of SST-2).
    "cpu": {"max_steps": 1000, "epochs": None},
    # The paper's epochs per task (Table 9); meant for --device cuda.
    "paper": {"max_steps": None, "epochs": "paper"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="budget defaults; explicit flags win")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--model", default="minilm-l6", help="packaged alias or model directory")
    X.add_data_dir_flag(p)
    p.add_argument("--train-file", help="comma-separated GLUE TSVs (default: the task's files in <data-dir>/glue)")
    p.add_argument("--eval-file", help="a GLUE TSV of the task to score on (default: held-out train rows)")
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="share of train held out when no --eval-file")
    p.add_argument("--train-size", type=int, help="train on a seeded random subset of N rows (default: all)")
    p.add_argument("--eval-size", type=int, help="score only the first N evaluation rows")
    p.add_argument("--max-steps", type=int, help="optimizer steps (wins over --epochs)")
    p.add_argument("--epochs", help="passes over the training rows when --max-steps is unset ('paper': Table 9's)")
    p.add_argument("--lr", type=float, help="LoRA learning rate (default: the paper's for the task)")
    p.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tuning learning rate")
    p.add_argument("-r", "--r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--target", default="query,value", help="comma-separated target module names")
    p.add_argument("--modules-to-save", default="classifier,pooler", help="trained in full with LoRA (the head)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--seq-len", type=int, default=256, help="longest row in tokens (longer rows are truncated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", help="output directory (default: runs/glue-<task>)")
    args = X.parse_with_preset(p, PRESETS, argv)
    epochs_problem = []
    if args.epochs == "paper":
        args.epochs = PAPER_EPOCHS[args.task]
    elif args.epochs is not None:
        if not args.epochs.isdigit():
            epochs_problem.append(f"--epochs must be a positive integer or 'paper', got {args.epochs!r}")
        args.epochs = int(args.epochs) if args.epochs.isdigit() else None
    methods, problems = X.run_problems(args, METHODS)
    problems = epochs_problem + problems
    if not 0 < args.holdout_fraction < 1:
        problems.append(f"--holdout-fraction must be in (0, 1), got {args.holdout_fraction}")
    if not args.train_file:
        files = [X.data_file(args.data_dir, "glue", *name.split("/")) for name in TRAIN_FILES[args.task]]
        args.train_file = ",".join(map(str, files))
    for path in [*args.train_file.split(","), *([args.eval_file] if args.eval_file else [])]:
        if not Path(path).is_file():
            problems.append(f"no such file: {path}")
    if problems:
        p.error("\n  ".join(problems))
    args.methods = methods
    args.lr = args.lr if args.lr is not None else PAPER_LR[args.task]
    args.out = args.out or f"runs/glue-{args.task}"
    return args


Rows = tuple[list[str], list[str] | None, list[int]]


def _take(rows: Rows, indices: list[int]) -> Rows:
    a, b, y = rows
    return [a[i] for i in indices], ([b[i] for i in indices] if b is not None else None), [y[i] for i in indices]


def load_rows(args: argparse.Namespace) -> tuple[Rows, Rows, str]:
    """(train rows, eval rows, a description of the eval set), split and subset as the flags say."""
    parts = [D.load_classification(path) for path in args.train_file.split(",")]
    train: Rows = (
        [a for part in parts for a in part[0]],
        [b for part in parts for b in part[1]] if parts[0][1] is not None else None,
        [y for part in parts for y in part[2]],
    )
    n = len(train[2])
    if args.eval_file:
        evaluation, described = D.load_classification(args.eval_file), f"{Path(args.eval_file).name}"
    else:
        order = list(range(n))
        random.Random(f"glue-holdout:{args.seed}").shuffle(order)
        held = sorted(order[: max(1, round(args.holdout_fraction * n))])
        kept = sorted(order[len(held) :])
        evaluation, train = _take(train, held), _take(train, kept)
        described = f"held-out train ({100 * args.holdout_fraction:g}%, seed {args.seed})"
    if args.train_size is not None and args.train_size < len(train[2]):
        keep = sorted(random.Random(f"glue-subset:{args.seed}").sample(range(len(train[2])), args.train_size))
        train = _take(train, keep)
    if args.eval_size is not None:
        evaluation = _take(evaluation, list(range(min(args.eval_size, len(evaluation[2])))))
    return train, evaluation, described


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: D.ClassificationDataset, batch_size: int) -> list[int]:
    """Argmax class of every row, in dataset order."""
    model.eval()
    device = next(model.parameters()).device
    preds: list[int] = []
    for batch in D.iterate_batches(dataset, batch_size, seed=0, epoch=0, shuffle=False):
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        preds += logits.argmax(-1).tolist()
    return preds


def scores(preds: list[int], labels: list[int]) -> dict[str, float]:
    """Accuracy, binary F1 and Matthews correlation, each ×100."""
    return {
        "accuracy": 100 * metrics.accuracy(preds, labels),
        "f1": 100 * metrics.f1_binary(preds, labels),
        "mcc": 100 * metrics.matthews_corrcoef(preds, labels),
    }


def run_method(
    method: str, args: argparse.Namespace, device: torch.device, train_rows: Rows, eval_rows: Rows, out: Path
) -> dict[str, Any]:
    """Load a fresh model, set up `method`, train, predict and score; write its files."""
    folder = out / method
    folder.mkdir(parents=True, exist_ok=True)
    num_labels = max(max(train_rows[2]), max(eval_rows[2])) + 1
    torch.manual_seed(args.seed)  # the same fresh head for every method
    model, tokenizer, name = load_model(args.model, task="classification", num_labels=num_labels)
    base_params = X.count_parameters(model)
    head = [m.strip() for m in args.modules_to_save.split(",") if m.strip()]
    head_params = sum(
        p.numel()
        for path, module in model.named_modules()
        if path.rsplit(".", 1)[-1] in head
        for p in module.parameters()
    )
    result: dict[str, Any] = {"method": method, "model": name, "base_parameters": base_params}
    config = lorakit.LoraConfig(
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=[t.strip() for t in args.target.split(",")],
        modules_to_save=head or None,
        base_model_name_or_path=name,
    )
    model, setup = X.set_up_method(method, model, config, args.seed, folder, device)
    result.update(setup, head_parameters=head_params if method != "full" else None)
    trainable = setup["trainable_parameters"]

    train_ds = D.tokenize_classification(*train_rows, tokenizer, args.seq_len)
    eval_ds = D.tokenize_classification(*eval_rows, tokenizer, args.seq_len)
    steps = args.max_steps or args.epochs * D.num_batches(train_ds, args.batch_size)
    cfg = TrainConfig(
        lr=args.full_lr if method == "full" else args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=math.ceil(args.warmup_ratio * steps),
        schedule="linear",
        max_steps=args.max_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_grad_norm=args.max_grad_norm or None,
        seed=args.seed,
        save_every=None,
    )
    print(
        f"[{method}] training {trainable:,} of {base_params:,} parameters on {len(train_ds)} rows: "
        f"{steps} steps of {cfg.batch_size}, lr {cfg.lr:g}, warmup {cfg.warmup_steps}",
        flush=True,
    )
    stats = X.train(model, train_ds, cfg, folder, label=method)
    result.update(X.train_record(stats, train_ds, cfg))
    result["adapter_bytes"] = X.directory_bytes(stats.saved)

    started = time.perf_counter()
    preds = predict(model, eval_ds, 64)
    result["eval_seconds"] = time.perf_counter() - started
    result["eval_rows"] = len(preds)
    result["scores"] = scores(preds, eval_rows[2])
    atomic.write_text(
        folder / "predictions.tsv",
        "index\tlabel\tprediction\n"
        + "".join(f"{i}\t{y}\t{p}\n" for i, (y, p) in enumerate(zip(eval_rows[2], preds, strict=True))),
    )
    atomic.write_json(folder / "scores.json", result["scores"])
    print(f"[{method}] " + "  ".join(f"{k} {v:.2f}" for k, v in result["scores"].items()), flush=True)
    del model
    X.release_memory()
    return result


def table(results: dict[str, Any], task: str) -> str:
    """Our methods and the paper's two RoBERTa-base rows for this task, as markdown."""
    metric = PAPER_METRIC[task]
    headers = ["method", "trainable (head)", "%", "adapter file", "steps", "train", "s/step", "accuracy", "F1", "MCC"]
    headers.append(f"paper ({'MCC' if metric == 'mcc' else 'accuracy'}, GLUE dev)")
    labels = {"lora": "lorakit LoRA", "peft": "PEFT LoRA", "full": "full FT"}
    rows = []
    for method in METHODS:
        r = results["methods"].get(method)
        if r is None:
            continue
        s = r["scores"]
        head = f" ({X.human_count(r['head_parameters'])})" if r.get("head_parameters") else ""
        rows.append(
            [
                labels[method],
                X.human_count(r["trainable_parameters"]) + head,
                f"{100 * r['trainable_parameters'] / r['base_parameters']:.2f}",
                X.human_bytes(r["adapter_bytes"]) + (" (model)" if method == "full" else ""),
                r["steps"],
                f"{r['train_seconds'] / 60:.1f} min",
                f"{r['seconds_per_step']:.2f}",
                f"{s['accuracy']:.1f}",
                f"{s['f1']:.1f}",
                f"{s['mcc']:.1f}",
                "-",
            ]
        )
    for label, (params, paper) in PAPER.items():
        rows.append([label, X.human_count(int(params)), "-", "-", "-", "-", "-", "-", "-", "-", f"{paper[task]:.1f}"])
    return _report.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen methods on one task, write `results.json`, print the table."""
    args = parse_args(argv)
    device = X.setup_device(args.device, args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows, described = load_rows(args)
    print(f"{args.task}: {len(train_rows[2])} training rows; scored on {len(eval_rows[2])} rows of {described}")
    methods = X.run_methods(args, lambda method: run_method(method, args, device, train_rows, eval_rows, out))
    update = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "task": args.task,
        "eval": {"set": described, "rows": len(eval_rows[2])},
        "environment": X.environment(),
        "methods": methods,
    }
    heading = f"{args.task.upper()}, scored on {described}, {len(eval_rows[2])} rows\n\n"
    results, _ = X.finish(out, update, lambda merged: heading + table(merged, args.task))
    return results


if __name__ == "__main__":
    main()
