"""`softtool eval`: generate on a data split with a trained prompt (or an ONNX export) and score it,
optionally next to the discrete instruction prompt and the zero-shot input."""

from __future__ import annotations

from pathlib import Path

import click

from softtool.errors import SofttoolError

EXPORT_MARKER = "softtool_export.json"


def _h(field: str) -> str:
    from softtool.evaluate import EvalOptions
    from softtool.training.options import help_of

    return help_of(EvalOptions, field)


@click.command(name="eval", context_settings={"show_default": True})
@click.argument("path", type=click.Path())
@click.option("--data", required=True, help="data folder or file")
@click.option("--split", default=None, help=_h("split"))
@click.option("--limit", type=int, default=None, help=_h("limit"))
@click.option(
    "--backend",
    type=click.Choice(["torch", "onnx"]),
    default=None,
    help="generation backend (default: onnx for an export folder, else torch)",
)
@click.option("--num-beams", type=int, default=1, help=_h("num_beams"))
@click.option("--batch-size", type=int, default=8, help=_h("batch_size"))
@click.option("--max-new-tokens", type=int, default=0, help=_h("max_new_tokens"))
@click.option("--max-length", type=int, default=512, help=_h("max_length"))
@click.option("--baseline", is_flag=True, help=_h("baseline"))
@click.option("--task", "task_name", default=None, help="task, when the adapter does not record it (a PEFT adapter)")
@click.option("--template", default=None, help="template, when the adapter does not record it, e.g. '[P:20]{source}'")
@click.option("--model", "model_name", default=None, help="base model (default: the one the adapter names)")
@click.option("--src", default=None, help="translation: source language code (default: the adapter's)")
@click.option("--tgt", default=None, help="translation: target language code (default: the adapter's)")
@click.option("--device", default="cpu", help="cpu or cuda (torch backend)")
@click.option("--output", "-o", required=True, help="folder for predictions.jsonl and metrics.json")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
def eval_command(
    path,
    data,
    split,
    limit,
    backend,
    num_beams,
    batch_size,
    max_new_tokens,
    max_length,
    baseline,
    task_name,
    template,
    model_name,
    src,
    tgt,
    device,
    output,
    quiet,
) -> None:
    """Evaluate the soft prompt in PATH (an adapter folder, or an export folder: implies --backend onnx).

    \b
    Example:
      softtool eval runs/de --data ../shared/data/multi30k --limit 200 --baseline --output runs/de/eval

    Writes OUTPUT/predictions.jsonl and OUTPUT/metrics.json; with --baseline also OUTPUT/baseline/ and
    OUTPUT/zero_shot/, and prints the three scores side by side. Under `torchrun --nproc_per_node K -m
    softtool eval ...` the examples are shared out over K processes with the same results.
    """
    from softtool.cli.train import unescape_template
    from softtool.distributed import distributed_context
    from softtool.evaluate import EvalOptions, run_eval

    template = unescape_template(template)

    folder = Path(path)
    if not folder.exists():
        raise SofttoolError(f"adapter or export folder not found: {folder}")
    is_export = (folder / EXPORT_MARKER).is_file()
    backend = backend or ("onnx" if is_export else "torch")
    if backend == "onnx" and not is_export:
        raise SofttoolError(
            f"--backend onnx needs an export folder (with {EXPORT_MARKER}); run `softtool export` first"
        )
    try:
        options = EvalOptions(
            split=split,
            limit=limit,
            backend=backend,
            num_beams=num_beams,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            baseline=baseline,
        )
    except ValueError as exc:
        raise SofttoolError(f"bad option: {exc}") from exc
    task_options = {k: v for k, v in (("src", src), ("tgt", tgt)) if v} or None
    if task_options and task_name is None:
        from softtool.adapter import load_adapter

        meta = load_adapter(folder).meta if not is_export else None
        task_options = {**(meta.task_options if meta else {}), **task_options}
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
            _print_table(results, Path(output))


def _print_table(results: dict, output: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    first = next(iter(results.values()))
    # Only scores: metrics.json also holds sacrebleu signatures and counts.
    names = [
        k for k, v in first["metrics"].items() if isinstance(v, int | float) and not isinstance(v, bool) and k != "n"
    ]
    table = Table(title=f"{first['task']} on {first['split']} ({first['n']} examples)")
    table.add_column("prompt")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("tokens/s", justify="right")
    for kind, record in results.items():
        cells = [
            f"{record['metrics'][n]:.2f}" if isinstance(record["metrics"].get(n), int | float) else "-" for n in names
        ]
        table.add_row(kind.replace("_", "-"), *cells, f"{record['tokens_per_s'] or 0:.1f}")
    console = Console()
    console.print(table)
    console.print(f"predictions and metrics in {output}")
