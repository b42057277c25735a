"""Train/eval mode around inference: every forward that only reads a model runs in eval mode.

`model.train(was)` after an evaluation would set every submodule to the root's old mode; a model
whose parts were in different modes (a frozen block kept in eval, a fresh adapter) would come back
changed. `evaluating` restores each module's own mode instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["evaluating"]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block (no dropout anywhere), then give each module its own
    mode back, also when the block raises.

    Args:
        model: any module; modules added inside the block keep the mode they were given.

    Yields:
        The same model.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
