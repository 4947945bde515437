"""The `softtool` command line: a click group whose sub-commands live one per module.

Sub-commands are imported lazily so that `softtool --help` answers at once instead of waiting for
torch and transformers to import.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import click

from softtool import __version__
from softtool.errors import SofttoolError, SofttoolWarning

# command name -> "module:attribute"
_COMMANDS = {
    "train": "softtool.cli.train:train",
    "eval": "softtool.cli.evaluate:eval_command",
    "generate": "softtool.cli.generate:generate",
    "export": "softtool.cli.export:export",
    "bench": "softtool.cli.bench:bench",
    "serve": "softtool.cli.serve:serve",
}

_SHORT_HELP = {
    "train": "Train a soft prompt against a frozen model.",
    "eval": "Generate on a data split and score the predictions.",
    "generate": "Generate text for inputs given on the command line, in a file or on stdin.",
    "export": "Bake a trained soft prompt into an ONNX graph with KV cache.",
    "bench": "Measure speed against PEFT and plain transformers.",
    "serve": "Serve soft prompts over an OpenAI-compatible HTTP API.",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        if name not in _COMMANDS:
            return None
        module_name, attr = _COMMANDS[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            return _unavailable(name)
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help without importing every command module.
        rows = [(name, _SHORT_HELP.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _unavailable(name: str) -> click.Command:
    @click.command(name=name, help=_SHORT_HELP.get(name, ""))
    def command() -> None:
        raise SofttoolError(f"`softtool {name}` is not available in this build")

    return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="softtool")
def cli() -> None:
    """softtool: soft prompts (prompt tuning, P-tuning) for a frozen language model.

    \b
    Typical use:
      softtool train --task translation --data ../shared/data/multi30k --output runs/de
      softtool eval runs/de --data ../shared/data/multi30k --limit 200 --output runs/de/eval
      softtool export runs/de -o runs/de-onnx
      softtool bench --task translation --data ../shared/data/multi30k

    Run `softtool COMMAND --help` for the options of each command.
    """


def _show_warning(message, category, filename, lineno, file=None, line=None, _shown=warnings.showwarning) -> None:
    if issubclass(category, SofttoolWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _shown(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns user errors into a one-line message (exit status 2), softtool's
    warnings into `warning: ...` lines."""
    args = sys.argv[1:] if argv is None else argv
    warnings.showwarning = _show_warning
    try:
        if args and not {"-h", "--help", "--version"} & set(args):
            # Before any command imports torch: OpenMP reads its wait policy once, at load (softtool.threads).
            from softtool.threads import prepare_process

            prepare_process()
        cli.main(args=argv, prog_name="softtool", standalone_mode=False)
    except SofttoolError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
