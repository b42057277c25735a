"""Conversations rendered with the tokenizer's own chat template, and which of their tokens train.

A conversation (`Example.messages`) is rendered once, whole, with `tokenizer.apply_chat_template`
and tokenised once; its labels are its token ids where it trains and `IGNORE_INDEX` elsewhere.
Which tokens belong to an assistant turn comes from the template itself, never from searching the
text for role names:

- A template with `{% generation %}` blocks marks them: transformers'
  `apply_chat_template(..., return_assistant_tokens_mask=True)` gives the marked tokens, one run per
  assistant message.
- Any other template is rendered on prefixes of the conversation. An assistant message `i` is the
  text that `messages[:i + 1]` adds to `messages[:i]` rendered with the generation prompt (the
  header the model is given before it replies). The whole conversation's text must start with each
  prefix's text (the template is *prefix-stable*), so these character spans are spans of the one
  rendering, and its tokens are mapped to them by their character offsets. A template that changes
  earlier text once more messages follow (one that drops past reasoning, say), or a token that
  crosses the start of a reply, is a `DataError`, never a guessed mask.

Which turns train (`train_on`): `"assistant"` every assistant message (the default; a TRL
conversational prompt/completion's prompt messages are context and never train), `"last"` only the
last assistant message, `"all"` every token.

The end of a turn (`train_on_eos`): templates end an assistant turn with a special token (`<|im_end|>`
for ChatML and SmolLM2, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma), often followed by
plain text such as a newline. A turn trains up to and including its last special token, so the
model learns to stop, and not the text after it, which it never generates; with
`train_on_eos=False` that token is left out too. A `{% generation %}` block that stops before the
end token takes the special token right after it. A turn without any special token trains whole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from lorakit.data.examples import Example
from lorakit.errors import ConfigError, DataError

__all__ = [
    "ROLES",
    "TRAIN_ON",
    "TrainOn",
    "encode_conversations",
    "generation_prompt",
    "has_generation_blocks",
    "render",
    "special_ids",
    "user_prompt",
]

TrainOn = Literal["assistant", "last", "all"]
TRAIN_ON: tuple[str, ...] = ("assistant", "last", "all")
"""The values of `train_on`."""
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
"""The message roles a conversation may hold (OpenAI's, as TRL reads them)."""

IGNORE_INDEX = -100  # lorakit.data.tokenize.IGNORE_INDEX; tokenize imports this module
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check_train_on(train_on: str) -> None:
    """Raise `ConfigError` unless `train_on` is one of `TRAIN_ON`."""
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}; got {train_on!r}")


