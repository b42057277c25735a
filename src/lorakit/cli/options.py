"""Dataclass options -> argparse flags and TOML config, with help text taken from the docstring.

Each subcommand's options are one dataclass whose Google-style docstring (`Args:` section)
documents every field; the flags, their types, defaults and help are generated from it, so code
and `--help` cannot drift (STYLE.md §3). `--config run.toml` supplies any field; flags override.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

__all__ = ["add_options", "field_help", "resolve_options"]


def field_help(cls: type) -> dict[str, str]:
    """Parse the `Args:` section of a dataclass docstring into {field: help}."""
    doc = inspect.getdoc(cls) or ""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    helps: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            helps[current] = match.group(2).strip()
        elif current and line.startswith("        "):
            helps[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return helps


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation like `int | None`."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # annotations are our own, in this package
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])[0], True
    if origin is typing.Literal:
        return str, False
    return annotation, False


def add_options(parser: argparse.ArgumentParser, cls: type, short: dict[str, str] | None = None) -> None:
    """Add one flag per dataclass field (defaults are None: unset flags do not override TOML)."""
    helps = field_help(cls)
    hints = typing.get_type_hints(cls)
    short = short or {}
    for f in dataclasses.fields(cls):
        kind, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        text = helps.get(f.name, "")
        if default is not None and kind is not bool:
            text += f" (default: {default})"
        names = [_flag(f.name), *([short[f.name]] if f.name in short else [])]
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(*names, dest=f.name, type=kind, default=None, help=text, metavar=f.name.upper())


def resolve_options(cls: type, args: argparse.Namespace, config_path: str | None) -> Any:
    """Build the options dataclass: defaults, then the TOML file, then explicit flags.

    Raises:
        ConfigError: unreadable TOML, an unknown key (with the known keys listed), or a value of
            the wrong type.
    """
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    if config_path:
        path = Path(config_path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {unknown}; known keys: {', '.join(sorted(known))}")
        problems = []
        for key, value in data.items():
            kind, optional = _base_type(hints[key])
            ok = isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok and not (optional and value is None):
                problems.append(f"{key} must be {kind.__name__}, got {value!r}")
            values[key] = float(value) if kind is float and isinstance(value, int) else value
        if problems:
            raise ConfigError(f"{path}: " + "; ".join(problems))
    for name in known:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return cls(**values)
