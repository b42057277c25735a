"""`lorakit generate`: continue a prompt with a base model plus adapter. Flags: `ModelSource`, `Decoding`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec
from lorakit.generate import Decoding, generate
from lorakit.models import ModelSource, load_source


@dataclass
class Prompt:
    """The text to continue.

    Args:
        prompt: the prompt (E2E style `name : X | area : Y ||` for an E2E adapter).
    """

    prompt: str = "name : The Eagle | Type : coffee shop | food : French | area : riverside ||"


def _run(source: ModelSource, prompt: Prompt, decoding: Decoding, echo: Callable[[str], None]) -> str:
    model, tokenizer, _ = load_source(source)
    (text,) = generate(model, tokenizer, [prompt.prompt], decoding)
    echo(text)
    return text


COMMAND = Command(
    name="generate",
    summary="Generate text with a base model plus a LoRA adapter.",
    specs=(
        FlagSpec(ModelSource, "model and adapter", exclude=frozenset({"task", "num_labels"})),
        FlagSpec(Prompt, "prompt"),
        FlagSpec(Decoding, "decoding"),
    ),
    run=_run,
    positional="adapter",
)
