"""`lorakit eval`: score a model, with or without an adapter. Flags: `ModelSource`, `Evaluation`, `Decoding`."""

from __future__ import annotations

from collections.abc import Callable

from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec
from lorakit.evaluate import Evaluation, evaluate, prepare
from lorakit.generate import Decoding
from lorakit.models import ModelSource, load_source, load_tokenizer, recorded_base


def _run(source: ModelSource, evaluation: Evaluation, decoding: Decoding, echo: Callable[[str], None]) -> dict:
    # The data is read and tokenised first (with the tokenizer alone), so a bad file is reported
    # before the model loads.
    spec = source.model or (recorded_base(source.adapter) if source.adapter else None)
    data = prepare(evaluation, load_tokenizer(spec, task=source.task), task=source.task)
    model, tokenizer, _ = load_source(source)
    result = evaluate(
        model, tokenizer, evaluation, task=source.task, num_labels=source.num_labels, decoding=decoding, data=data
    )
    for key, value in result.items():
        echo(f"{key}: {value}" if isinstance(value, int) else f"{key}: {value:.4f}")
    return result


COMMAND = Command(
    name="eval",
    summary="Evaluate a model (with an adapter, or the base model alone) on a dataset.",
    specs=(
        FlagSpec(ModelSource, "model and adapter"),
        FlagSpec(Evaluation, "evaluation"),
        FlagSpec(
            Decoding,
            "decoding, for --e2e-metrics (the paper's: --num-beams 10 --length-penalty 0.8 --no-repeat-ngram-size 4)",
        ),
    ),
    run=_run,
    positional="adapter",
)
