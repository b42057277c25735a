"""What every subcommand shares: its flags from config dataclasses, `--config`, `--debug`, the fields
it cannot run without, and its run."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.cli.flags import FlagSpec, add_flags, field_help, flag_name, read_toml, resolve
from lorakit.errors import ConfigError
from lorakit.recipes import RECIPES, config_path
from lorakit.threads import set_threads

__all__ = ["Command"]

_POSITIONAL = "positional_value"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@dataclass(frozen=True)
class Command:
    """One `lorakit` subcommand.

    Args:
        name: the subcommand.
        summary: one line for `lorakit --help` and the top of its own `--help`.
        specs: the config dataclasses whose fields are its flags, in order.
        run: called with one instance per spec (in order) and `echo`, the printer.
        positional: a field that may also be given as the one positional argument
            (`lorakit analyze runs/x` is `lorakit analyze --adapter runs/x`).
        recorded: settings to start from instead of the defaults, beneath `--config` and the
            flags: called with the values given so far (`--config` keys and flags), it returns
            (values, the file they came from) or None (`lorakit train --resume` takes the run's
            own `run_config.json`, so `lorakit train --out runs/x --resume` continues any run).
        requires: fields the command cannot run without (`adapter` for the commands that read one,
            `out` for those that write a file): given none (or an empty value), it refuses before
            running, naming every missing one with what it is (its help up to the first `;`).
    """

    name: str
    summary: str
    specs: Sequence[FlagSpec]
    run: Callable[..., Any]
    positional: str | None = None
    recorded: Callable[[Mapping[str, Any]], tuple[Mapping[str, Any], str] | None] | None = None
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        known = {f.name for spec in self.specs for f in spec.fields()}
        unknown = [name for name in (*self.requires, self.positional) if name is not None and name not in known]
        if unknown:
            raise ConfigError(f"lorakit {self.name}: {unknown} are not fields of its flags")

    def add_to(self, sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = sub.add_parser(self.name, help=self.summary, description=self.summary)
        parser.add_argument(
            "--config",
            metavar="FILE|RECIPE",
            help="TOML file whose keys are this command's flags (flags given as well win), or a packaged "
            f"recipe: {', '.join(RECIPES)}",
        )
        # SUPPRESS: an absent subcommand --debug must not reset `lorakit --debug train ...` to False.
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        if self.positional:
            name, flag = self.positional.upper(), flag_name(self.positional)
            parser.add_argument(_POSITIONAL, nargs="?", default=argparse.SUPPRESS, metavar=name, help=f"same as {flag}")
        add_flags(parser, self.specs)
        if not self.has_threads_field:
            parser.add_argument(
                "--threads",
                type=_positive_int,
                default=argparse.SUPPRESS,
                metavar="N",
                help="torch CPU threads (default: torch's, one per core); see lorakit.threads",
            )
        return parser

    @property
    def has_threads_field(self) -> bool:
        """Whether a config of this command has its own `threads` field (train, serve)."""
        return any(f.name == "threads" for spec in self.specs for f in spec.fields())

    def options(self, args: argparse.Namespace) -> list[Any]:
        """The config instances: defaults, then `--config`, then the flags given."""
        toml, source = None, ""
        if self.positional and _POSITIONAL in vars(args):
            value = getattr(args, _POSITIONAL)
            given = getattr(args, self.positional, value)
            if given != value:
                flag = flag_name(self.positional)
                raise ConfigError(f"{self.positional.upper()} given twice: {value!r} and {flag} {given!r}; give one")
            args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != _POSITIONAL})
            setattr(args, self.positional, value)
        if args.config:
            path = config_path(args.config)
            toml, source = read_toml(path), str(path)
        if self.recorded is not None:
            found = self.recorded({**(toml or {}), **vars(args)})
            if found is not None:
                values, where = found
                known = {f.name for spec in self.specs for f in spec.fields()}
                toml = {**{k: v for k, v in values.items() if k in known}, **(toml or {})}
                source = f"{source} over {where}" if source else where
        return resolve(self.specs, args, toml, source)

    def check_required(self, options: Sequence[Any]) -> None:
        """Refuse to run without the fields in `requires`, naming every one missing at once.

        Args:
            options: the config instances, one per spec (as `options` returns them).

        Raises:
            ConfigError: `ADAPTER (or --adapter) and --out are required: <what each is>`.
        """
        missing: list[tuple[str, str]] = []
        for spec, values in zip(self.specs, options, strict=True):
            helps = field_help(spec.cls)
            for f in spec.fields():
                if f.name in self.requires and getattr(values, f.name) in (None, ""):
                    what = helps.get(f.name, "").split(";")[0].replace("`", "")
                    missing.append((self._named(f.name), what))
        if not missing:
            return
        names = [name for name, _ in missing]
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        verb = "is" if len(names) == 1 else "are"
        raise ConfigError(f"{listed} {verb} required: {'; '.join(what for _, what in missing)}")

    def _named(self, field: str) -> str:
        """How the user gives `field`: `ADAPTER (or --adapter)` for the positional, else its flag."""
        flag = flag_name(field)
        return f"{field.upper()} (or {flag})" if field == self.positional else flag

    def __call__(self, args: argparse.Namespace, echo: Callable[[str], None] = print) -> Any:
        if not self.has_threads_field and "threads" in vars(args):
            set_threads(args.threads)
            args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "threads"})
        options = self.options(args)
        self.check_required(options)
        return self.run(*options, echo=echo)
