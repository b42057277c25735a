"""Command-line flags and TOML keys generated from the library's config dataclasses.

A command lists the dataclasses whose fields it takes (`LoraConfig`, `TrainConfig`, its own run
options); every field becomes a flag `--field-name` with the type, choices, default and help of
the field itself (the help is the field's entry in the class docstring's `Args:` section), and a
key of the same name in a `--config` TOML file. Nothing is declared twice, so the library, the
flags and the files cannot drift apart. Precedence: the dataclass default, then the TOML file,
then the flags given.

How a value is written on the command line, by the field's type:

| type | flag value |
|---|---|
| `bool` | `--flag` / `--no-flag` |
| `int`, `float`, `str` | as usual; `none` for an optional field |
| `Literal[...]` | one of the choices (listed in `--help`) |
| `list[...]` | comma-separated (`q_proj,v_proj`) or JSON (`'["q_proj", "v_proj"]'`) |
| `dict[...]` | `key=value,key=value` or JSON (`'{"q_proj": 16}'`); given twice, the pairs merge |
| `tuple[...]` | comma-separated (`0.9,0.999`) |
| `list[str] \\| str` | a comma-separated list, or one string when it is a regex or `all-linear` |

TOML values take the file's own types; a string given for a field that is not plain text is read
as the flag's value would be (`target_modules = "q_proj,v_proj"` is a list).

`--help` shows each field's effective default. Most defaults are the dataclass value, shown as
`(default: VALUE)` after the help text. Where the library resolves a value at run time (a None
that means "the packaged model" or "torch's choice"), the field's docstring entry states what
happens in the same form, `(default: ...)`, and that is shown instead; an entry that says the
field is `required` shows no default.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lorakit.errors import ConfigError

__all__ = ["FlagSpec", "add_flags", "field_help", "flag_help", "flag_name", "parse_value", "read_toml", "resolve"]

_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
_NONE = ("none", "null")
_STATED_DEFAULT = "(default: "
_REQUIRED = re.compile(r"\brequired\.?$")


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """The fields of one dataclass that a command exposes.

    Args:
        cls: the dataclass (e.g. `LoraConfig`).
        title: the heading of its flags in `--help`.
        aliases: field -> extra flag strings (`{"r": ["-r"], "target_modules": ["--target"]}`);
            an alias also works as a TOML key (without dashes).
        exclude: fields not exposed.
    """

    cls: type
    title: str
    aliases: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    exclude: frozenset[str] = frozenset()

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls) if f.name not in self.exclude]


def field_help(cls: type) -> dict[str, str]:
    """The `Args:` section of a class docstring as {field: help text (one line)}."""
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


# ------------------------------------------------------------------------------------------ types
def _members(annotation: Any) -> tuple[list[Any], bool]:
    """(the non-None members of a union, or [annotation]; whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        members: list[Any] = []
        for a in args:
            if a is not type(None):
                sub, _ = _members(a)  # flatten aliases such as `bool | Literal[...]`
                members += sub
        return members, type(None) in args
    return [annotation], False


def _choices(annotation: Any) -> list[Any] | None:
    """The allowed values when the type is Literal (with bool allowed as True/False), else None."""
    members, _ = _members(annotation)
    out: list[Any] = []
    for m in members:
        if typing.get_origin(m) is Literal:
            out += list(typing.get_args(m))
        elif m is bool and len(members) > 1:
            out += [True, False]
        else:
            return None
    return out


def _scalar(kind: Any, text: str) -> Any:
    if kind is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if kind in (int, float, str):
        return kind(text.strip()) if kind is not str else text
    raise ValueError(f"cannot read a {getattr(kind, '__name__', kind)} from {text!r}")


def _container(kind: Any, text: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    stripped = text.strip()
    if stripped[:1] in "[{":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON: {err}") from None
    if origin is list:
        return [parse_value(args[0], part) for part in _split(stripped)]
    if origin is tuple:
        parts = _split(stripped)
        if len(parts) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values, got {text!r}")
        return tuple(parse_value(a, p) for a, p in zip(args, parts, strict=True))
    if origin is dict:
        out = {}
        for part in _split(stripped):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"expected key=value pairs separated by commas, got {text!r}")
            out[key.strip()] = parse_value(args[1], value)
        return out
    raise ValueError(f"unsupported type {kind}")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_value(annotation: Any, text: str) -> Any:
    """Read a flag's text as a value of the field type `annotation` (see the module docstring).

    Raises:
        ValueError: the text fits none of the type's forms (the message says what was expected).
    """
    members, optional = _members(annotation)
    if optional and text.strip().lower() in _NONE:
        return None
    choices = _choices(annotation)
    if choices is not None:
        for choice in choices:
            if (isinstance(choice, bool) and text.strip().lower() in (_TRUE if choice else _FALSE)) or text == choice:
                return choice
        raise ValueError(f"choose from {', '.join(_show(c) for c in choices)}; got {text!r}")
    containers = [m for m in members if typing.get_origin(m) in (list, tuple, dict)]
    scalars = [m for m in members if m not in containers]
    if str in scalars and containers:
        # A string field that also takes a list (target_modules: suffixes or a regex): JSON is the
        # list, a regex or `all-linear` the string, anything else a comma-separated list.
        if text.strip()[:1] in "[{":
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                pass  # `[qv]_proj`: a regex
        if _REGEX_CHARS.search(text) or text == "all-linear":
            return text
        return _container(containers[0], text)
    if containers and ("," in text or text.strip()[:1] in "[{" or not scalars):
        return _container(containers[0], text)
    errors = []
    for kind in scalars:
        try:
            return _scalar(kind, text)
        except ValueError as err:
            errors.append(str(err))
    raise ValueError("; ".join(errors) or f"cannot read {text!r}")


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def _metavar(annotation: Any) -> str:
    choices = _choices(annotation)
    if choices is not None:
        return "{" + ",".join(_show(c) for c in choices) + "}"
    members, optional = _members(annotation)
    names = []
    for m in members:
        origin = typing.get_origin(m)
        names.append({list: "LIST", tuple: "A,B", dict: "K=V,..."}.get(origin, getattr(m, "__name__", "X").upper()))
    return "|".join(dict.fromkeys(names)) + ("|none" if optional else "")


# ------------------------------------------------------------------------------------------ argparse
def flag_name(name: str) -> str:
    """The flag of a field: `target_modules` -> `--target-modules`."""
    return "--" + name.replace("_", "-")


def flag_help(text: str, default: Any) -> str:
    """A flag's `--help` text: its docstring entry `text` and its effective default.

    Args:
        text: the field's entry in the class docstring.
        default: the dataclass default.

    Returns:
        `text` as it is when it states its own default (`(default: ...)`: what the library
        resolves a None to) or says the field is required; else `text (default: VALUE)`.
    """
    if _STATED_DEFAULT in text or _REQUIRED.search(text):
        return text
    shown = json.dumps(default) if isinstance(default, dict | list) else _show(default)
    return f"{text} (default: {shown})"


def add_flags(parser: argparse.ArgumentParser, specs: Sequence[FlagSpec]) -> None:
    """Add one flag per exposed field of each spec, in a group per spec.

    Unset flags stay out of the namespace (default `SUPPRESS`), so they never override TOML.
    """
    for spec in specs:
        group = parser.add_argument_group(spec.title)
        helps = field_help(spec.cls)
        hints = typing.get_type_hints(spec.cls)
        for f in spec.fields():
            annotation = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            names = [flag_name(f.name), *spec.aliases.get(f.name, ())]
            if annotation is bool:
                group.add_argument(
                    *names,
                    dest=f.name,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=flag_help(helps.get(f.name, ""), default),
                )
                continue

            def convert(value: str, annotation: Any = annotation) -> Any:
                try:
                    return parse_value(annotation, value)
                except ValueError as err:
                    raise argparse.ArgumentTypeError(str(err)) from None

            convert.__name__ = f.name  # argparse names the type in its error message
            is_dict = typing.get_origin(annotation) is dict
            group.add_argument(
                *names,
                dest=f.name,
                type=convert,
                action=_MergeDicts if is_dict else "store",
                default=argparse.SUPPRESS,
                metavar=_metavar(annotation),
                help=flag_help(helps.get(f.name, ""), default),
            )


class _MergeDicts(argparse.Action):
    """A `dict` flag given more than once merges its pairs (`--adapter a=x --adapter b=y`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        previous = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, {**previous, **values} if isinstance(previous, dict) else values)


# ------------------------------------------------------------------------------------------ TOML
def read_toml(path: str | Path) -> dict[str, Any]:
    """The key-value pairs of a TOML file (dashes in keys read as underscores).

    Raises:
        ConfigError: the file is missing or not valid TOML.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(specs: Sequence[FlagSpec], args: argparse.Namespace, toml: Mapping[str, Any] | None, source: str) -> list:
    """Build one instance of each spec's dataclass: defaults, then `toml`, then the given flags.

    Args:
        specs: the command's specs.
        args: parsed flags (only those given are in it).
        toml: values from the `--config` file, or None.
        source: the file's name, for messages.

    Returns:
        The instances, in the order of `specs`.

    Raises:
        ConfigError: an unknown TOML key (the known keys are listed), a TOML value that does not
            fit its field's type, or values the dataclass refuses (every problem at once).
    """
    owner: dict[str, tuple[FlagSpec, str]] = {}
    for spec in specs:
        for f in spec.fields():
            owner[f.name] = (spec, f.name)
            for alias in spec.aliases.get(f.name, ()):
                owner[alias.lstrip("-").replace("-", "_")] = (spec, f.name)
    values: dict[int, dict[str, Any]] = {id(spec): {} for spec in specs}
    problems: list[str] = []
    if toml:
        unknown = sorted(set(toml) - set(owner))
        if unknown:
            known = sorted(f.name for spec in specs for f in spec.fields())
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {', '.join(known)}")
        for key, value in toml.items():
            spec, name = owner[key]
            annotation = typing.get_type_hints(spec.cls)[name]
            if isinstance(value, str) and _members(annotation)[0] != [str]:
                try:
                    value = parse_value(annotation, value)
                except ValueError as err:
                    problems.append(f"{key}: {err}")
                    continue
            values[id(spec)][name] = value
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    for spec in specs:
        for f in spec.fields():
            if f.name in vars(args):
                values[id(spec)][f.name] = getattr(args, f.name)
    built = []
    for spec in specs:
        try:
            built.append(spec.cls(**values[id(spec)]))
        except TypeError as err:  # a TOML value of a wrong kind that the dataclass could not take
            raise ConfigError(f"{source}: {err}") from None
    return built
