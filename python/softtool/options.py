"""Command-line flags from options dataclasses: one way from a field to a flag.

Every options object (TrainOptions, EvalOptions, ExportOptions, ...) is a dataclass whose fields carry
their help text and limits in `metadata`; `cli_options(cls)` turns those fields into click options, and
`build(cls, values)` turns the parsed values back into the dataclass, whose `__post_init__` rejects bad
combinations (reported as a one-line `error:`). A field declares its flag like this:

    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch", "min": 1})
    lr: float = field(default=0.03, metadata={"help": "learning rate", "min": 0, "min_open": True})
    schedule: str = field(default="linear", metadata={"help": "decay after warmup", "choices": SCHEDULES})
    backend: str = field(default="auto", metadata={"help": "...", "flag": "--dist-backend"})
    task_options: dict = field(default_factory=dict, metadata={"cli": False})

Metadata keys:
    help              the option's help text (the only required key)
    flag              the long flag (or a tuple with a short one, ("--output", "-o")); default: --field-name
    cli               False: the field is not a command-line option (set it in code or a config file)
    choices           the allowed values (click.Choice; for a list field, the allowed items)
    min, max          bounds (click.IntRange / FloatRange); min_open / max_open make them strict
    metavar           the placeholder shown in --help

The click type follows the annotation: int, float (NaN and infinity are refused), str, bool (a
`--x/--no-x` pair), `X | None` (default None), and `list[X]` (a comma-separated list). A command may
adjust a field for itself with `override={"field": {...}}`, using the keys above and also `default`,
`required`, `show_default` and `type` (an annotation to use instead of the field's).

This module is the lowest layer of the CLI: it imports only the standard library, click and
softtool.errors.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click

from softtool.errors import SofttoolError

__all__ = [
    "CommaList",
    "FiniteFloat",
    "FiniteFloatRange",
    "build",
    "click_type",
    "cli_fields",
    "cli_options",
    "given_on_command_line",
    "take",
]

_OVERRIDE_ONLY = {"default", "required", "show_default", "type"}
_KNOWN = {"help", "flag", "cli", "choices", "min", "max", "min_open", "max_open", "metavar"} | _OVERRIDE_ONLY


def _check_finite(param_type: click.ParamType, number: float, value: Any, param, ctx) -> float:
    if not math.isfinite(number):
        param_type.fail(f"{value!r} is not a finite number.", param, ctx)
    return number


class FiniteFloat(click.types.FloatParamType):
    """A float that refuses NaN and infinity (click's FLOAT lets them through)."""

    def convert(self, value: Any, param, ctx) -> Any:
        return _check_finite(self, super().convert(value, param, ctx), value, param, ctx)


class FiniteFloatRange(click.FloatRange):
    """A bounded float that refuses NaN (which passes every comparison) and infinity."""

    def convert(self, value: Any, param, ctx) -> Any:
        number = _check_finite(self, click.FLOAT.convert(value, param, ctx), value, param, ctx)
        return super().convert(number, param, ctx)


class CommaList(click.ParamType):
    """A comma-separated list, each item converted by `item` (`--backends peft,hf`)."""

    name = "list"

    def __init__(self, item: click.ParamType) -> None:
        self.item = item

    def get_metavar(self, param, ctx=None) -> str:
        if isinstance(self.item, click.Choice):
            return "[" + "|".join(map(str, self.item.choices)) + "],..."
        return f"{self.item.name.upper()},..."

    def convert(self, value: Any, param, ctx) -> list[Any]:
        if isinstance(value, list | tuple):  # a default, or a value from a config file
            parts = list(value)
        else:
            parts = [p.strip() for p in str(value).split(",") if p.strip()]
            if not parts:
                self.fail(f"{value!r} is an empty list.", param, ctx)
        return [self.item.convert(p, param, ctx) for p in parts]


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One field's option, resolved from its metadata and the command's override."""

    name: str
    flags: tuple[str, ...]
    hint: Any
    meta: Mapping[str, Any]
    default: Any

    @property
    def is_bool(self) -> bool:
        return self.hint is bool


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _named(param_type: click.ParamType, name: str) -> click.ParamType:
    # "'abc' is not a valid integer", not "... integer range"; the range itself shows in --help.
    param_type.name = name
    return param_type


def _scalar_type(hint: Any, meta: Mapping[str, Any], where: str) -> click.ParamType:
    if "choices" in meta:
        return click.Choice([str(c) for c in meta["choices"]])
    bounds = {k: meta[k] for k in ("min", "max", "min_open", "max_open") if k in meta}
    if hint is int:
        return _named(click.IntRange(**bounds), "integer") if bounds else click.INT
    if hint is float:
        return _named(FiniteFloatRange(**bounds), "float") if bounds else FiniteFloat()
    if hint is str:
        if bounds:
            raise TypeError(f"{where}: min/max need an int or float field")
        return click.STRING
    raise TypeError(f"{where}: no command-line type for {hint!r}; give it metadata cli=False or an override type")


def click_type(hint: Any, meta: Mapping[str, Any], where: str = "option") -> click.ParamType | None:
    """The click type for a field annotation and its metadata (None for a bool flag), e.g. click_type(int, {"min": 0})."""
    hint = _unwrap_optional(hint)
    if hint is bool:
        return None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return CommaList(_scalar_type(item, meta, where))
    return _scalar_type(hint, meta, where)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _specs(cls: type, only: Sequence[str] | None, exclude: Sequence[str], override: Mapping[str, Mapping]) -> list:
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for name in [*(only or ()), *exclude, *override]:
        if name not in by_name:
            raise TypeError(f"{cls.__name__} has no field {name!r}")
    specs = []
    for name in only or list(by_name):
        f = by_name[name]
        meta = {**f.metadata, **override.get(name, {})}
        if name in exclude or meta.get("cli", True) is False:
            continue
        unknown = set(meta) - _KNOWN
        if unknown:
            raise TypeError(f"{cls.__name__}.{name}: unknown option metadata {sorted(unknown)}")
        flags = meta.get("flag", f"--{name.replace('_', '-')}")
        flags = (flags,) if isinstance(flags, str) else tuple(flags)
        hint = meta.get("type", hints[name])
        default = meta["default"] if "default" in meta else _default_of(f)
        specs.append(_Spec(name, flags, hint, meta, default))
    return specs


def _option(spec: _Spec, where: str) -> Callable:
    meta = spec.meta
    kw: dict[str, Any] = {"help": meta.get("help", "")}
    kw["required"] = meta.get("required", spec.default is dataclasses.MISSING)
    if not kw["required"]:
        kw["default"] = spec.default
    if "metavar" in meta:
        kw["metavar"] = meta["metavar"]
    if spec.is_bool:
        long = spec.flags[0]
        decls = [f"{long}/--no-{long.removeprefix('--')}", *spec.flags[1:]]
        kw["show_default"] = meta.get("show_default", True)
        return click.option(*decls, spec.name, **kw)
    kw["type"] = click_type(spec.hint, meta, where)
    shown = meta.get("show_default")
    if shown is None:
        shown = not kw["required"] and spec.default is not None
    kw["show_default"] = shown
    return click.option(*spec.flags, spec.name, **kw)


def cli_fields(cls: type, *, only=None, exclude=(), override=None) -> list[str]:
    """The names of the fields of `cls` that `cli_options` (with the same arguments) turns into options."""
    return [s.name for s in _specs(cls, only, exclude, override or {})]


def cli_options(
    cls: type,
    *,
    only: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    override: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable:
    """A decorator adding one click option per field of the dataclass `cls` (in field order).

    Each option's parameter name is the field name, so `build(cls, kwargs)` finds its values again.
    `only` picks and orders fields, `exclude` leaves some out, `override` adjusts metadata per field.
    """
    specs = _specs(cls, only, exclude, override or {})

    def decorate(command: Callable) -> Callable:
        taken = {p.name for p in getattr(command, "__click_params__", [])}
        for spec in reversed(specs):  # click lists options in the reverse order decorators are applied
            if spec.name in taken:
                raise TypeError(f"{cls.__name__}.{spec.name}: the command already has a parameter of that name")
            command = _option(spec, f"{cls.__name__}.{spec.name}")(command)
        return command

    return decorate


def take(cls: type, values: dict[str, Any], *, only=None, exclude=(), override=None) -> dict[str, Any]:
    """Remove and return the values of `cls`'s option fields from a command's keyword arguments."""
    names = cli_fields(cls, only=only, exclude=exclude, override=override)
    return {name: values.pop(name) for name in names if name in values}


def build(cls: type, values: Mapping[str, Any], **extra: Any) -> Any:
    """`cls(**values, **extra)`, keeping only `cls`'s fields of `values`; a ValueError becomes a SofttoolError.

    The dataclass's own checks thus reach the user as one line (`error: bad option: ...`).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in names}
    kwargs.update(extra)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise SofttoolError(f"bad option: {exc}") from exc


def given_on_command_line(ctx: click.Context, names: typing.Iterable[str]) -> set[str]:
    """Which of the parameters `names` the user set (command line or environment), not left at their default."""
    given = set()
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source not in (
            click.core.ParameterSource.DEFAULT,
            click.core.ParameterSource.DEFAULT_MAP,
        ):
            given.add(name)
    return given