def has_generation_blocks(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template marks assistant text with `{% generation %}` blocks."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and _GENERATION.search(template) is not None


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the tokenizer's special tokens: the named ones and every added token marked special."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False))
    return frozenset(ids)


def render(messages: Sequence[dict[str, Any]], tokenizer: Any, *, add_generation_prompt: bool, where: str) -> str:
    """The text of `messages` as the tokenizer's chat template writes it.

    Args:
        messages: The conversation (or a prefix of it).
        tokenizer: A transformers tokenizer with a chat template.
        add_generation_prompt: End with the header that starts an assistant reply.
        where: The record, for messages (`data.jsonl, line 3`).

    Raises:
        DataError: the template fails on the conversation (its error is quoted).
    """
    try:
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja2's TemplateError (raise_exception), UndefinedError, TypeError, ...
        raise DataError(f"{where}: the chat template cannot render this conversation: {_quoted(err)}") from err


def generation_prompt(messages: Sequence[dict[str, Any]], tokenizer: Any, *, where: str) -> str:
    """The conversation up to its last assistant message, rendered with the generation prompt: what
    a model is given to write that message ("" when the conversation starts with it).

    Raises:
        DataError: no assistant message, or the template fails on the conversation.
    """
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: the conversation has no assistant message to learn")
    if last == 0:
        return ""
    return render(messages[:last], tokenizer, add_generation_prompt=True, where=where)


def user_prompt(text: str, tokenizer: Any, *, system: str | None = None) -> str:
    """`text` as a user message (after `system`, if given) through the tokenizer's chat template,
    the assistant's turn opened: what `lorakit generate --chat` continues, rendered as training
    renders a conversation's prompt and as `lorakit serve`'s chat endpoint does.

    Raises:
        ConfigError: the tokenizer has no chat template.
        DataError: the template fails on the conversation.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this model's tokenizer has no chat template; leave out --chat")
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": text})
    return render(messages, tokenizer, add_generation_prompt=True, where="--prompt")


def encode_conversations(
    examples: Sequence[Example], tokenizer: Any, *, train_on: str = "assistant", train_on_eos: bool = True
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of each conversation (examples with `messages`), untruncated.

    Args:
        examples: Conversation examples (`Example.messages` set).
        tokenizer: A fast transformers tokenizer with a chat template.
        train_on: `"assistant"`, `"last"` or `"all"` (see the module docstring).
        train_on_eos: Train the special token that ends each trained assistant turn.

    Returns:
        `(input_ids, labels)` per example, in order; labels are `-100` where nothing trains.

    Raises:
        ConfigError: an unknown `train_on`.
        DataError: no chat template or not a fast tokenizer (offsets are needed); a template that
            fails on a conversation, is not prefix-stable, or a token that crosses the start of a
            reply (each naming the record).
    """
    check_train_on(train_on)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("conversation records need a tokenizer with a chat template; this tokenizer has none")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("conversation records need a fast tokenizer (token offsets map the template's turns)")
    special = special_ids(tokenizer)
    if train_on != "all" and has_generation_blocks(tokenizer):
        return [_marked(ex, tokenizer, special, train_on, train_on_eos) for ex in examples]
    texts, spans = [], []
    for ex in examples:
        where = ex.origin or "a conversation"
        text = render(ex.messages or (), tokenizer, add_generation_prompt=False, where=where)
        texts.append(text)
        spans.append([] if train_on == "all" else _assistant_spans(ex, text, tokenizer, train_on, where))
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ex, text, ids, offsets, turn_spans in zip(
        examples, texts, encoded["input_ids"], encoded["offset_mapping"], spans, strict=True
    ):
        ids = list(ids)
        if train_on == "all":
            out.append((ids, list(ids)))
            continue
        labels = _labels_from_spans(
            ids, offsets, turn_spans, special, train_on_eos, ex.origin or "a conversation", text
        )
        out.append((ids, labels))
    return out


# ------------------------------------------------------------------------------------------ helpers
def _trained_turns(ex: Example, train_on: str) -> list[int]:
    """Indices of the assistant messages that train: past the prompt messages; only the last for "last"."""
    turns = [i for i, m in enumerate(ex.messages or ()) if m.get("role") == "assistant" and i >= ex.prompt_messages]
    return turns[-1:] if train_on == "last" else turns


def _assistant_spans(ex: Example, text: str, tokenizer: Any, train_on: str, where: str) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of the trained assistant messages in `text`, by prefix rendering."""
    messages = list(ex.messages or ())
    spans = []
    for i in _trained_turns(ex, train_on):
        if i == 0:
            raise DataError(
                f"{where}: message 1 is an assistant message with nothing before it, so the template's own "
                "text before it cannot be told apart from the reply; start with a system or user message"
            )
        before = render(messages[:i], tokenizer, add_generation_prompt=True, where=where)
        after = render(messages[: i + 1], tokenizer, add_generation_prompt=False, where=where)
        for shorter, longer, what in (
            (before, after, f"the conversation up to message {i} with the generation prompt"),
            (after, text, f"the conversation up to message {i + 1} (assistant)"),
        ):
            if not longer.startswith(shorter):
                raise DataError(
                    f"{where}: the chat template is not prefix-stable: {what} does not render as the start of "
                    f"the longer conversation ({_difference(shorter, longer)}), so the tokens of assistant "
                    f"message {i + 1} cannot be found by rendering prefixes; use a template with "
                    "{% generation %} blocks, or train_on='all'"
                )
        spans.append((len(before), len(after)))
    return spans


def _labels_from_spans(
    ids: list[int],
    offsets: Sequence[tuple[int, int]],
    spans: list[tuple[int, int]],
    special: frozenset[int],
    train_on_eos: bool,
    where: str,
    text: str,
) -> list[int]:
    """Labels from character spans: each span's tokens (by offset), up to its turn's end token."""
    labels = [IGNORE_INDEX] * len(ids)
    turns: list[list[int]] = [[] for _ in spans]
    crosses_end = [False] * len(spans)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        first, last = spans[k]
        if start < first < end:
            raise DataError(
                f"{where}: the token {text[start:end]!r} crosses the start of an assistant reply (the "
                "tokenizer merges the template's header with the reply), so the reply's tokens are not its own"
            )
        if start < first:
            continue
        if end > last:
            crosses_end[k] = True
            continue
        turns[k].append(t)
    for turn, crossed in zip(turns, crosses_end, strict=True):
        picked, ended = _through_end(turn, ids, special, train_on_eos, follow=None)
        if crossed and not ended:
            raise DataError(
                f"{where}: an assistant reply ends inside a token and no special token ends it, so its last "
                "token cannot be trained on its own"
            )
        for t in picked:
            labels[t] = ids[t]
    return labels


def _through_end(
    turn: list[int], ids: Sequence[int], special: frozenset[int], train_on_eos: bool, follow: int | None
) -> tuple[list[int], bool]:
    """The positions of a turn that train, and whether a special token ends it.

    The turn trains up to its last special token (included with `train_on_eos`); without one, the
    token at `follow` (right after a `{% generation %}` block) is taken when it is special.
    """
    ends = [p for p, t in enumerate(turn) if ids[t] in special]
    if ends:
        cut = ends[-1] + 1 if train_on_eos else ends[-1]
        return turn[:cut], True
    if follow is not None and follow < len(ids) and ids[follow] in special:
        return ([*turn, follow] if train_on_eos else turn), True
    return turn, False


def _marked(
    ex: Example, tokenizer: Any, special: frozenset[int], train_on: str, train_on_eos: bool
) -> tuple[list[int], list[int]]:
    """Ids and labels from a template's `{% generation %}` blocks (transformers' assistant mask)."""
    where = ex.origin or "a conversation"
    messages = [dict(m) for m in ex.messages or ()]
    try:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception as err:
        raise DataError(f"{where}: the chat template cannot render this conversation: {_quoted(err)}") from err
    ids = [int(t) for t in encoded["input_ids"]]
    runs = _runs(encoded["assistant_masks"])
    if train_on == "last" or ex.prompt_messages:
        replies = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if len(runs) != len(replies):
            raise DataError(
                f"{where}: the chat template marks {len(runs)} {{% generation %}} blocks for {len(replies)} "
                "assistant messages, so the trained turns cannot be told apart"
            )
        wanted = set(_trained_turns(ex, train_on))
        runs = [run for run, i in zip(runs, replies, strict=True) if i in wanted]
    labels = [IGNORE_INDEX] * len(ids)
    for start, stop in runs:
        picked, _ = _through_end(list(range(start, stop)), ids, special, train_on_eos, follow=stop)
        for t in picked:
            labels[t] = ids[t]
    return ids, labels


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """The `[start, stop)` runs of ones in a 0/1 mask."""
    runs, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _quoted(err: Exception) -> str:
    message = " ".join(str(err).split()) or "(no message)"
    return (
        f"{type(err).__name__}: {message!r}" if len(message) <= 300 else f"{type(err).__name__}: {message[:300]!r}..."
    )


def _difference(shorter: str, longer: str) -> str:
    """Where two renderings part: a few characters of each from the first difference."""
    at = next(
        (i for i, (a, b) in enumerate(zip(shorter, longer, strict=False)) if a != b), min(len(shorter), len(longer))
    )
    return f"at character {at}: {shorter[at : at + 30]!r} vs {longer[at : at + 30]!r}"
