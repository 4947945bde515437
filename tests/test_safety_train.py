"""Training's output folder: --overwrite removes only what softtool wrote there, a run that fails while
loading leaves nothing behind, and a run.json left by a run that never trained does not block the next."""

from __future__ import annotations

import json

import pytest

from helpers import error_line, run_cli, tree_digest, write_translation_data


@pytest.fixture
def data(tmp_path):
    return write_translation_data(
        tmp_path / "data", ["A man rides a bike.", "Two dogs play."], ["Ein Mann fährt Rad.", "Zwei Hunde spielen."]
    )


def _train(data, model, out, *extra):
    return [
        "train", "--task", "translation", "--data", data, "--model", model, "--max-steps", "2",
        "--num-virtual-tokens", "2", "--batch-size", "2", "--device", "cpu", "--checkpoint-every", "1",
        "--output", out, "--quiet", *extra,
    ]  # fmt: skip


def test_overwrite_removes_only_the_files_softtool_writes(tmp_path, data, tiny_model_dir, capsys):
    out = tmp_path / "run"
    assert run_cli(_train(data, tiny_model_dir, out), capsys).code == 0
    mine = {
        out / "notes.txt": b"my notes",
        out / "checkpoints" / "best-by-hand.safetensors": b"a copy I made",
        out / "checkpoints" / "README": b"keep",
        out / "plots" / "loss-old.png": b"\x89PNG",
    }
    for path, content in mine.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
    litter = [
        out / "checkpoints" / ".last.safetensors.k3j2.tmp",  # a save killed half way
        out / "checkpoints" / ".last.pt.x81a",  # the older writer's temporary name
        out / ".metrics.jsonl.a1b2.tmp",
        out / ".metrics.csv.tmp",
    ]
    for path in litter:
        path.write_bytes(b"")

    assert run_cli(_train(data, tiny_model_dir, out, "--max-steps", "3", "--overwrite"), capsys).code == 0
    assert {path: path.read_bytes() for path in mine} == mine
    assert not any(path.exists() for path in litter)
    assert (out / "run.json").is_file() and (out / "checkpoints" / "last.safetensors").is_file()


def test_overwrite_removes_checkpoints_only_when_nothing_else_is_in_it(tmp_path, data, tiny_model_dir, capsys):
    out = tmp_path / "run"
    assert run_cli(_train(data, tiny_model_dir, out, "--checkpoint-every", "1"), capsys).code == 0
    assert run_cli(_train(data, tiny_model_dir, out, "--overwrite", "--max-steps", "1"), capsys).code == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.safetensors"]


def test_a_run_that_fails_while_loading_leaves_the_folder_as_it_was(tmp_path, data, tiny_model_dir, capsys):
    out = tmp_path / "run"
    result = run_cli(_train(data, tmp_path / "no-such-model", out), capsys)
    assert "no-such-model" in error_line(result.code, result.err)
    assert not out.exists()
    # An existing folder of other files is left exactly as it was too.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_digest(out)
    result = run_cli(_train(data, tmp_path / "no-such-model", out), capsys)
    assert result.code == 2 and tree_digest(out) == before


def test_run_json_alone_does_not_block_the_next_run(tmp_path, data, tiny_model_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"model": "another", "train": {}}))  # a run that never trained
    result = run_cli(_train(data, tiny_model_dir, out), capsys)
    assert result.code == 0, result.err
    assert json.loads((out / "run.json").read_text())["model"] == str(tiny_model_dir)
    # ... but a run that trained does, without --overwrite.
    result = run_cli(_train(data, tiny_model_dir, out), capsys)
    assert "already holds a training run" in error_line(result.code, result.err)
