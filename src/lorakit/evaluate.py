"""Evaluate a model on a dataset: loss and perplexity, accuracy and F1, the E2E NLG scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import data as D
from lorakit.errors import ConfigError, DataError
from lorakit.generate import Decoding, generate
from lorakit.train.loss import count_targets, loss_sum

__all__ = ["Evaluation", "evaluate", "loss_on"]


@dataclass
class Evaluation:
    """What `evaluate` measures, on which data.

    Args:
        data: evaluation data: the formats `lorakit train` reads (`e2e-dev` is the bundled E2E
            dev sample), or a GLUE TSV for classification.
        seq_len: maximum tokens per example; longer ones are cut at the end.
        batch_size: examples per forward pass.
        e2e_metrics: for E2E data, also decode every MR (with the decoding flags) and score BLEU,
            NIST, METEOR, ROUGE-L and CIDEr against all its references (needs lorakit[eval] and Java).
        max_mrs: score only the first N MRs (E2E metrics).

    Raises:
        ConfigError: a non-positive size.
    """

    data: str = "e2e-dev"
    seq_len: int = 128
    batch_size: int = 16
    e2e_metrics: bool = False
    max_mrs: int | None = None

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be an integer >= 1, got {getattr(self, name)!r}"
            for name in ("seq_len", "batch_size")
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        if self.max_mrs is not None and (not isinstance(self.max_mrs, int) or self.max_mrs < 1):
            problems.append(f"max_mrs must be an integer >= 1 or None, got {self.max_mrs!r}")
        if problems:
            raise ConfigError("invalid Evaluation:\n" + "\n".join(f"  - {p}" for p in problems))


@torch.no_grad()
def loss_on(model: nn.Module, dataset: Any, batch_size: int, label_smoothing: float = 0.0) -> float:
    """Mean token cross-entropy (causal LM) or mean example cross-entropy (classification), in eval mode.

    Args:
        model: the model; its train/eval mode is restored afterwards.
        dataset: from `data.tokenize_examples` or `data.tokenize_classification`.
        batch_size: rows per forward pass.
        label_smoothing: as in training.
    """
    was = model.training
    model.eval()
    total = count = 0.0
    for batch in D.iterate_batches(dataset, batch_size, seed=0, epoch=0, shuffle=False):
        labels = batch.pop("labels")
        total += loss_sum(model(**batch).logits, labels, label_smoothing).item()
        count += count_targets(labels)
    model.train(was)
    return total / max(count, 1)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    evaluation: Evaluation,
    *,
    task: str = "causal-lm",
    num_labels: int = 2,
    decoding: Decoding | None = None,
) -> dict[str, float]:
    """Score `model` on `evaluation.data`.

    Args:
        model: a causal LM or a sequence classifier (with or without adapters).
        tokenizer: its tokenizer.
        evaluation: the data and sizes.
        task: `causal-lm` or `classification`.
        num_labels: classes (F1 is reported for 2).
        decoding: how E2E predictions are decoded (default: greedy).

    Returns:
        Causal LM: `loss`, `perplexity` (+ `BLEU`, `NIST`, `METEOR`, `ROUGE_L`, `CIDEr` with
        `e2e_metrics`). Classification: `loss`, `accuracy` (+ `f1` for two classes).

    Raises:
        DataError: unreadable data, or E2E metrics asked for data without MRs.
        MissingExtraError: E2E metrics without the `eval` extra.
    """
    from lorakit import metrics

    if task == "classification":
        a, b, y = D.load_classification(evaluation.data)
        dataset = D.tokenize_classification(a, b, y, tokenizer, evaluation.seq_len)
        preds: list[int] = []
        with torch.no_grad():
            for batch in D.iterate_batches(dataset, evaluation.batch_size, seed=0, epoch=0, shuffle=False):
                batch.pop("labels")
                preds += model(**batch).logits.argmax(-1).tolist()
        result = {"loss": loss_on(model, dataset, evaluation.batch_size), "accuracy": metrics.accuracy(preds, y)}
        if num_labels == 2:
            result["f1"] = metrics.f1_binary(preds, y)
        return result
    examples = D.load_examples(evaluation.data, tokenizer=tokenizer)
    dataset = D.tokenize_examples(examples, tokenizer, evaluation.seq_len)
    loss = loss_on(model, dataset, evaluation.batch_size)
    result = {"loss": loss, "perplexity": metrics.perplexity(loss)}
    if evaluation.e2e_metrics:
        result.update(_e2e_scores(model, tokenizer, examples, evaluation.max_mrs, decoding))
    return result


def _e2e_scores(
    model: nn.Module, tokenizer: Any, examples: list[D.Example], max_mrs: int | None, decoding: Decoding | None
) -> dict[str, float]:
    from lorakit.e2e import e2e_metrics

    groups: dict[str, tuple[str, list[str]]] = {}
    for ex in examples:
        if ex.group is None:
            raise DataError("E2E metrics need E2E data (MRs with references)")
        _, refs = groups.setdefault(ex.group, (ex.prompt, []))
        refs.append(ex.completion.strip())
    items = list(groups.values())[: max_mrs or None]
    preds = generate(model, tokenizer, [p for p, _ in items], decoding)
    return e2e_metrics(preds, [refs for _, refs in items])
