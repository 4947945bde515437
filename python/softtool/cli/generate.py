"""`softtool generate`: run a trained prompt on texts from the command line or stdin."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from softtool.errors import SofttoolError

EXPORT_MARKER = "softtool_export.json"


@click.command(name="generate", context_settings={"show_default": True})
@click.argument("path", type=click.Path())
@click.argument("texts", nargs=-1)
@click.option(
    "--backend",
    type=click.Choice(["torch", "onnx"]),
    default=None,
    help="generation backend (default: onnx for an export folder, else torch)",
)
@click.option("--num-beams", type=int, default=1, help="beam size (1: greedy)")
@click.option("--max-new-tokens", type=int, default=64, help="generation budget")
@click.option("--field", "fields", multiple=True, help="NAME=VALUE for a template field (repeatable)")
@click.option("--template", default=None, help="template, when the adapter does not record it, e.g. '[P:20]{input}'")
@click.option("--model", "model_name", default=None, help="base model (default: the one the adapter names)")
@click.option("--device", default="cpu", help="cpu or cuda (torch backend)")
@click.option("--raw", is_flag=True, help="print the decoded output as is (no task post-processing)")
def generate(path, texts, backend, num_beams, max_new_tokens, fields, template, model_name, device, raw) -> None:
    """Generate with the soft prompt in PATH for each TEXT (or each stdin line when no TEXT is given).

    TEXT fills the template's single field; for templates with several fields (squad) pass the
    others with --field, e.g. --field context="..." "Who built it?" fills {question}.

    \b
    Example:
      softtool generate runs/de "A man rides a bicycle down the street."
    """
    from softtool.cli.train import unescape_template
    from softtool.data import get_task
    from softtool.evaluate import search_options
    from softtool.runtime import load_generator

    template = unescape_template(template)

    folder = Path(path)
    if not folder.exists():
        raise SofttoolError(f"adapter or export folder not found: {folder}")
    backend = backend or ("onnx" if (folder / EXPORT_MARKER).is_file() else "torch")
    fixed = {}
    for item in fields:
        name, sep, value = item.partition("=")
        if not sep:
            raise SofttoolError(f"--field {item!r}: write NAME=VALUE")
        fixed[name] = value
    kw = {k: v for k, v in {"template": template, "model_name": model_name, "device": device}.items() if v}
    generator = load_generator(folder, backend, **kw) if backend == "torch" else load_generator(folder, backend)
    open_fields = [f for f in generator.template.fields if f not in fixed]
    if len(open_fields) != 1:
        raise SofttoolError(
            f"template {generator.template} has open field(s) {open_fields}; fill all but one with --field NAME=VALUE"
        )
    inputs = list(texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not inputs:
        raise SofttoolError("no input: pass TEXT arguments or lines on stdin")
    meta = generator.meta
    task = None
    if not raw and meta is not None and meta.task != "generic":
        task = get_task(meta.task, **meta.task_options)
    options = search_options(generator.tokenizer, num_beams, max_new_tokens)
    rows = [generator.encode({**fixed, open_fields[0]: text}) for text in inputs]
    for out in generator.generate(rows, None, options):
        text = generator.tokenizer.decode(out[0], skip_special_tokens=True)
        click.echo(task.postprocess(text) if task else text.strip())
