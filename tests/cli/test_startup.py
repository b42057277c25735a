"""A lean start (issue 24): `import lorakit` and every `lorakit ... --help` import no optional extra.

The optional parts import their extras when they run, so `--help` answers as fast as importing
torch. Checked as the set of imported modules in a fresh interpreter, never as a time.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from typing import Any

import lorakit
from lorakit.cli import commands
from lorakit.extras import EXTRAS

# Every package an extra installs, and what they bring (pydantic, starlette) or tests use (peft).
HEAVY = tuple(sorted({m for modules in EXTRAS.values() for m in modules} | {"pydantic", "starlette", "peft"}))
# The FastAPI layer of `lorakit serve` defines pydantic models: imported only when serving.
SERVING = ("lorakit.serve.api", "lorakit.serve.limits", "lorakit.serve.schemas")

_HELP = """
import contextlib, io, json, sys

def heavy():
    return sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))

import lorakit
after_import = heavy()
from lorakit.cli import main
helps = {}
for argv in [["--help"], *([c, "--help"] for c in COMMANDS)]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as stop:
            assert stop.code == 0, (argv, stop.code)
    assert "usage: lorakit" in out.getvalue(), argv
    helps[" ".join(argv)] = heavy()
print(json.dumps({"import lorakit": after_import, **helps}))
"""


def _run(script: str) -> Any:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_and_every_help_import_no_extra():
    script = _HELP.replace("HEAVY", repr(HEAVY)).replace("COMMANDS", repr(sorted(commands())))
    imported = _run(script)
    assert set(imported) == {"import lorakit", "--help", *(f"{c} --help" for c in commands())}
    assert {k: v for k, v in imported.items() if v} == {}


def test_no_module_imports_an_extra_at_import_time():
    """Every lorakit module but the FastAPI layer imports its extras inside the functions that use them."""
    modules = [m.name for m in pkgutil.walk_packages(lorakit.__path__, "lorakit.")]
    modules = [m for m in modules if m not in (*SERVING, "lorakit.__main__")]
    assert "lorakit.layers" in modules and "lorakit.serve.server" in modules
    script = (
        f"import importlib, json, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    assert _run(script) == []
