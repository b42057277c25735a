"""Packaged TOML configs ("recipes") that `--config NAME` accepts in place of a file path.

- `quickstart` (`lorakit train`): the packaged SmolLM2-135M-Instruct on the bundled E2E sample,
  60 steps (about 5 minutes on 2 CPU cores).

A recipe holds only the keys it changes from the defaults; flags given with it still win.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.errors import ConfigError

__all__ = ["RECIPES", "config_path"]

_DIR = Path(__file__).resolve().parent
RECIPES = tuple(sorted(p.stem for p in _DIR.glob("*.toml")))
"""The names of the packaged recipes."""


def config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """The TOML file `--config` names: an existing file, else a packaged recipe of that name.

    Raises:
        ConfigError: neither a file nor a recipe (the recipes are listed).
    """
    path = Path(name_or_path).expanduser()
    if path.is_file() or os.sep in str(name_or_path) or path.suffix == ".toml":
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    if str(name_or_path) in RECIPES:
        return _DIR / f"{name_or_path}.toml"
    raise ConfigError(f"--config {str(name_or_path)!r}: no such file, and not a packaged recipe ({', '.join(RECIPES)})")
