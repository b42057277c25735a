"""`lorakit` command line: one module per command; flags and TOML keys come from the config dataclasses.

| command | module | calls |
|---|---|---|
| `train` | `cli/train.py` | `lorakit.train.run.train_run` |
| `eval` | `cli/eval.py` | `lorakit.evaluate.evaluate` |
| `generate` | `cli/generate.py` | `lorakit.generate.generate` |
| `merge` | `cli/merge.py` | `lorakit.export.export_merged` |
| `export` | `cli/export.py` | `lorakit.export.export_gguf` |
| `analyze` | `cli/analyze.py` | `lorakit.analysis.analyze` |
| `compress` | `cli/compress.py` | `lorakit.analysis.compress` |
| `inspect` | `cli/inspect.py` | `lorakit.inject.preview` |
| `data` | `cli/data.py` | `lorakit.data.preview` (`lorakit data preview`) |
| `serve` | `cli/serve.py` | `lorakit.serve.serve` |

Bad input ends with one line on stderr and exit code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from lorakit.cli import analyze, compress, data, export, generate, merge, serve, train
from lorakit.cli import eval as eval_command
from lorakit.cli import inspect as inspect_command
from lorakit.errors import LorakitError

__all__ = ["build_parser", "commands", "main"]

_MODULES = (train, generate, eval_command, merge, export, analyze, compress, inspect_command, data, serve)


def commands() -> dict:
    """name -> `Command`, for every subcommand."""
    return {m.COMMAND.name: m.COMMAND for m in _MODULES}


class _Parser(argparse.ArgumentParser):
    """argparse, with a flag error as one line (`lorakit train: error: argument --bias: ...`), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per command, flags generated from its config dataclasses."""
    parser = _Parser(
        prog="lorakit",
        description=(
            "LoRA fine-tuning (Hu et al., 2022): train, generate, eval, merge, export, analyze, compress, "
            "inspect, data, serve."
        ),
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands().values():
        command.add_to(sub)
    return parser


def _quiet_transformers() -> None:
    """Keep transformers' weight-loading bar and load report off stderr (unless --debug).

    Both would come before the one error line bad input ends with; the report also calls a new
    classification head "MISSING ... newly initialized" although lorakit trains it or loads it
    from the adapter. transformers is imported only by the commands that load a model, so its
    environment variables (`TRANSFORMERS_VERBOSITY`, `HF_HUB_DISABLE_PROGRESS_BARS`) are set
    for it to read then; a value the user set is kept. Where it is already imported (`main`
    called inside a process that uses it), its own switches are set instead.
    """
    # torchao (imported by transformers when installed) logs each GPU kernel library it cannot load
    # on a CPU-only machine, and torch an Enum it registers: noise before any result.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # without the cli extra: the command reports it
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _line(text: str, stream=None) -> None:
    """`text` and its newline in one write, flushed: the ranks of a torchrun job share one stderr, and
    `print`'s two writes (the text, then the newline) let their lines run into each other."""
    stream = stream or sys.stderr
    stream.write(text + "\n")
    stream.flush()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line (`lorakit: warning: ...`), without the source line it came from."""
    _line(f"lorakit: warning: {message}", file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad input, 130 interrupted)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv == ["--debug"]:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    command = commands()[args.command]
    debug = args.debug
    try:
        if not debug:
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.showwarning = _one_line_warning
            _quiet_transformers()
        command(args)
    except LorakitError as err:
        if debug:
            traceback.print_exc()
        message = " ".join(line.strip() for line in str(err).splitlines())  # a list of problems, on one line
        _line(f"lorakit {args.command}: error: {message}")
        return 2
    except KeyboardInterrupt as err:
        said = f": {err}" if str(err) else ""  # fit's says where it saved and how to continue
        _line(f"lorakit {args.command}: interrupted{said}")
        return 130
    except Exception as err:  # an unexpected failure: one line unless --debug
        if debug:
            raise
        _line(f"lorakit {args.command}: failed: {type(err).__name__}: {err} (rerun with --debug for details)")
        return 1
    return 0
