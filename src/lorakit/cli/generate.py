"""`lorakit generate`: continue a prompt (or answer it through the chat template: `--chat`) with a
base model plus adapter. Flags: `ModelSource`, `Prompt`, `Decoding`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec
from lorakit.data.chat import user_prompt
from lorakit.errors import ConfigError
from lorakit.generate import Decoding, generate
from lorakit.models import ModelSource, load_source


@dataclass
class Prompt:
    """The text to continue.

    Args:
        prompt: the prompt (E2E style `name : X | area : Y ||` for an E2E adapter).
        chat: send the prompt as a user message through the tokenizer's chat template, the
            assistant's turn opened (as `lorakit train` renders chat, Alpaca and preference data,
            and as `lorakit serve`'s /v1/chat/completions does); without it the text is continued
            as it is.
        system: a system message before the prompt (with --chat).
    """

    prompt: str = "name : The Eagle | Type : coffee shop | food : French | area : riverside ||"
    chat: bool = False
    system: str | None = None


def _run(source: ModelSource, prompt: Prompt, decoding: Decoding, echo: Callable[[str], None]) -> str:
    if prompt.system is not None and not prompt.chat:
        raise ConfigError("--system is a chat message; add --chat")
    model, tokenizer, _ = load_source(source)
    text = user_prompt(prompt.prompt, tokenizer, system=prompt.system) if prompt.chat else prompt.prompt
    (reply,) = generate(model, tokenizer, [text], decoding)
    echo(reply)
    return reply


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
