"""`softtool bench`: measure generation (or, with --train, training) speed of softtool against PEFT and
plain transformers on one workload, and relate it to this machine's limits.

Flags mirror the fields of softtool.bench.options (their help text is the fields' metadata); a
`--config` JSON file gives the same fields, and flags given on the command line override it.
"""

from __future__ import annotations

import shlex
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click

from softtool.bench.options import BenchOptions, TrainBenchOptions, build_options, load_config
from softtool.errors import SofttoolError

_CONFIG_ONLY = {"inputs", "references"}


def _field_table() -> dict[str, tuple[Any, str]]:
    """option name -> (type annotation, help), over both dataclasses (the generate help wins on clashes)."""
    table: dict[str, tuple[Any, str]] = {}
    for cls in (TrainBenchOptions, BenchOptions):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in _CONFIG_ONLY:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            help_text = f"{f.metadata.get('help', '')} [default: {default}]"
            if f.name in table and cls is BenchOptions:
                help_text = f"{f.metadata.get('help', '')} [default: {default}; with --train: see config]"
            table[f.name] = (hints[f.name], help_text)
    return table


def _convert(name: str, hint: Any, raw: Any) -> Any:
    """A command-line string (or a bool flag) as the dataclass field's type."""
    if raw is None or isinstance(raw, bool):
        return raw
    # Unwrap Optional[X] (X | None); list[X] keeps its item type for the split below.
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    try:
        if typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            return [item(v.strip()) for v in raw.split(",") if v.strip()]
        if base in (int, float):
            return base(raw)
    except ValueError as exc:
        raise SofttoolError(f"--{name.replace('_', '-')}: cannot read {raw!r} ({exc})") from exc
    return raw


def _add_options(command):
    for name, (hint, help_text) in sorted(_field_table().items(), reverse=True):
        flag = name.replace("_", "-")
        if hint is bool:
            command = click.option(f"--{flag}/--no-{flag}", name, default=None, help=help_text)(command)
        else:
            command = click.option(f"--{flag}", name, default=None, help=help_text)(command)
    return command


def _values_for(cls: type, config: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {k: v for k, v in config.items() if k in names}
    for key, raw in given.items():
        if raw is not None and key in names:
            values[key] = _convert(key, hints[key], raw)
    return values


@click.command(name="bench")
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="Workload config (benchmarks/configs/*.json)."
)
@click.option("--train", "train_mode", is_flag=True, help="Benchmark training steps instead of generation.")
@_add_options
def bench(config_path: str | None, train_mode: bool, **given: Any) -> None:
    """Measure tokens/s, latency, time to first token, peak memory and quality of softtool's backends
    (torch, onnx, onnx-int8) against PEFT prompt tuning and plain transformers, on one workload.

    \b
    Examples:
      softtool bench --config benchmarks/configs/translation.json
      softtool bench --task translation --data ../shared/data/multi30k --batch-size 1 --backends peft,hf,torch
      softtool bench --config benchmarks/configs/translation.json --train

    Without --adapter an untrained prompt (vocab init) is benchmarked: speed does not depend on training.
    Writes the JSON result to --output (and a PNG chart beside it) and prints a table.
    """
    from rich.console import Console

    from softtool.bench.report import print_table, write_chart, write_json

    config = load_config(config_path) if config_path else {}
    source = config_path or "command line"
    known = {f.name for f in fields(BenchOptions)} | {"train"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise SofttoolError(f"{source}: unknown option(s) {unknown}; known: {sorted(known)}")
    command = "softtool bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else ""
    console = Console(stderr=True)
    if train_mode:
        from softtool.bench.train import run_train_bench

        shared = {k: v for k, v in config.items() if k in ("task", "data", "model", "threads", "inputs", "references")}
        train_config = {**shared, **config.get("train", {})}
        unknown = sorted(set(config.get("train", {})) - {f.name for f in fields(TrainBenchOptions)})
        if unknown:
            raise SofttoolError(f"{source}: unknown training option(s) {unknown} under 'train'")
        options = build_options(TrainBenchOptions, _values_for(TrainBenchOptions, train_config, given), source)
        with console.status("training benchmark") as status:
            result = run_train_bench(options, command=command, progress=lambda m: status.update(m))
    else:
        values = _values_for(BenchOptions, {k: v for k, v in config.items() if k != "train"}, given)
        options = build_options(BenchOptions, values, source)
        with console.status("preparing the workload") as status:
            result = _run(options, command, status)
    print_table(result, Console())
    if options.output:
        path = write_json(result, options.output)
        chart = write_chart(result, Path(options.output).with_suffix(".png"))
        click.echo(f"wrote {path}" + (f" and {chart}" if chart else ""), err=True)


def _run(options: BenchOptions, command: str, status) -> dict[str, Any]:
    from softtool.bench.runner import run_bench

    return run_bench(options, command=command, progress=status.update)
