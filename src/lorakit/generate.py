"""Batched text generation with the KV cache (greedy, sampling or beam search) via transformers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.data import encode_prompt
from lorakit.errors import ConfigError
from lorakit.extras import require
from lorakit.modes import evaluating

__all__ = ["E2E_PAPER", "Decoding", "generate"]


@dataclass
class Decoding:
    """How `generate` continues a prompt: greedy by default, sampling, or beam search.

    Args:
        max_new_tokens: generate at most this many tokens.
        num_beams: beam-search width; 1 = greedy (or sampling with `do_sample`).
        do_sample: sample instead of greedy or beam search.
        temperature: sampling temperature.
        top_p: nucleus-sampling threshold.
        length_penalty: beam-search length penalty (< 1 favours shorter outputs).
        no_repeat_ngram_size: forbid repeating n-grams of this size within the new text (0 = off).
            Only generated tokens count, as in the LoRA repo's decoder (gpt2_beam.py
            `_calc_banned_ngram_tokens`) and fairseq; transformers' own option also counts the
            prompt, which for E2E would forbid copying a slot value such as "more than £ 30".
        seed: sampling seed.

    Raises:
        ConfigError: listing every invalid value.
    """

    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name, low in (("max_new_tokens", 1), ("num_beams", 1), ("no_repeat_ngram_size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.temperature, int | float) and self.temperature > 0):
            problems.append(f"temperature must be > 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if problems:
            raise ConfigError("invalid Decoding:\n" + "\n".join(f"  - {p}" for p in problems))


E2E_PAPER = Decoding(num_beams=10, length_penalty=0.8, no_repeat_ngram_size=4)
"""The LoRA paper's E2E decoding (microsoft/LoRA `gpt2_beam.py`): beam 10, length penalty 0.8, no
repeated 4-grams, at most 64 new tokens."""


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    decoding: Decoding | None = None,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Continue each prompt; return only the new text.

    Prompts are encoded exactly as in training (`data.encode_prompt`), left-padded into batches
    and decoded with transformers' `generate` (KV cache on).

    Args:
        model: a causal LM (with or without adapters).
        tokenizer: its tokenizer (needs a pad or EOS token).
        prompts: the prompt texts.
        decoding: how to decode (default: greedy, 64 new tokens).
        batch_size: prompts per batch.
        progress: show a tqdm bar over the prompts (on stderr, gone when done), refreshed at every
            decoded token, so a slow batch (beam search) still shows it is moving.

    Returns:
        One completion per prompt, special tokens removed, whitespace stripped.
    """
    require("transformers", "cli", "generation")
    from transformers import LogitsProcessorList

    d = decoding or Decoding()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(d.seed)
    outputs: list[str] = []
    bar = tqdm(
        total=len(prompts), desc="generate", unit="prompt", disable=not progress, leave=False, dynamic_ncols=True
    )
    with evaluating(model), bar:
        try:
            for start in range(0, len(prompts), batch_size):
                encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
                width = max(len(e) for e in encoded)
                ids = torch.full((len(encoded), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, e in enumerate(encoded):  # left padding: generation continues at the right edge
                    ids[row, width - len(e) :] = torch.tensor(e)
                    mask[row, width - len(e) :] = 1
                kwargs: dict[str, Any] = dict(
                    max_new_tokens=d.max_new_tokens,
                    num_beams=d.num_beams,
                    do_sample=d.do_sample,
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                    use_cache=True,
                )
                if d.do_sample:
                    kwargs.update(temperature=d.temperature, top_p=d.top_p)
                else:
                    kwargs.update(temperature=None, top_p=None, top_k=None)
                if d.num_beams > 1:
                    kwargs.update(length_penalty=d.length_penalty, early_stopping=True)
                processors: list[Any] = []
                if d.no_repeat_ngram_size:
                    processors.append(_NoRepeatNGramInCompletion(d.no_repeat_ngram_size, prompt_width=width))
                if progress:
                    processors.append(_Tick(bar, width))
                if processors:
                    kwargs["logits_processor"] = LogitsProcessorList(processors)
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
                for row in out[:, width:]:
                    outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
                bar.update(len(encoded))
        finally:
            torch.random.set_rng_state(generator_state)
    return outputs


class _Tick:
    """A logits processor that changes nothing and shows the decoded length on the progress bar,
    redrawn at most once a second."""

    def __init__(self, bar: Any, prompt_width: int) -> None:
        self._bar, self._width, self._shown = bar, prompt_width, time.monotonic()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if time.monotonic() - self._shown >= 1.0:
            self._bar.set_postfix_str(f"token {input_ids.shape[1] - self._width + 1}")
            self._shown = time.monotonic()
        return scores


class _NoRepeatNGramInCompletion:
    """transformers' no-repeat-n-gram ban applied to the generated tokens only (prompt excluded).

    Prompts are left-padded to one width, so for every row (and beam) the new tokens are the
    columns from `prompt_width` on: (batch·beams, width + t) -> (batch·beams, t). A logits
    processor (called as transformers calls them; no subclass needed, so this module imports
    without transformers).
    """

    def __init__(self, ngram_size: int, *, prompt_width: int) -> None:
        from transformers import NoRepeatNGramLogitsProcessor

        self._ban = NoRepeatNGramLogitsProcessor(ngram_size)
        self._width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self._ban(input_ids[:, self._width :], scores)
