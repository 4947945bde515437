"""`softtool bench`: measure generation (or, with --train, training) speed of softtool against PEFT and
plain transformers on one workload, and relate it to this machine's limits.

Flags are the fields of softtool.bench.options (softtool.options: their help text, types and limits are
the fields' metadata); a `--config` JSON file gives the same fields, and flags given on the command line
override it.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click

from softtool.bench.options import BenchOptions, TrainBenchOptions, build_options, load_config
from softtool.errors import SofttoolError
from softtool.options import cli_fields, cli_options, given_on_command_line

# Keys of a config's top level that a --train run also reads (the rest of it lives under "train").
_SHARED_WITH_TRAIN = ("task", "data", "model", "threads", "inputs", "references")


def _default(cls: type, name: str) -> Any:
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _overrides() -> dict[str, dict[str, Any]]:
    """One flag serves both dataclasses; where their defaults differ, the help says what --train uses."""
    train_fields = set(cli_fields(TrainBenchOptions))
    out: dict[str, dict[str, Any]] = {}
    for f in fields(BenchOptions):
        if f.name not in train_fields:
            continue
        train_default = _default(TrainBenchOptions, f.name)
        if train_default != _default(BenchOptions, f.name) and train_default is not None:
            out[f.name] = {"help": f"{f.metadata['help']} With --train: {_show(train_default)}."}
    # Generation takes one prompt length, training a list of them to compare: the flag takes a list.
    out["num_virtual_tokens"] = {
        "type": list[int],
        "help": f"{BenchOptions.__dataclass_fields__['num_virtual_tokens'].metadata['help']} "
        "With --train: the lengths to compare, e.g. 20,100 (default 20,100).",
    }
    return out


_TRAIN_ONLY = [name for name in cli_fields(TrainBenchOptions) if name not in cli_fields(BenchOptions)]


@click.command(name="bench", context_settings={"show_default": True})
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="Workload config (benchmarks/configs/*.json)."
)
@click.option("--train", "train_mode", is_flag=True, help="Benchmark training steps instead of generation.")
@click.option(
    "--allow-dirty",
    is_flag=True,
    help="Write into the checkout's benchmarks/results/ from a tree with uncommitted changes, storing the diff "
    "beside the result (refused otherwise: a result there must name the code it ran).",
)
@cli_options(BenchOptions, override=_overrides())
@cli_options(TrainBenchOptions, only=_TRAIN_ONLY)
@click.pass_context
def bench(ctx: click.Context, config_path: str | None, train_mode: bool, allow_dirty: bool, **values: Any) -> None:
    """Measure tokens/s, latency, time to first token, peak memory and quality of softtool's backends
    (torch, onnx, onnx-int8) against PEFT prompt tuning and plain transformers, on one workload.

    \b
    Examples:
      softtool bench --config benchmarks/configs/translation.json
      softtool bench --task translation --data ../shared/data/multi30k --batch-size 1 --backends peft,hf,torch
      softtool bench --config benchmarks/configs/translation.json --train
      softtool bench --config benchmarks/configs/classify_sst2.json   # rank classification (adapter: runs/sst2)

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
    given = {name: values[name] for name in given_on_command_line(ctx, values)}
    command = "softtool bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else ""
    console = Console(stderr=True)
    if train_mode:
        from softtool.bench.train import run_train_bench

        unknown = sorted(set(config.get("train", {})) - {f.name for f in fields(TrainBenchOptions)})
        if unknown:
            raise SofttoolError(f"{source}: unknown training option(s) {unknown} under 'train'")
        shared = {k: v for k, v in config.items() if k in _SHARED_WITH_TRAIN}
        train_values = {**shared, **config.get("train", {}), **_only(TrainBenchOptions, given)}
        options = build_options(TrainBenchOptions, train_values, source)
        diff = _check_tree(options.output, allow_dirty)
        with console.status("training benchmark") as status:
            result = run_train_bench(options, command=command, progress=lambda m: status.update(m))
    else:
        if len(given.get("num_virtual_tokens", [0])) != 1:
            raise SofttoolError("--num-virtual-tokens: a generation benchmark takes one prompt length (lists: --train)")
        if "num_virtual_tokens" in given:
            given["num_virtual_tokens"] = given["num_virtual_tokens"][0]
        values = {**{k: v for k, v in config.items() if k != "train"}, **_only(BenchOptions, given)}
        options = build_options(BenchOptions, values, source)
        diff = _check_tree(options.output, allow_dirty)
        with console.status("preparing the workload") as status:
            result = _run(options, command, status)
    print_table(result, Console(), path=options.output)
    if options.output:
        if diff:
            from softtool.bench import provenance

            result["uncommitted_diff"] = provenance.diff_record(options.output, diff)
            provenance.write_diff(options.output, diff)
        path = write_json(result, options.output)
        chart = write_chart(result, Path(options.output).with_suffix(".png"))
        click.echo(f"wrote {path}" + (f" and {chart}" if chart else ""), err=True)


def _check_tree(output: str | None, allow_dirty: bool) -> bytes | None:
    """Before the run: the uncommitted diff a result written into the checkout's benchmarks/results/ would carry
    (None elsewhere, or on a clean tree); refused without --allow-dirty (softtool.bench.provenance)."""
    from softtool.bench import provenance

    if not output or not provenance.writes_results(output):
        return None
    diff = provenance.tree_diff()
    if diff and not allow_dirty:
        raise SofttoolError(provenance.refusal(diff))
    return diff or None


def _only(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _run(options: BenchOptions, command: str, status) -> dict[str, Any]:
    from softtool.bench.runner import run_bench

    return run_bench(options, command=command, progress=status.update)
