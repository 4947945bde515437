"""`softtool eval`: generate on a data split with a trained prompt (or an ONNX export) and score it,
optionally next to the discrete instruction prompt and the zero-shot input.

The flags come from the fields of EvalOptions, TranslationOptions and softtool.search.SearchOptions
(softtool.options), which also hold their help text and checks.
"""

from __future__ import annotations

from pathlib import Path

import click

from softtool.cli.common import (
    BACKEND_OVERRIDE,
    SAMPLING_FIELDS,
    adapter_options,
    configure_threads,
    device_option,
    output_folder_option,
    resolve_backend,
    search_options,
    threads_option,
    unescape_template,
)
from softtool.data.tasks import TASK_NAMES, TranslationOptions
from softtool.evaluate import EvalOptions
from softtool.options import build, cli_options, given_on_command_line


@click.command(name="eval", context_settings={"show_default": True})
@click.argument("path", type=click.Path())
@click.option("--data", required=True, help="data folder (or a Hugging Face dataset name)")
@cli_options(EvalOptions, override=BACKEND_OVERRIDE)
@search_options(SAMPLING_FIELDS)
@click.option(
    "--task",
    "task_name",
    type=click.Choice(TASK_NAMES),
    default=None,
    help="task, when the adapter does not record it (a PEFT adapter)",
)
@adapter_options("[P:20]{source}")
@cli_options(
    TranslationOptions, override={f: {"default": None, "show_default": "the adapter's"} for f in ("src", "tgt")}
)
@device_option
@threads_option
@output_folder_option("folder for predictions.jsonl and metrics.json")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
@click.pass_context
def eval_command(
    ctx, path, data, task_name, template, model_name, src, tgt, device, threads, output, quiet, **values
) -> None:
    """Evaluate the soft prompt in PATH (an adapter folder, or an export folder: implies --backend onnx).

    \b
    Example:
      softtool eval runs/de --data ../shared/data/multi30k --limit 200 --baseline --output runs/de/eval

    Writes OUTPUT/predictions.jsonl and OUTPUT/metrics.json; with --baseline also OUTPUT/baseline/ (the
    instruction), OUTPUT/zero_shot/ (the bare input), OUTPUT/chat/ (the instruction through the chat
    template, for an instruct model) and with --shots K OUTPUT/few_shot/, and prints the scores side by
    side. Under `torchrun --nproc_per_node K -m softtool eval ...` the examples are shared out over K
    processes with the same results.
    """
    from softtool.distributed import distributed_context
    from softtool.evaluate import run_eval

    template = unescape_template(template)
    folder, backend = resolve_backend(path, values["backend"])
    is_export = backend == "onnx"
    search = {name: values[name] for name in given_on_command_line(ctx, SAMPLING_FIELDS)}
    options = build(EvalOptions, values, backend=backend, search=search)
    task_options = {k: v for k, v in (("src", src), ("tgt", tgt)) if v} or None
    if task_options and task_name is None:
        from softtool.adapter import load_adapter

        meta = load_adapter(folder).meta if not is_export else None
        task_options = {**(meta.task_options if meta else {}), **task_options}
    if template is not None and not is_export:
        _check_template(folder, task_name, template)
    configure_threads(threads)
    # Under torchrun each rank generates for its share of the examples; rank 0 writes and prints.
    with distributed_context(device) as dist:
        results = run_eval(
            folder,
            data,
            output,
            options,
            task_name=task_name,
            task_options=task_options,
            template=template,
            model_name=model_name,
            device=device,
            progress=not quiet,
            dist=dist,
        )
        if dist.is_main:
            print_scores(results, Path(output))


def _check_template(folder: Path, task_name: str | None, template: str) -> None:
    """A --template must use the task's input fields (else the prompt never sees the input), before any model loads."""
    from softtool.adapter import load_adapter
    from softtool.data import get_task
    from softtool.prompts.template import Template

    name = task_name or load_adapter(folder).meta.task
    task = get_task(name) if name != "generic" else None
    if task is not None and task.fields:  # the user's own tasks take their fields from the template itself
        task.check_template(Template.parse(template))


def print_scores(results: dict, output: Path, console=None) -> None:
    """The prompts' scores side by side (softtool.console: readable at any width)."""
    from rich.console import Console

    from softtool.console import Column, print_table

    first = next(iter(results.values()))
    # Only scores: metrics.json also holds sacrebleu signatures and counts.
    names = [
        k for k, v in first["metrics"].items() if isinstance(v, int | float) and not isinstance(v, bool) and k != "n"
    ]
    columns = [Column("prompt", "left", essential=True), *(Column(n, essential=True) for n in names)]
    # A classify task ranks labels instead of generating: its speed is examples per second.
    speed = "examples_per_s" if first["task"] == "classify" else "tokens_per_s"
    columns.append(Column(speed.replace("_per_s", "/s")))
    rows = []
    for kind, record in results.items():
        cells = [
            f"{record['metrics'][n]:.2f}" if isinstance(record["metrics"].get(n), int | float) else "-" for n in names
        ]
        value = record.get(speed)
        rows.append([kind.replace("_", "-"), *cells, f"{value:.1f}" if value else "-"])
    console = console or Console()
    title = f"{first['task']} on {first['split']} ({first['n']} examples)"
    print_table(console, title, columns, rows, rest_in=str(output / "metrics.json"))
    console.print(f"predictions and metrics in {output}")
