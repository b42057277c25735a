"""A model with its adapter merged in, written as a plain transformers model directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from lorakit import atomic
from lorakit.merge import merge_and_unload

__all__ = ["export_merged"]


def export_merged(model: nn.Module, tokenizer: Any, out: str | os.PathLike[str]) -> Path:
    """Merge the active adapters (checked finite), and write the plain model and its tokenizer to `out`.

    The directory is built beside `out` and renamed into place (`lorakit.atomic.build_directory`),
    so it appears complete or not at all; transformers' `from_pretrained` loads it with the model's
    original classes and no trace of lorakit. The model object itself is merged and unloaded.

    Args:
        model: a transformers model carrying lorakit adapters.
        tokenizer: its tokenizer (saved beside it), or None.
        out: the directory to create; it must not exist or be empty.

    Returns:
        The directory.

    Raises:
        ConfigError: `out` exists and is not an empty directory, or cannot be created
            (`lorakit.atomic.check_target`, which `lorakit merge` calls before it loads the model).
            Nothing is written.
        LorakitError: merging gives non-finite weights (nothing is written).
        FileWriteError: a file could not be written (a full disk); `out` is left as it was.
    """
    out = atomic.check_target(out, directory=True, empty=True)
    plain = merge_and_unload(model, safe=True)

    def build(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    # An existing empty `out` is replaced by the rename (Linux renames onto an empty directory), so
    # a failed write leaves it as it was.
    return atomic.build_directory(out, build)
