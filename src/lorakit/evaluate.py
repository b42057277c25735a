"""Evaluate a model on a dataset: loss and perplexity, accuracy and F1, the E2E NLG scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit import data as D
from lorakit import metrics
from lorakit.e2e import e2e_metrics
from lorakit.errors import ConfigError, DataError
from lorakit.extras import require_extra
from lorakit.generate import Decoding, generate
from lorakit.modes import evaluating
from lorakit.train.chunked_loss import check_loss_options, model_loss_sum
from lorakit.train.loss import count_targets

__all__ = ["EvalData", "Evaluation", "evaluate", "loss_on", "prepare"]


@dataclass
class Evaluation:
    """What `evaluate` measures, on which data.

    Args:
        data: evaluation data: the formats `lorakit train` reads (`e2e-dev` is the bundled E2E
            dev sample), or a GLUE TSV for classification.
        seq_len: maximum tokens per example; longer ones are cut at the end.
        batch_size: examples per forward pass (no gradients are kept, so larger than a training batch).
        e2e_metrics: for E2E data, also decode every MR (with the decoding flags) and score BLEU,
            NIST, METEOR, ROUGE-L and CIDEr against all its references (needs lorakit[eval] and Java).
        max_mrs: E2E data: evaluate only the first N MRs: the loss on their rows (one per
            reference) and, with `e2e_metrics`, their decoded texts (default: every MR).
        max_rows: score the loss on the first N rows only, after `max_mrs` (default: every row).
        progress: show progress bars for the loss and the decoding.

    Raises:
        ConfigError: a non-positive size.
    """

    data: str = "e2e-dev"
    seq_len: int = 128
    batch_size: int = 16
    e2e_metrics: bool = False
    max_mrs: int | None = None
    max_rows: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be an integer >= 1, got {getattr(self, name)!r}"
            for name in ("seq_len", "batch_size")
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        for name in ("max_mrs", "max_rows"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be an integer >= 1 or None, got {value!r}")
        if problems:
            raise ConfigError("invalid Evaluation:\n" + "\n".join(f"  - {p}" for p in problems))


def loss_on(
    model: nn.Module,
    dataset: Any,
    batch_size: int,
    label_smoothing: float = 0.0,
    *,
    progress: bool = False,
    desc: str = "eval loss",
    loss: str = "chunked",
) -> float:
    """Mean token cross-entropy (causal LM) or mean example cross-entropy (classification), in eval mode.

    Rows are batched in order of length, so a batch pads little (the mean does not depend on the
    order); no gradients are kept, so `batch_size` can be larger than a training batch. A causal
    LM's loss is computed without its (tokens × vocabulary) logits (`train.chunked_loss`).

    Args:
        model: the model; each module's train/eval mode is restored afterwards.
        dataset: from `data.tokenize_examples` or `data.tokenize_classification`.
        batch_size: rows per forward pass.
        label_smoothing: as in training.
        progress: show a tqdm bar over the batches (on stderr; it disappears when done).
        desc: the bar's label.
        loss: `"chunked"` or `"full"` (from the logits), as `TrainConfig.loss`.

    Raises:
        ConfigError: `loss` not `"chunked"` or `"full"`.
    """
    check_loss_options(loss, None)
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.input_ids[i]))
    starts = range(0, len(order), batch_size)
    device = next(model.parameters()).device
    total = count = 0.0
    with evaluating(model), torch.no_grad():
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False, dynamic_ncols=True):
            batch = {k: v.to(device) for k, v in dataset.collate(order[start : start + batch_size]).items()}
            labels = batch.pop("labels")
            total += model_loss_sum(model, batch, labels, label_smoothing, loss=loss).item()
            count += count_targets(labels)
    return total / max(count, 1)


@dataclass
class EvalData:
    """The rows `evaluate` scores, read, checked and tokenised (`prepare`: no model needed).

    Attributes:
        dataset: the tokenised rows whose loss is scored.
        labels: classification: each row's class; else None.
        items: E2E data with `e2e_metrics`: (prompt, references) of each MR to decode.
        mrs: E2E data limited by `max_mrs` or scored with `e2e_metrics`: how many MRs; else None.
    """

    dataset: Any
    labels: list[int] | None = None
    items: list[tuple[str, list[str]]] = field(default_factory=list)
    mrs: int | None = None


def prepare(evaluation: Evaluation, tokenizer: Any, *, task: str = "causal-lm") -> EvalData:
    """Read and tokenise `evaluation.data` as `evaluate` scores it: a bad file is reported before
    a model is loaded.

    Raises:
        DataError: unreadable data, or `max_mrs` / E2E metrics asked for data without MRs.
        MissingExtraError: E2E metrics without the `eval` extra.
    """
    if task == "classification":
        a, b, y = D.load_classification(evaluation.data)
        if evaluation.max_rows is not None:
            a, b, y = (v[: evaluation.max_rows] if v else v for v in (a, b, y))
        return EvalData(D.tokenize_classification(a, b, y, tokenizer, evaluation.seq_len), labels=list(y))
    if evaluation.e2e_metrics:
        require_extra("eval", "E2E scoring (--e2e-metrics)")  # reported now, not after the model loads

    examples = D.load_examples(evaluation.data, tokenizer=tokenizer)
    items: list[tuple[str, list[str]]] = []
    mrs = None
    if evaluation.max_mrs is not None or evaluation.e2e_metrics:
        groups = _mr_groups(examples)
        kept = set(list(groups)[: evaluation.max_mrs or None])
        examples = [ex for ex in examples if ex.group in kept]
        items = [groups[g] for g in groups if g in kept] if evaluation.e2e_metrics else []
        mrs = len(kept)
    examples = examples[: evaluation.max_rows or None]
    return EvalData(D.tokenize_examples(examples, tokenizer, evaluation.seq_len), items=items, mrs=mrs)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    evaluation: Evaluation,
    *,
    task: str = "causal-lm",
    num_labels: int = 2,
    decoding: Decoding | None = None,
    data: EvalData | None = None,
) -> dict[str, float]:
    """Score `model` on `evaluation.data`, with progress bars when `evaluation.progress`.

    Args:
        model: a causal LM or a sequence classifier (with or without adapters); run in eval mode.
        tokenizer: its tokenizer.
        evaluation: the data and sizes.
        task: `causal-lm` or `classification`.
        num_labels: classes (F1 is reported for 2).
        decoding: how E2E predictions are decoded (default: greedy).
        data: `prepare(evaluation, tokenizer, task=task)` when already made.

    Returns:
        Causal LM: `loss`, `perplexity`, `rows` (how many were scored; with `mrs` for E2E data
        limited by `max_mrs` or scored with `e2e_metrics`) (+ `BLEU`, `NIST`, `METEOR`,
        `ROUGE_L`, `CIDEr` with `e2e_metrics`). Classification: `loss`, `accuracy` (+ `f1` for
        two classes), `rows`.

    Raises:
        As `prepare`.
    """
    data = data or prepare(evaluation, tokenizer, task=task)
    dataset, show = data.dataset, evaluation.progress
    loss = loss_on(model, dataset, evaluation.batch_size, progress=show)
    if task == "classification":
        preds: list[int] = []
        device = next(model.parameters()).device
        batches = D.iterate_batches(dataset, evaluation.batch_size, seed=0, epoch=0, shuffle=False)
        total = D.num_batches(dataset, evaluation.batch_size)
        with evaluating(model), torch.no_grad():
            for batch in tqdm(batches, desc="predict", unit="batch", disable=not show, leave=False, total=total):
                batch.pop("labels")
                preds += model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).tolist()
        result = {"loss": loss, "accuracy": metrics.accuracy(preds, data.labels), "rows": len(dataset)}
        if num_labels == 2:
            result["f1"] = metrics.f1_binary(preds, data.labels)
        return result
    result = {"loss": loss, "perplexity": metrics.perplexity(loss), "rows": len(dataset)}
    if data.mrs is not None:
        result["mrs"] = data.mrs
    if evaluation.e2e_metrics:
        preds = generate(model, tokenizer, [p for p, _ in data.items], decoding, progress=show)
        result.update(e2e_metrics(preds, [refs for _, refs in data.items]))
    return result


def _mr_groups(examples: list[D.Example]) -> dict[str, tuple[str, list[str]]]:
    """MR -> (prompt, its references), in file order."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for ex in examples:
        if ex.group is None:
            raise DataError("max_mrs and E2E metrics need E2E data (MRs with references)")
        _, refs = groups.setdefault(ex.group, (ex.prompt, []))
        refs.append(ex.completion.strip())
    return groups
