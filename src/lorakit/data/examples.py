"""The unit every loader produces: a prompt the model reads and a completion it learns to write,
or a whole conversation rendered with the tokenizer's chat template."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Example"]


@dataclass(frozen=True)
class Example:
    """One training example: the model reads `prompt` and learns to write `completion`.

    A conversation (chat `messages`, ShareGPT, Alpaca, TRL's conversational prompt/completion)
    also keeps its whole message list in `messages`: it is tokenised from there, with the
    tokenizer's chat template and the masks it gives (`lorakit.data.chat`), and `prompt` /
    `completion` are only what sample generations start from and show.

    Attributes:
        prompt: Text the loss ignores ("" for plain-text records). For a conversation: the
            conversation up to its last assistant turn, rendered with the generation prompt.
        completion: Text the loss is computed on; `tokenize_examples` appends EOS. For a
            conversation: its last assistant message's content.
        group: Examples with the same group share one input (E2E: the MR, so all references of
            one MR stay together in `split_holdout` and can be scored together); None otherwise.
        messages: A conversation's messages (`{"role": ..., "content": ...}` dicts, roles
            system/user/assistant/tool, other keys such as `tool_calls` kept for the template);
            None for prompt/completion and text examples.
        prompt_messages: How many leading `messages` are a prompt whose assistant turns are
            context, never trained (TRL's conversational prompt/completion); 0 otherwise.
        origin: Where the record came from (`data.jsonl, line 3`), for error messages; not
            compared.
    """

    prompt: str
    completion: str
    group: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    prompt_messages: int = 0
    origin: str | None = field(default=None, compare=False, repr=False)
