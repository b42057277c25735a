"""One request's decoding: its sampling parameters, next-token choice, and the text it may emit.

Text is streamed in pieces that never split a character (a byte-level BPE token can end inside a
UTF-8 sequence, which decodes to U+FFFD until the next token completes it) and never show the
start of a stop string that may still complete: the last `len(longest stop) - 1` characters are
held back until the next token decides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SamplingParams", "TextStream", "next_token"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request continues its prompt (OpenAI's request fields).

    Args:
        max_tokens: generate at most this many tokens.
        temperature: 0 (or below 1e-5) = greedy (argmax); otherwise softmax(logits / temperature)
            is sampled.
        top_p: sample only from the smallest set of tokens whose probability reaches `top_p`.
        stop: strings that end the completion (not included in it).
        seed: the request's own sampling seed: the same seed gives the same text whatever else
            is in the batch; None draws one.
        ignore_eos: keep generating past end-of-sequence tokens (vLLM's field; for benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class TextStream:
    """The generated tokens of one request and the part of their text already emitted."""

    tokenizer: Any
    stop: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    stopped: bool = False

    def add(self, token: int, *, special: bool = False) -> str:
        """Append a token (`special`: an end-of-sequence token, not shown); return new text to emit."""
        self.tokens.append(token)
        if special:
            return self.flush()
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = self._stop_at()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self.flush()
        hold = max((len(s) for s in self.stop), default=1) - 1
        end = len(self.text) - hold
        while end > self.emitted and self.text[end - 1] == "\ufffd":  # an unfinished character
            end -= 1
        if end <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted : end], end
        return piece

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the request)."""
        piece, self.emitted = self.text[self.emitted :], len(self.text)
        return piece

    def _stop_at(self) -> int | None:
        # A stop string can only newly appear in the part not yet emitted (plus its overlap).
        start = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stop if s) if i >= 0]
        return min(hits) if hits else None


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator of the request's own, so its samples do not depend on its batch neighbours."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return generator


GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (as vLLM): dividing by them overflows the logits."""


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from one row's last-position logits (vocab,)."""
    if params.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each
        drop = before >= params.top_p
        drop[0] = False  # the top token always stays (a top_p below float32's range compares as 0)
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
