"""What several `softtool` commands share: --threads, --output, the search flags and the adapter flags
(--template, --model, --device, --backend's default) of eval and generate, and how a model folder picks its
backend."""

from __future__ import annotations

from pathlib import Path

import click

from softtool.adapter import WEIGHTS_FILE
from softtool.errors import SofttoolError
from softtool.export_meta import ExportMeta
from softtool.options import cli_options, click_type

# The search flags eval and generate both take (beam size and budget come from each command's own options).
SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "seed", "repetition_penalty", "no_repeat_ngram_size")

threads_option = click.option(
    "--threads",
    type=click_type(int, {"min": 0}),
    default=0,
    show_default=True,
    help="CPU threads for torch and ONNX Runtime (0: one per core this process may use)",
)

device_option = click.option("--device", default="cpu", help="cpu or cuda (torch backend)")

# eval and generate: --backend follows the folder unless given.
BACKEND_OVERRIDE = {"backend": {"default": None, "show_default": "onnx for an export folder, else torch"}}


def output_folder_option(help: str):
    """--output/-o: the (required) folder a command writes its results to."""
    return click.option("--output", "-o", type=click.Path(file_okay=False), required=True, help=help)


def adapter_options(template_example: str):
    """--template and --model, for the commands that run an adapter (eval, generate)."""

    def decorate(command):
        command = click.option(
            "--model", "model_name", default=None, help="base model (default: the one the adapter names)"
        )(command)
        return click.option(
            "--template", default=None, help=f"template, when the adapter does not record it, e.g. '{template_example}'"
        )(command)

    return decorate


def search_options(fields: tuple[str, ...], override: dict | None = None):
    """Click options for these fields of softtool.search.SearchOptions (help and bounds from its metadata)."""
    from softtool.search import SearchOptions

    override = override or {}
    return cli_options(SearchOptions, only=fields, override=override or {})


def configure_threads(threads: int) -> int:
    """Set the thread count before any model loads (softtool.threads); returns the count used."""
    from softtool.threads import configure_threads as configure

    return configure(threads)


def unescape_template(template: str | None) -> str | None:
    """Shells pass "\\n" literally; templates need real newlines (the tasks' own templates have them)."""
    return None if template is None else template.replace("\\n", "\n").replace("\\t", "\t")


def resolve_backend(path: str, backend: str | None) -> tuple[Path, str]:
    """The model folder and its backend: onnx for an export folder (with its marker file), else torch."""
    folder = Path(path)
    if not folder.exists():
        raise SofttoolError(f"adapter or export folder not found: {folder}")
    is_export = ExportMeta.is_export(folder)
    if not is_export and (folder / ExportMeta.MODEL_FILE).is_file() and not (folder / WEIGHTS_FILE).is_file():
        raise SofttoolError(
            f"{folder} holds {ExportMeta.MODEL_FILE} but no {ExportMeta.FILE} (an unfinished export, or one that "
            "failed verification); re-run softtool export"
        )
    backend = backend or ("onnx" if is_export else "torch")
    if backend == "onnx" and not is_export:
        raise SofttoolError(
            f"--backend onnx needs an export folder (with {ExportMeta.FILE}); run `softtool export` first"
        )
    return folder, backend
