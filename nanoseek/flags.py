"""Settings dataclasses as command lines: a field made with `flag()` is a kebab-case flag of the same name.

Every command's settings are one dataclass (DESIGN.md: "CLI flags are kebab-case and map one-to-one onto
config fields"). A field's type gives the flag's parser (`bool` -> `--x/--no-x`, `list[str]` -> several
values, `X | None` -> X), its default the flag's default, its metadata the help text, choices and metavar. A
field holding another settings dataclass (`GenerateConfig.sampling: SamplingParams`) lends its flags
too, so one option has one name wherever it appears. Fields made without `flag()` are not flags (an API-only
setting such as `SamplingParams.logit_bias`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def flag(
    help_text: str,
    *,
    required: bool = False,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    positional: bool = False,
    **kwargs: Any,
) -> Any:
    """A settings field that is also a command-line flag (kwargs: `default` or `default_factory`)."""
    meta = {"help": help_text, "required": required, "choices": choices, "metavar": metavar, "positional": positional}
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
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, defaults: Any = None) -> None:
    """One flag per `flag()` field of cls and of the settings dataclasses it holds; `defaults` is an
    instance whose values are shown and used as defaults (a holder's own default for a held dataclass)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        if (inner := _nested(hints[f.name])) is not None:
            add_dataclass_flags(parser, inner, default)
            continue
        if "help" not in f.metadata:
            continue
        meta, kind = f.metadata, hints[f.name]
        name = f.name if meta["positional"] else f"--{f.name.replace('_', '-')}"
        options: dict[str, Any] = {"help": meta["help"], "default": default}
        if meta["choices"]:
            options["choices"] = meta["choices"]
        if meta["metavar"]:
            options["metavar"] = meta["metavar"]
        if meta["required"]:
            options["required"] = True
        elif not meta["positional"] and kind is not bool and default not in (None, "", []):
            options["help"] += f" (default: {default})"
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            optional = type(None) in typing.get_args(kind)
            base = next(t for t in typing.get_args(kind) if t is not type(None)) if optional else kind  # X | None
            if typing.get_origin(base) is list:
                options["nargs"] = "+" if meta["required"] else "*"
                base = typing.get_args(base)[0]
            options["type"] = base
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
