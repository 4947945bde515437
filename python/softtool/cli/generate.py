"""`softtool generate`: run a trained prompt on texts from the command line, a file or stdin.

Inputs are read and encoded a chunk at a time, handed to `generator.generate`, and their outputs printed or
appended to --output (JSONL, flushed after every chunk, so a crash loses at most the chunk in flight).
Search flags are the fields of softtool.search.SearchOptions; --max-length and --backend are EvalOptions'.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from itertools import islice
from pathlib import Path

import click

from softtool.cli.common import (
    BACKEND_OVERRIDE,
    SAMPLING_FIELDS,
    adapter_options,
    configure_threads,
    device_option,
    resolve_backend,
    search_options,
    threads_option,
    unescape_template,
)
from softtool.cli.inputs import Inputs, Record
from softtool.errors import SofttoolError
from softtool.evaluate import EvalOptions
from softtool.options import cli_options, click_type, given_on_command_line

SEARCH_FIELDS = ("num_beams", "max_new_tokens", "num_return_sequences", *SAMPLING_FIELDS)
CLASSIFY_BY = ("rank", "constrained", "free")


@click.command(name="generate", context_settings={"show_default": True})
@click.argument("path", type=click.Path())
@click.argument("texts", nargs=-1)
@click.option(
    "--input",
    "-i",
    "input_path",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
    default=None,
    help="inputs: a .jsonl file (one object of template fields per line), any other file one text per line; "
    "- for stdin (text lines)",
)
@click.option(
    "--output",
    "-o",
    "output_path",
    type=click.Path(dir_okay=False, allow_dash=True),
    default=None,
    help="write JSONL here (per input: its fields, 'output', 'tokens' (the count) and 'token_ids'), chunk by chunk; "
    "- for stdout",
)
@cli_options(EvalOptions, only=("backend", "max_length"), override=BACKEND_OVERRIDE)
@click.option("--truncate", is_flag=True, help="cut inputs longer than --max-length allows instead of refusing them")
@search_options(SEARCH_FIELDS, override={"max_new_tokens": {"min": 1}})
@click.option("--field", "fields", multiple=True, help="NAME=VALUE for a template field (repeatable)")
@adapter_options("[P:20]{input}")
@device_option
@click.option(
    "--chunk-size",
    type=click_type(int, {"min": 1}),
    default=256,
    help="inputs handed to the generator at once (and written together)",
)
@threads_option
@click.option("--raw", is_flag=True, help="print the decoded output as is (no task post-processing)")
@click.option(
    "--choice",
    "choice_texts",
    multiple=True,
    help="constrain the output to one of these texts (repeatable; a trie in the C++ search): what follows the input, "
    "after the space a task puts before its output",
)
@click.option(
    "--classify-by",
    type=click.Choice(CLASSIFY_BY),
    default="rank",
    help="a classify task: rank every label (as eval does), generate within the labels (constrained), or "
    "generate freely (free)",
)
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@click.pass_context
def generate(
    ctx,
    path,
    texts,
    input_path,
    output_path,
    backend,
    max_length,
    truncate,
    fields,
    template,
    model_name,
    device,
    chunk_size,
    threads,
    raw,
    choice_texts,
    classify_by,
    quiet,
    **search,
) -> None:
    """Generate with the soft prompt in PATH for each TEXT (or each line of --input, or of stdin).

    TEXT fills the template's single field; for templates with several fields (squad) pass the
    others with --field, e.g. --field context="..." "Who built it?" fills {question}, or give a .jsonl
    --input whose objects name every field.

    \b
    Example:
      softtool generate runs/de "A man rides a bicycle down the street."
      softtool generate runs/de --input sentences.txt --output outputs.jsonl --num-beams 4
      softtool generate runs/sst2 "a gripping film"                        # a classify task: its best label
      softtool generate runs/qa --choice yes --choice no "Is the sky blue?"  # only "yes" or "no"
    """
    template = unescape_template(template)
    folder, backend = resolve_backend(path, backend)
    fixed = _fixed_fields(fields)
    if texts and input_path is not None:
        raise SofttoolError("give TEXT arguments or --input, not both")
    try:  # the search flags' combination, before anything loads (EOS and padding come with the tokenizer)
        from softtool.search import SearchOptions

        SearchOptions(**search)
    except ValueError as exc:
        raise SofttoolError(f"bad option: {exc}") from exc
    budget = max_length - search["max_new_tokens"]
    if budget < 1:
        raise SofttoolError(
            f"--max-length {max_length} leaves no room for the input after --max-new-tokens "
            f"{search['max_new_tokens']}; raise --max-length"
        )
    if output_path not in (None, "-") and input_path not in (None, "-") and _same_file(input_path, output_path):
        raise SofttoolError(f"--output {output_path} is the --input file; write the outputs elsewhere")
    if not texts and input_path is None and sys.stdin.isatty():
        raise SofttoolError("no input: pass TEXT arguments, --input FILE, or lines on stdin")
    if output_path not in (None, "-") and Path(output_path).parent.is_file():
        raise SofttoolError(f"--output {output_path}: {Path(output_path).parent} is a file, not a folder")

    configure_threads(threads)
    from softtool.evaluate import search_options as decoding_options
    from softtool.runtime import load_generator

    if backend == "torch":
        kw = {k: v for k, v in {"template": template, "model_name": model_name, "device": device}.items() if v}
    else:
        kw = {"threads": threads}
    generator = load_generator(folder, backend, **kw)
    inputs = Inputs(texts, input_path, generator.template.fields, fixed)
    encoder = _Encoder(generator, budget, max_length, search["max_new_tokens"], truncate, raw, inputs.name)
    total = None
    if inputs.rereadable:  # check every input before generating for any (reading twice costs only tokenizing)
        total = sum(1 for record in inputs if encoder.encode(record) is not None)
    # The task's decoding defaults (recorded at training) apply unless a flag sets the same field.
    given = given_on_command_line(ctx, search)
    defaults = {k: v for k, v in generator.decoding(0).items() if k not in given}
    options = replace(
        decoding_options(generator.tokenizer, search["num_beams"], search["max_new_tokens"]), **{**search, **defaults}
    )
    classify = encoder.task is not None and encoder.task.name == "classify"
    if choice_texts or (classify and classify_by == "constrained"):
        options = _constrained(options, generator, encoder.task, choice_texts)
    encoder.rank = classify and classify_by == "rank" and not choice_texts
    done = _run(generator, encoder, inputs, options, chunk_size, output_path, total, quiet)
    if done == 0 and not texts and input_path is None:
        raise SofttoolError("no input: pass TEXT arguments, --input FILE, or lines on stdin")


def _constrained(options, generator, task, texts: tuple[str, ...]):
    """`options` whose output must be one of `texts` (or the classify task's labels): their token ids, after the
    separator the task puts before its output, as a trie in the C++ search."""
    if not texts:
        texts = tuple(task.verbalize(label) for label in task.labels)
    sep = getattr(task, "separator", " ")
    tokenize = generator.tokenizer
    choices = [tokenize(t if t[:1].isspace() else sep + t, add_special_tokens=False)["input_ids"] for t in texts]
    try:
        return replace(options, choices=choices)
    except ValueError as exc:
        raise SofttoolError(f"--choice: {exc}") from exc


def _fixed_fields(items: tuple[str, ...]) -> dict[str, str]:
    fixed = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SofttoolError(f"--field {item!r}: write NAME=VALUE")
        fixed[name] = value
    return fixed


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or Path(a).samefile(b)
    except OSError:
        return False


class _Encoder:
    """Token ids of one input within the length budget: refused when too long, or cut with --truncate."""

    def __init__(self, generator, budget: int, max_length: int, max_new: int, truncate: bool, raw: bool, name: str):
        from softtool.data import get_task

        self.generator, self.budget, self.truncate, self.name = generator, budget, truncate, name
        self.limits = f"--max-length {max_length} less --max-new-tokens {max_new}"
        meta = generator.meta
        self.task = None
        if meta is not None and meta.task != "generic":
            self.task = get_task(meta.task, **meta.task_options)
        self.postprocess = self.task.postprocess if self.task and not raw else str.strip
        self.rank = False  # a classify task answered by ranking its labels

    def encode(self, record: Record) -> list[list[int]]:
        template = self.generator.template
        pieces = self.generator.encode(record.fields)
        length = template.num_virtual_tokens + sum(len(p) for p in pieces)
        if length <= self.budget:
            return pieces
        where = f"{self.name}: line {record.line}"
        if not self.truncate:
            raise SofttoolError(
                f"{where}: the input takes {length} tokens (virtual tokens included), over the {self.budget} that "
                f"{self.limits} leaves; pass --truncate to cut it, or raise --max-length"
            )
        from softtool.data.encode import shorten_field

        if self.task is not None and self.task.truncate_field in template.fields:
            name, keep = self.task.truncate_field, "start"  # as eval and training cut it
        else:  # no task: cut the longest field from the left, so the text to continue keeps its end
            name = max(template.fields, key=lambda f: len(record.fields[f]))
            keep = "end"
        budget = self.budget - template.num_virtual_tokens
        pieces = shorten_field(
            self.generator.tokenizer, template, record.fields, name, budget, length - self.budget, keep=keep
        )
        if pieces is None:
            raise SofttoolError(f"{where}: the input does not fit {self.limits} even with an empty {{{name}}}")
        return pieces


def _run(generator, encoder: _Encoder, inputs: Inputs, options, chunk_size, output_path, total, quiet) -> int:
    """Generate chunk by chunk, printing or writing each chunk's outputs as it is done; returns the inputs done."""
    from tqdm import tqdm

    to_file = output_path not in (None, "-")
    sink = _open_output(output_path) if to_file else None
    done = 0
    bar = tqdm(total=total, unit="input", desc="generating", disable=quiet or not to_file, file=sys.stderr)
    records = iter(inputs)
    try:
        while chunk := list(islice(records, chunk_size)):
            rows = [encoder.encode(record) for record in chunk]
            if encoder.rank:  # the label ranked first, as eval predicts it
                _write_labels(generator, encoder.task, chunk, rows, output_path, sink)
                bar.update(len(chunk))
                done += len(chunk)
                continue
            try:
                outputs = generator.generate(rows, None, options)
            except RuntimeError as exc:  # the sparse search meets a constrained row with no allowed candidate
                if not options.choices:
                    raise
                raise SofttoolError(
                    f"--choice / --classify-by constrained: {exc}; use --classify-by rank, which scores every label"
                ) from exc
            for record, hyps in zip(chunk, outputs, strict=True):
                texts = [encoder.postprocess(generator.tokenizer.decode(h, skip_special_tokens=True)) for h in hyps]
                if output_path is None:
                    for text in texts:
                        click.echo(text)
                    continue
                line = {**record.echo, "output": texts[0], "tokens": len(hyps[0]), "token_ids": list(hyps[0])}
                if len(hyps) > 1:
                    line["outputs"] = [
                        {"output": t, "tokens": len(h), "token_ids": list(h)} for t, h in zip(texts, hyps, strict=True)
                    ]
                (sink or sys.stdout).write(json.dumps(line, ensure_ascii=False) + "\n")
            (sink or sys.stdout).flush()
            bar.update(len(chunk))
            done += len(chunk)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    return done


def _write_labels(generator, task, chunk: list[Record], rows, output_path, sink) -> None:
    """A classify task's answer: every label scored after each input (rank classification), the best printed, or
    written with all the labels' scores."""
    from softtool.classify import rank_rows

    scores, labels = rank_rows(generator, task, generator.row_ids(rows, [0] * len(rows)), [0] * len(rows), eos=True)
    for record, label, row in zip(chunk, labels, scores, strict=True):
        text = task.verbalize(label)
        if output_path is None:
            click.echo(text)
            continue
        line = {**record.echo, "output": text, "label": label,
                "label_scores": {name: round(float(v), 6) for name, v in zip(task.labels, row, strict=True)}}  # fmt: skip
        (sink or sys.stdout).write(json.dumps(line, ensure_ascii=False) + "\n")
    (sink or sys.stdout).flush()


def _open_output(path: str):
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding="utf-8")  # noqa: SIM115  (closed by _run)
    except OSError as exc:
        raise SofttoolError(f"--output {path}: cannot write it ({exc.strerror})") from exc
