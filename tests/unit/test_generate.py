"""lorakit.generate: the no-repeat-n-gram ban counts only generated tokens (the LoRA repo's decoder)."""

from __future__ import annotations

import torch

from lorakit.generate import _NoRepeatNGramInCompletion


def _banned(input_ids: list[list[int]], *, n: int, width: int, vocab: int = 10) -> list[set[int]]:
    scores = torch.zeros(len(input_ids), vocab)
    out = _NoRepeatNGramInCompletion(n, prompt_width=width)(torch.tensor(input_ids), scores)
    return [set(torch.nonzero(row == -float("inf")).flatten().tolist()) for row in out]


def test_an_ngram_of_the_prompt_may_be_generated():
    # Prompt [6, 7, 3, 6], nothing generated yet: the prompt's bigram (6, 7) must stay allowed.
    assert _banned([[6, 7, 3, 6]], n=2, width=4) == [set()]


def test_an_ngram_already_generated_is_banned():
    # Generated [1, 2, 1] after the prompt [6, 7]: the bigram (1, 2) exists, so after 1 token 2 is banned.
    assert _banned([[6, 7, 1, 2, 1]], n=2, width=2) == [{2}]


def test_each_row_and_beam_bans_its_own_history():
    # Two hypotheses over one prompt width; trigrams. Row 0 generated (4, 5, 8, 4, 5): bans 8.
    # Row 1 generated (4, 5, 9, 9, 4): its prefix (9, 4) never occurred, so nothing is banned.
    rows = [[0, 0, 4, 5, 8, 4, 5], [0, 0, 4, 5, 9, 9, 4]]
    assert _banned(rows, n=3, width=2) == [{8}, set()]
