"""`lorakit` command line: flags and TOML files -> one library call per subcommand."""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from lorakit.cli.options import add_options, resolve_options
from lorakit.errors import LorakitError

__all__ = ["main"]

_SHORT = {"r": "-r", "out": "-o"}


def _commands():
    from lorakit import runs

    return {
        "train": (runs.TrainOptions, runs.train_run),
        "generate": (runs.GenerateOptions, runs.generate_run),
        "eval": (runs.EvalOptions, runs.eval_run),
        "merge": (runs.MergeOptions, runs.merge_run),
        "inspect": (runs.InspectOptions, runs.inspect_run),
    }


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per job, flags generated from its options dataclass."""
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning (Hu et al., 2022): train, generate, eval, merge, inspect.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (cls, _) in _commands().items():
        summary = (inspect.getdoc(cls) or "").splitlines()[0]
        p = sub.add_parser(name, help=summary, description=summary)
        p.add_argument("--config", help="TOML file whose keys are this command's flags (flags override it)")
        # SUPPRESS: an absent subcommand --debug must not reset `lorakit --debug train ...` to False.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
        add_options(p, cls, _SHORT)
    return parser


def _quiet_transformers() -> None:
    """Keep transformers' weight-loading bar and load report off stderr (unless --debug).

    Both would come before the one error line bad input ends with; the report also calls a new
    classification head "MISSING ... newly initialized" although lorakit trains it or loads it
    from the adapter. transformers is already imported here, so its environment variables
    (`TRANSFORMERS_VERBOSITY`, `HF_HUB_DISABLE_PROGRESS_BARS`) would come too late.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad input, 130 interrupted)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--debug")):
        argv = ["train", *argv]  # `lorakit` alone runs the embedded default
    if argv == ["--debug"]:
        argv = ["train", "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train", *argv])
    cls, run = _commands()[args.command]
    debug = args.debug
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        _quiet_transformers()
    try:
        options = resolve_options(cls, args, args.config)
        run(options)
    except LorakitError as err:
        if debug:
            traceback.print_exc()
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure: one line unless --debug
        if debug:
            raise
        print(
            f"lorakit {args.command}: failed: {type(err).__name__}: {err} (rerun with --debug for details)",
            file=sys.stderr,
        )
        return 1
    return 0
