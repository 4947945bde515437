"""What several `softtool` commands share: --threads, the search flags of eval and generate, and how a
model folder picks its backend."""

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
