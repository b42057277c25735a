"""Batched text generation with the KV cache (greedy, sampling or beam search) via transformers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor

from lorakit.data import encode_prompt

__all__ = ["generate"]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    batch_size: int = 8,
    seed: int = 0,
) -> list[str]:
    """Continue each prompt; return only the new text.

    Prompts are encoded exactly as in training (`data.encode_prompt`), left-padded into batches
    and decoded with transformers' `generate` (KV cache on). Greedy by default; `do_sample` for
    sampling, `num_beams > 1` for beam search (the paper's E2E decoding: beam 10, length penalty
    0.8, no repeated 4-grams).

    Args:
        model: a causal LM (with or without adapters).
        tokenizer: its tokenizer (needs a pad or EOS token).
        prompts: the prompt texts.
        max_new_tokens: generation length limit.
        num_beams: beams; 1 = greedy or sampling.
        do_sample: sample instead of greedy/beam.
        temperature: sampling temperature.
        top_p: nucleus sampling threshold.
        length_penalty: beam-search length penalty.
        no_repeat_ngram_size: forbid repeating n-grams of this size within the new text (0 = off).
            Only generated tokens count, as in the LoRA repo's decoder (gpt2_beam.py
            `_calc_banned_ngram_tokens` sees only the generated history) and fairseq; transformers'
            own `no_repeat_ngram_size` also counts the prompt, which for E2E would forbid copying a
            slot value such as "more than £ 30" from the MR.
        batch_size: prompts per batch.
        seed: sampling seed.

    Returns:
        One completion per prompt, special tokens removed, whitespace stripped.
    """
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    outputs: list[str] = []
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
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=do_sample,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
            )
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if num_beams > 1:
                kwargs.update(length_penalty=length_penalty, early_stopping=True)
            if no_repeat_ngram_size:
                kwargs["logits_processor"] = LogitsProcessorList(
                    [_NoRepeatNGramInCompletion(no_repeat_ngram_size, prompt_width=width)]
                )
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for row in out[:, width:]:
                outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return outputs


class _NoRepeatNGramInCompletion(LogitsProcessor):
    """transformers' no-repeat-n-gram ban applied to the generated tokens only (prompt excluded).

    Prompts are left-padded to one width, so for every row (and beam) the new tokens are the
    columns from `prompt_width` on: (batch·beams, width + t) -> (batch·beams, t).
    """

    def __init__(self, ngram_size: int, *, prompt_width: int) -> None:
        self._ban = NoRepeatNGramLogitsProcessor(ngram_size)
        self._width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self._ban(input_ids[:, self._width :], scores)
