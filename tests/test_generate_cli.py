"""`softtool generate` on files: JSONL out (fields, output, tokens), written chunk by chunk; long inputs
refused or cut; the search flags and --threads reach the generator."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from helpers import run_cli, save_tiny_adapter
from softtool.runtime.torch_backend import TorchGenerator


def _adapter(folder, model_dir, template=None, task="translation"):
    return save_tiny_adapter(folder, model_dir, torch.zeros(2, 32), template, task)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    return _adapter(tmp_path_factory.mktemp("adapter") / "de", tiny_model_dir)


@pytest.fixture
def calls(monkeypatch):
    """Records what TorchGenerator.generate is given (and still generates)."""
    seen: list[tuple[list, object]] = []
    original = TorchGenerator.generate

    def generate(self, rows, task_ids, options):
        seen.append((rows, options))
        return original(self, rows, task_ids, options)

    monkeypatch.setattr(TorchGenerator, "generate", generate)
    return seen


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_text_file_in_jsonl_out_one_object_per_input(adapter, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("A dog runs.\n\nTwo cats sleep.\n")
    out = tmp_path / "out.jsonl"
    code, printed, err = run_cli(
        ["generate", adapter, "--input", source, "--output", out, "--max-new-tokens", "3"], capsys
    )
    assert code == 0, err
    assert printed == ""
    rows = _lines(out)
    assert [r["source"] for r in rows] == ["A dog runs.", "Two cats sleep."]
    assert all(isinstance(r["output"], str) and 0 <= r["tokens"] <= 3 for r in rows)
    assert all(len(r["token_ids"]) == r["tokens"] and all(isinstance(t, int) for t in r["token_ids"]) for r in rows)
    # The same inputs as TEXT arguments print the same outputs.
    code, printed, _ = run_cli(["generate", adapter, "--max-new-tokens", "3", "A dog runs.", "Two cats sleep."], capsys)
    assert printed.splitlines() == [r["output"] for r in rows]


def test_jsonl_input_keeps_its_own_keys_and_fills_the_template_from_them(adapter, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 7, "source": "A dog runs."}\n{"source": "A cat.", "note": "x"}\n')
    code, printed, err = run_cli(["generate", adapter, "-i", source, "-o", "-", "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in printed.splitlines()]
    assert [(r.get("id"), r["source"], r.get("note")) for r in rows] == [
        (7, "A dog runs.", None),
        (None, "A cat.", "x"),
    ]
    assert all("output" in r and "tokens" in r for r in rows)


def test_stdin_dash_reads_one_input_per_line(adapter, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("A dog runs.\nEin Hund läuft.\n".encode())))
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli(["generate", adapter, "--input", "-", "--output", out, "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    assert [r["source"] for r in _lines(out)] == ["A dog runs.", "Ein Hund läuft."]


def test_outputs_written_before_a_crash_stay_in_the_file(adapter, tmp_path, monkeypatch):
    source = tmp_path / "in.txt"
    source.write_text("One.\nTwo.\nThree.\n")
    out = tmp_path / "out.jsonl"
    original = TorchGenerator.generate
    done = []

    def crash_on_the_second_chunk(self, rows, task_ids, options):
        if done:
            raise RuntimeError("the machine died")
        done.append(len(rows))
        return original(self, rows, task_ids, options)

    monkeypatch.setattr(TorchGenerator, "generate", crash_on_the_second_chunk)
    with pytest.raises(RuntimeError, match="the machine died"):
        run_cli(["generate", adapter, "-i", source, "-o", out, "--chunk-size", "2", "--max-new-tokens", "2", "-q"])
    assert done == [2]
    assert [r["source"] for r in _lines(out)] == ["One.", "Two."]


def test_rows_are_handed_to_the_generator_in_chunks(adapter, tmp_path, calls, capsys):
    source = tmp_path / "in.txt"
    source.write_text("".join(f"Sentence {i}.\n" for i in range(5)))
    code, _, err = run_cli(
        ["generate", adapter, "-i", source, "-o", tmp_path / "o.jsonl", "--chunk-size", "2", "--max-new-tokens", "1"],
        capsys,
    )
    assert code == 0, err
    assert [len(rows) for rows, _ in calls] == [2, 2, 1]


def test_truncate_cuts_the_tasks_long_field_from_its_end_to_fit(adapter, tmp_path, calls, capsys):
    source = tmp_path / "long.txt"
    source.write_text("Begin " + "word " * 2000 + "end.\n")
    args = [
        "generate",
        adapter,
        "-i",
        source,
        "-o",
        tmp_path / "o.jsonl",
        "--max-length",
        "64",
        "--max-new-tokens",
        "4",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "line 1" in err and "--truncate" in err
    code, _, err = run_cli([*args, "--truncate"], capsys)
    assert code == 0, err
    ((rows, _),) = calls
    assert 2 + sum(len(piece) for piece in rows[0]) <= 64 - 4
    tokenizer = TorchGenerator.from_adapter(adapter).tokenizer
    text = tokenizer.decode(rows[0][0])
    assert text.startswith("English: Begin word") and "end." not in text


def test_truncate_keeps_the_end_of_a_generic_prompts_text(tmp_path, tiny_model_dir, calls, capsys):
    generic = _adapter(tmp_path / "generic", tiny_model_dir, template="[P:2]{text}", task="generic")
    source = tmp_path / "long.txt"
    source.write_text("Begin " + "word " * 2000 + "the end.\n")
    args = ["generate", generic, "-i", source, "--max-length", "32", "--max-new-tokens", "4", "--truncate"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    ((rows, _),) = calls
    assert 2 + sum(len(piece) for piece in rows[0]) <= 32 - 4
    text = TorchGenerator.from_adapter(generic).tokenizer.decode(rows[0][0])
    assert text.endswith("word the end.") and "Begin" not in text


def test_search_flags_reach_the_generator(adapter, calls, capsys):
    args = ["--do-sample", "--temperature", "0.5", "--top-k", "3", "--top-p", "0.9", "--seed", "7"]
    args += ["--repetition-penalty", "1.2", "--no-repeat-ngram-size", "2", "--max-new-tokens", "2"]
    code, _, err = run_cli(["generate", adapter, *args, "A dog."], capsys)
    assert code == 0, err
    ((_, options),) = calls
    assert (options.do_sample, options.temperature, options.top_k, options.top_p, options.seed) == (
        True,
        0.5,
        3,
        0.9,
        7,
    )
    assert (options.repetition_penalty, options.no_repeat_ngram_size, options.max_new_tokens) == (1.2, 2, 2)
    assert options.eos_token_ids  # from the tokenizer


def test_several_sequences_per_input_are_all_written(adapter, tmp_path, capsys):
    flags = ["--num-beams", "2", "--num-return-sequences", "2", "--max-new-tokens", "2"]
    code, printed, err = run_cli(["generate", adapter, "A dog.", *flags], capsys)
    assert code == 0, err
    source, out = tmp_path / "in.txt", tmp_path / "o.jsonl"
    source.write_text("A dog.\n")
    code, _, err = run_cli(["generate", adapter, "-i", source, "-o", out, *flags], capsys)
    assert code == 0, err
    (row,) = _lines(out)
    assert [o["output"] for o in row["outputs"]] == printed.splitlines()
    assert row["outputs"][0]["output"] == row["output"]


def test_threads_are_set_before_the_model_loads(adapter, monkeypatch, capsys):
    import softtool.runtime
    import softtool.threads

    order = []
    load = softtool.runtime.load_generator
    monkeypatch.setattr(softtool.threads, "configure_threads", lambda n: order.append(("threads", n)) or 1)
    monkeypatch.setattr(
        softtool.runtime, "load_generator", lambda *a, **kw: order.append(("load", kw)) or load(*a, **kw)
    )
    code, _, err = run_cli(["generate", adapter, "--threads", "1", "--max-new-tokens", "1", "A dog."], capsys)
    assert code == 0, err
    assert [step for step, _ in order] == ["threads", "load"] and order[0][1] == 1


def test_the_adapters_decoding_defaults_apply_unless_a_flag_sets_them(tmp_path, tiny_model_dir, calls, capsys):
    decoding = {"no_repeat_ngram_size": 3, "repetition_penalty": 1.3}
    folder = save_tiny_adapter(tmp_path / "de", tiny_model_dir, torch.zeros(2, 32), decoding=decoding)
    code, _, err = run_cli(["generate", str(folder), "--max-new-tokens", "2", "A dog."], capsys)
    assert code == 0, err
    code, _, err = run_cli(["generate", str(folder), "--max-new-tokens", "2", "--no-repeat-ngram-size", "0", "A dog."],
                           capsys)  # fmt: skip
    assert code == 0, err
    (_, recorded), (_, overridden) = calls
    assert (recorded.no_repeat_ngram_size, recorded.repetition_penalty) == (3, 1.3)
    assert (overridden.no_repeat_ngram_size, overridden.repetition_penalty) == (0, 1.3)
