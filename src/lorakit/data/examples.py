"""The unit every loader produces: a prompt the model reads and a completion it learns to write."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Example"]


@dataclass(frozen=True)
class Example:
    """One training example: the model reads `prompt` and learns to write `completion`.

    Attributes:
        prompt: Text the loss ignores ("" for plain-text records).
        completion: Text the loss is computed on; `tokenize_examples` appends EOS.
        group: Examples with the same group share one input (E2E: the MR, so all references of
            one MR stay together in `split_holdout` and can be scored together); None otherwise.
    """

    prompt: str
    completion: str
    group: str | None = None
