"""`softtool serve`: an OpenAI-compatible HTTP server for one or more soft prompts on one base model.

The flags are the fields of softtool.serve.options.ServeOptions (softtool.options); the tasks load before the
server binds, so a bad PATH or a mix that cannot work is a one-line error.
"""

from __future__ import annotations

import logging

import click

from softtool.cli.common import configure_threads, threads_option
from softtool.errors import SofttoolError
from softtool.options import build, cli_options
from softtool.serve.options import ServeOptions


@click.command(name="serve", context_settings={"show_default": True})
@click.argument("paths", nargs=-1)
@cli_options(ServeOptions)
@threads_option
def serve(paths, threads, **values) -> None:
    """Serve the soft prompts in PATH... (adapter folders, or one export folder) over HTTP.

    Each PATH's task is its folder's name (or NAME=PATH); requests name it as their `model`. All tasks share
    one base model and one engine, and requests for different tasks are decoded in one batch. The API is
    OpenAI's: GET /v1/models, POST /v1/completions (also streamed), plus GET /health and GET /metrics.

    \b
    Example:
      softtool serve runs/de runs/fr --port 8000
      softtool serve runs/multi-onnx --adapters-dir runs/new --api-key "$KEY"
      softtool serve runs/de runs/fr --engine vllm --vllm-url http://gpu1:8000,http://gpu2:8000
      curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "de", "prompt": "A dog runs.", "max_tokens": 32}'
    """
    try:
        from softtool.serve.app import default_api_key
    except ModuleNotFoundError as exc:
        raise SofttoolError(
            f"softtool serve needs fastapi, uvicorn and prometheus-client ({exc.name} is missing): "
            "pip install 'softtool[serve]'"
        ) from exc

    values["api_key"] = default_api_key(values.get("api_key"))
    options = build(ServeOptions, values)
    if not paths and options.adapters_dir is None:
        raise SofttoolError("nothing to serve: give adapter or export folders, or --adapters-dir DIR")
    threads = configure_threads(threads)
    logging.basicConfig(level=options.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    from softtool.serve.app import print_ready
    from softtool.serve.app import serve as run
    from softtool.serve.registry import load

    loaded = load(
        list(paths), options.adapters_dir, options.backend, model=options.model, device=options.device, threads=threads
    )
    if options.engine == "vllm" and loaded.backend != "torch":
        raise SofttoolError(
            "--engine vllm serves adapter folders (their prompt tables are sent as prompt_embeds), not an export"
        )
    run(options, loaded, ready=lambda url: print_ready(url, list(loaded.registry.tasks)))
