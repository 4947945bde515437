"""`softtool export`: bake one or more trained soft prompts into an ONNX graph with KV cache, and verify it.

The flags come from the fields of softtool.export.onnx.ExportOptions (softtool.options), which also holds
their help text and checks.
"""

from __future__ import annotations

import json

import click

from softtool.cli.common import configure_threads, threads_option
from softtool.export.onnx import ExportOptions
from softtool.options import build, cli_options


@click.command(name="export", context_settings={"show_default": True})
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder to write the export to.")
@cli_options(ExportOptions)
@threads_option
def export(adapter_dirs, output, threads, **values) -> None:
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

    from softtool.export.onnx import export_adapters

    options = build(ExportOptions, values)
    configure_threads(threads)
    stages = tqdm(total=3 + (options.dtype != "fp32"), desc="export", unit="stage", leave=False)

    def progress(message: str) -> None:
        stages.set_description(message)
        stages.update(1)

    try:
        meta = export_adapters(list(adapter_dirs), output, options, progress=progress)
    finally:
        stages.close()
    report = meta.verification
    click.echo(
        f"exported {len(adapter_dirs)} task(s) to {output} in {meta.export_seconds:.1f} s ({meta.dtype}, {meta.device})"
    )
    if report:
        click.echo(
            "verified: " + json.dumps({k: report[k] for k in ("max_abs_logit_diff", "greedy_agreement", "steps")})
        )
