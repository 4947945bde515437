"""`softtool export`: bake one or more trained soft prompts into an ONNX graph with KV cache, and verify it.

Option help comes from the fields of softtool.export.onnx.ExportOptions, which also validates them.
"""

from __future__ import annotations

import json
from dataclasses import fields

import click

from softtool.errors import SofttoolError


def _help(name: str) -> str:
    from softtool.export.onnx import ExportOptions

    field = next(f for f in fields(ExportOptions) if f.name == name)
    return f"{field.metadata['help']} [default: {field.default}]"


@click.command(name="export")
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder to write the export to.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help=_help("device"))
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", help=_help("dtype"))
@click.option(
    "--int8-method", type=click.Choice(["weight-only", "dynamic"]), default="weight-only", help=_help("int8_method")
)
@click.option("--prompt-table-input", is_flag=True, help=_help("prompt_table_input"))
@click.option("--top-k", type=int, default=0, help=_help("top_k"))
@click.option("--strict-device", is_flag=True, help=_help("strict_device"))
@click.option("--model", default=None, help=_help("model"))
@click.option("--verify/--no-verify", default=True, help=_help("verify"))
@click.option("--verify-steps", type=int, default=32, help=_help("verify_steps"))
@click.option("--overwrite", is_flag=True, help=_help("overwrite"))
def export(adapter_dirs, output, **kw) -> None:
    """Export ADAPTER_DIR (one or more: tasks 0, 1, ... in order) to an ONNX folder.

    The folder holds model.onnx, prompt_table.safetensors, the tokenizer and softtool_export.json, and
    needs nothing else to run (`softtool eval OUT_DIR`, `softtool generate --backend onnx`). Virtual
    token j of task t is the input id V + t*N + j. Before finishing, the graph is run next to PyTorch
    on sample inputs for --verify-steps greedy steps; a mismatch exits non-zero and says by how much.

    \b
    Example:
      softtool export runs/de -o runs/de-onnx
      softtool export runs/de runs/fr -o runs/multi --prompt-table-input
      softtool export runs/de -o runs/de-int8 --dtype int8
    """
    from tqdm import tqdm

    from softtool.export.onnx import ExportOptions, export_adapters

    try:
        options = ExportOptions(**kw)
    except ValueError as exc:
        raise SofttoolError(f"softtool export: {exc}") from exc
    stages = tqdm(total=3 + (options.dtype != "fp32"), desc="export", unit="stage", leave=False)

    def progress(message: str) -> None:
        stages.set_description(message)
        stages.update(1)

    try:
        meta = export_adapters(list(adapter_dirs), output, options, progress=progress)
    finally:
        stages.close()
    report = meta.get("verification")
    click.echo(
        f"exported {len(adapter_dirs)} task(s) to {output} in {meta['export_seconds']:.1f} s "
        f"({meta['dtype']}, {meta['device']})"
    )
    if report:
        click.echo(
            "verified: " + json.dumps({k: report[k] for k in ("max_abs_logit_diff", "greedy_agreement", "steps")})
        )
