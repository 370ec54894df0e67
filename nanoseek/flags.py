"""Settings dataclasses as command lines: a field made with `flag()` is a kebab-case flag of the same name.

Every command's settings are one dataclass, and its flags map one-to-one onto the fields. A field's type
gives the flag's parser (`bool` -> `--x/--no-x`, `list[str]` -> one or more values, `X | None` -> X), its
default the flag's default (none: a required flag), its metadata the help text, choices and metavar. A field
holding another settings dataclass (`GenerateConfig.sampling: SamplingParams`) lends its flags too, so one
option has one name wherever it appears. Fields made without `flag()` are not flags (an API-only setting
such as `SamplingParams.logit_bias`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


SCALARS = (str, int, float)


def flag(
    help_text: str,
    *,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    positional: bool = False,
    **kwargs: Any,
) -> Any:
    """A settings field that is also a command-line flag (kwargs: `default` or `default_factory`; with
    neither, the flag is required)."""
    meta = {"help": help_text, "choices": choices, "metavar": metavar, "positional": positional}
    return dataclasses.field(metadata=meta, **kwargs)


def inherit(cls: type, name: str, default: Any) -> Any:
    """A field of `cls` (a base settings class) with a subclass's own default, and the same help."""
    meta = dict(cls.__dataclass_fields__[name].metadata)
    return dataclasses.field(metadata=meta, default=default)


def _nested(kind: Any) -> type | None:
    return kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _parser_type(kind: Any) -> tuple[type, bool]:
    """(the type that parses one value, whether the flag takes a list) for a field's annotation."""
    args = typing.get_args(kind)
    if type(None) in args and len(args) == 2:  # X | None
        kind = next(t for t in args if t is not type(None))
    if typing.get_origin(kind) is list and typing.get_args(kind)[0] in SCALARS:
        return typing.get_args(kind)[0], True
    if kind in SCALARS:
        return kind, False
    raise TypeError(f"a flag cannot parse {kind}: use str, int, float, bool, list of one of them, or X | None")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, defaults: Any = None) -> None:
    """One flag per `flag()` field of cls and of the settings dataclasses it holds; `defaults` is an
    instance whose values are shown and used as defaults (a holder's own default for a held dataclass)."""
    hints = typing.get_type_hints(cls)
    required_first = sorted(dataclasses.fields(cls), key=lambda f: _default(f) is not dataclasses.MISSING)
    for f in required_first:
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        if (inner := _nested(hints[f.name])) is not None:
            add_dataclass_flags(parser, inner, default)
            continue
        if "help" not in f.metadata:
            continue
        meta, kind = f.metadata, hints[f.name]
        name = f.name if meta["positional"] else f"--{f.name.replace('_', '-')}"
        required = default is dataclasses.MISSING
        options: dict[str, Any] = {"help": meta["help"]}
        if meta["choices"]:
            options["choices"] = meta["choices"]
        if meta["metavar"]:
            options["metavar"] = meta["metavar"]
        if required and not meta["positional"]:
            options["required"] = True
        elif not required:
            options["default"] = default
            if default not in (None, "", []):
                options["help"] += f" (default: {default})"
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"], many = _parser_type(kind)
            if many:
                options["nargs"] = "+"
        parser.add_argument(name, **options)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The settings that the parsed flags describe (held dataclasses built from their own flags)."""
    hints, values = typing.get_type_hints(cls), vars(args)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if (inner := _nested(hints[f.name])) is not None:
            kwargs[f.name] = from_args(inner, args)
        elif "help" in f.metadata and f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)
