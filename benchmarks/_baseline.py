"""lorakit as of another git revision, measured beside the working tree in the same run.

`export(rev)` writes that revision's `src/` to a cache folder (for a child process: put it first on
`PYTHONPATH`); `load(rev)` imports it into this process as a second, independent `lorakit` (for
`paired.py`, which alternates steps of every configuration in one process). Before/after
comparisons then share the machine's state instead of comparing runs hours apart.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
_CACHE = Path(tempfile.gettempdir()) / "lorakit-baselines"


def resolve(rev: str) -> str:
    """The full commit hash of `rev` (a hash, tag, branch or `HEAD~3`).

    Raises:
        SystemExit: not a revision of this repository.
    """
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        )
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"--baseline {rev!r}: not a git revision of {REPO} ({err.stderr.strip()})") from None
    return out.stdout.strip()


def export(rev: str) -> Path:
    """The `src` folder of revision `rev`, written once to a cache folder; returns its path."""
    commit = resolve(rev)
    target = _CACHE / commit / "src"
    if (target / "lorakit" / "__init__.py").is_file():
        return target
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, "src"], capture_output=True, check=True
    ).stdout
    _CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=_CACHE))
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(staging, filter="data")
    target.parent.mkdir(parents=True, exist_ok=True)
    (staging / "src").rename(target)
    return target


def load(rev: str) -> ModuleType:
    """Import lorakit at revision `rev` beside the working tree's `lorakit`.

    Every submodule of the old package is imported while it is the `lorakit` in `sys.modules`, then
    the names are given back to the working tree's modules. The old modules keep references to each
    other, so they run the old code; a function-level `import lorakit.x` inside the old code would
    find the new module, which is why everything is imported eagerly here.

    Returns:
        The old `lorakit` package; its submodules are attributes of it as usual.
    """
    src = export(rev)
    mine = {k: v for k, v in sys.modules.items() if k == "lorakit" or k.startswith("lorakit.")}
    for name in mine:
        del sys.modules[name]
    sys.path.insert(0, str(src))
    try:
        old = importlib.import_module("lorakit")
        for info in pkgutil.walk_packages(old.__path__, "lorakit."):
            if info.name.endswith(".__main__"):  # runs the CLI when imported
                continue
            try:
                importlib.import_module(info.name)
            except ImportError:  # a module that needs an extra this environment lacks
                continue
    finally:
        sys.path.remove(str(src))
        for name in [k for k in sys.modules if k == "lorakit" or k.startswith("lorakit.")]:
            del sys.modules[name]
        sys.modules.update(mine)
    return old
