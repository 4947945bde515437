"""Bad input gives one line naming the file or option and what to do (exit status 2), never a traceback."""

from __future__ import annotations

import pytest
import torch

from helpers import error_line, run_cli, save_tiny_adapter, write_translation_data


@pytest.fixture
def data(tmp_path):
    return write_translation_data(
        tmp_path / "data",
        ["A man rides a bike.", "", "Two dogs play.", "   ", "A girl reads a long book."],
        ["Ein Mann fährt Rad.", "Leer.", "Zwei Hunde spielen.", "X.", "Ein Mädchen liest."],
    )


def train_args(data, model_dir, output, *extra):
    return [
        "train",
        "--task",
        "translation",
        "--data",
        data,
        "--model",
        model_dir,
        "--num-virtual-tokens",
        "2",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--output",
        output,
        "--quiet",
        *extra,
    ]


def _adapter(tmp_path, model_dir, hidden=32):
    return save_tiny_adapter(tmp_path / "adapter", model_dir, torch.zeros(2, hidden))


def test_missing_model_path(tmp_path, data, capsys):
    line = error_line(*run_cli(train_args(data, tmp_path / "no-model", tmp_path / "out"), capsys)[::2])
    assert "no-model" in line


def test_unreadable_model_folder(tmp_path, data, capsys):
    (tmp_path / "empty-model").mkdir()
    line = error_line(*run_cli(train_args(data, tmp_path / "empty-model", tmp_path / "out"), capsys)[::2])
    assert "empty-model" in line and "config.json" in line


def test_missing_data_path(tmp_path, tiny_model_dir, capsys):
    line = error_line(*run_cli(train_args(tmp_path / "nowhere", tiny_model_dir, tmp_path / "out"), capsys)[::2])
    assert "nowhere" in line


def test_data_file_with_missing_columns(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "cnn"
    folder.mkdir()
    for split in ("train", "dev"):
        (folder / f"{split}.csv").write_text("id,text\n1,hello\n")
    args = [
        "train",
        "--task",
        "cnndm",
        "--data",
        folder,
        "--model",
        tiny_model_dir,
        "--max-steps",
        "1",
        "--output",
        tmp_path / "out",
        "--quiet",
    ]
    line = error_line(*run_cli(args, capsys)[::2])
    assert "train.csv" in line and "article" in line


def test_empty_rows_are_skipped_and_counted(tmp_path, data, tiny_model_dir, capsys):
    code, _, err = run_cli(train_args(data, tiny_model_dir, tmp_path / "out"), capsys)
    assert code == 0, err
    import json

    metrics = json.loads((tmp_path / "out" / "softtool.json").read_text())["metrics"]
    assert metrics["train_skipped_empty"] == 2 and metrics["train_examples"] == 3


def test_inputs_longer_than_the_context_are_truncated_and_counted(tmp_path, data, tiny_model_dir, capsys):
    code, _, err = run_cli(train_args(data, tiny_model_dir, tmp_path / "out", "--max-length", "20"), capsys)
    assert code == 0, err
    import json

    metrics = json.loads((tmp_path / "out" / "softtool.json").read_text())["metrics"]
    assert metrics["train_truncated"] >= 1


def test_prompt_hidden_size_not_matching_the_model(tmp_path, data, tiny_model_dir, capsys):
    adapter = _adapter(tmp_path, tiny_model_dir, hidden=16)
    line = error_line(*run_cli(["eval", adapter, "--data", data, "--output", tmp_path / "eval"], capsys)[::2])
    assert "hidden size 16" in line and "32" in line


def test_corrupt_adapter_file(tmp_path, data, tiny_model_dir, capsys):
    adapter = _adapter(tmp_path, tiny_model_dir)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    line = error_line(*run_cli(["generate", adapter, "A dog."], capsys)[::2])
    assert "adapter_model.safetensors" in line and "corrupt" in line


def test_nonfinite_loss(tmp_path, data, tiny_model_dir, capsys):
    args = train_args(
        data,
        tiny_model_dir,
        tmp_path / "out",
        "--lr",
        "1e6",
        "--dtype",
        "float16",
        "--max-steps",
        "5",
        "--max-grad-norm",
        "0",
        "--warmup-steps",
        "0",
    )
    line = error_line(*run_cli(args, capsys)[::2])
    assert "loss became nan" in line and "checkpoint" in line


def test_output_folder_holding_a_different_run(tmp_path, data, tiny_model_dir, capsys):
    assert run_cli(train_args(data, tiny_model_dir, tmp_path / "out"), capsys)[0] == 0
    line = error_line(*run_cli(train_args(data, tiny_model_dir, tmp_path / "out", "--lr", "0.1"), capsys)[::2])
    assert "already holds a training run" in line and "--overwrite" in line
    assert run_cli(train_args(data, tiny_model_dir, tmp_path / "out", "--overwrite"), capsys)[0] == 0


def test_bad_option_combination(tmp_path, data, tiny_model_dir, capsys):
    args = train_args(data, tiny_model_dir, tmp_path / "out", "--init", "text", "--init-text", "  ")
    line = error_line(*run_cli(args, capsys)[::2])
    assert "init_text is empty" in line
