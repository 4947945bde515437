"""softtool.options: a dataclass field's metadata is its command-line flag (name, type, limits, help)."""

from __future__ import annotations

from dataclasses import dataclass, field

import click
import pytest
from click.testing import CliRunner

from softtool.errors import SofttoolError
from softtool.options import build, cli_fields, cli_options, given_on_command_line


@dataclass
class Knobs:
    """A stand-in options object with one field of each kind."""

    lr: float = field(default=0.03, metadata={"help": "learning rate", "min": 0, "min_open": True})
    scale: float = field(default=1.0, metadata={"help": "a scale"})
    steps: int = field(default=10, metadata={"help": "steps", "min": 1})
    limit: int | None = field(default=None, metadata={"help": "at most N", "min": 1})
    mode: str = field(default="fast", metadata={"help": "how", "choices": ("fast", "exact")})
    cache: bool = field(default=True, metadata={"help": "cache results"})
    names: list[str] = field(default_factory=lambda: ["a"], metadata={"help": "names", "choices": ("a", "b", "c")})
    sizes: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "sizes", "min": 1})
    backend: str = field(default="auto", metadata={"help": "which backend", "flag": "--knob-backend"})
    extra: dict = field(default_factory=dict, metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.mode == "exact" and not self.cache:
            raise ValueError("mode exact needs the cache")


@click.command()
@cli_options(Knobs)
@click.pass_context
def command(ctx, **values):
    knobs = build(Knobs, values)
    click.echo(repr(knobs))
    click.echo("given=" + ",".join(sorted(given_on_command_line(ctx, values))))


def invoke(*args: str):
    return CliRunner().invoke(command, list(args))


def test_defaults_come_from_the_fields():
    result = invoke()
    assert result.exit_code == 0, result.output
    assert repr(Knobs()) in result.output and "given=\n" in result.output


def test_each_field_becomes_a_typed_flag_named_after_it():
    result = invoke("--lr", "0.5", "--steps", "3", "--limit", "7", "--mode", "exact", "--names", "b,c")
    assert result.exit_code == 0, result.output
    assert "lr=0.5, scale=1.0, steps=3, limit=7, mode='exact', cache=True, names=['b', 'c']" in result.output
    assert "given=limit,lr,mode,names,steps" in result.output


def test_bool_fields_are_flag_pairs_and_metadata_can_rename_a_flag():
    result = invoke("--no-cache", "--knob-backend", "x", "--sizes", "4, 5")
    assert result.exit_code == 0, result.output
    assert "cache=False" in result.output and "sizes=[4, 5]" in result.output and "backend='x'" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "nan"], "'nan' is not a finite number"),
        (["--lr", "inf"], "'inf' is not a finite number"),
        (["--scale", "-inf"], "'-inf' is not a finite number"),
        (["--lr", "0"], "0.0 is not in the range x>0"),
        (["--steps", "0"], "0 is not in the range x>=1"),
        (["--steps", "abc"], "'abc' is not a valid integer"),
        (["--mode", "slow"], "'slow' is not one of 'fast', 'exact'"),
        (["--names", "a,z"], "'z' is not one of 'a', 'b', 'c'"),
        (["--sizes", "1,0"], "0 is not in the range x>=1"),
        (["--sizes", ","], "is an empty list"),
        (["--extra", "x"], "No such option '--extra'"),
    ],
)
def test_bad_values_are_clicks_usage_errors(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_help_shows_each_fields_help_default_and_range():
    text = invoke("--help").output
    assert "--lr FLOAT" in text and "learning rate" in text and "x>0" in text
    assert "--cache / --no-cache" in text and "--knob-backend TEXT" in text
    assert "--extra" not in text


def test_the_dataclass_checks_combinations_and_the_cli_reports_them_as_one_line():
    with pytest.raises(SofttoolError, match="bad option: mode exact needs the cache"):
        build(Knobs, {"mode": "exact", "cache": False})


def test_a_command_can_adjust_a_field_and_pick_fields():
    @click.command()
    @cli_options(Knobs, only=("steps", "mode"), override={"steps": {"default": None, "min": 5}})
    def picked(**values):
        click.echo(repr(values))

    assert cli_fields(Knobs, only=("steps", "mode")) == ["steps", "mode"]
    result = CliRunner().invoke(picked, [])
    assert "{'steps': None, 'mode': 'fast'}" in result.output
    assert CliRunner().invoke(picked, ["--steps", "4"]).exit_code == 2


def test_two_option_sets_may_not_claim_the_same_name():
    with pytest.raises(TypeError, match="already has a parameter"):

        @cli_options(Knobs, only=("steps",))
        @cli_options(Knobs, only=("steps",))
        def twice(**values):
            pass


def test_a_field_without_a_command_line_type_must_say_so():
    @dataclass
    class Odd:
        table: dict = field(default_factory=dict, metadata={"help": "a mapping"})

    with pytest.raises(TypeError, match="Odd.table: no command-line type"):
        cli_options(Odd)(lambda **kw: None)
