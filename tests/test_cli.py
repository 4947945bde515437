"""The train/eval/generate commands end to end on the tiny model, and their --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import run_cli, write_translation_data


@pytest.mark.parametrize("command", ["train", "eval", "generate", "export", "bench"])
def test_help_works_for_each_command(command, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    assert f"Usage: softtool {command}" in out
    assert "Example" in out


def test_python_dash_m_softtool_runs_the_same_cli():
    out = subprocess.run(
        [sys.executable, "-m", "softtool", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--num-virtual-tokens" in out and "--no-prefix-cache" in out


@pytest.fixture
def data(tmp_path):
    return write_translation_data(tmp_path / "data", splits=("train", "val"))


def test_train_eval_generate_from_the_command_line(tmp_path, data, tiny_model_dir, capsys):
    adapter = tmp_path / "adapter"
    code, _, err = run_cli(
        [
            "train",
            "--task",
            "translation",
            "--data",
            str(data),
            "--model",
            str(tiny_model_dir),
            "--method",
            "ptuning",
            "--encoder",
            "mlp",
            "--num-virtual-tokens",
            "3",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--eval-every",
            "1",
            "--device",
            "cpu",
            "--output",
            str(adapter),
        ],
        capsys,
    )
    assert code == 0, err
    assert "training summary" in err
    meta = json.loads((adapter / "softtool.json").read_text())
    assert meta["method"] == "ptuning" and meta["train_options"]["steps_done"] == 2

    code, out, err = run_cli(
        [
            "eval",
            str(adapter),
            "--data",
            str(data),
            "--limit",
            "2",
            "--max-new-tokens",
            "3",
            "--baseline",
            "--output",
            str(tmp_path / "eval"),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert "soft-prompt" in out and "baseline" in out and "zero-shot" in out
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 2

    code, out, err = run_cli(["generate", str(adapter), "--max-new-tokens", "3", "A dog.", "A cat."], capsys)
    assert code == 0, err
    assert len(out.splitlines()) == 2


def test_template_option_turns_a_typed_backslash_n_into_a_newline():
    from softtool.cli.common import unescape_template

    assert unescape_template(r"[P:4]English: {source}\nGerman:") == "[P:4]English: {source}\nGerman:"
    assert unescape_template(None) is None


def test_eval_passes_sampling_flags_and_threads_on(tmp_path, monkeypatch, capsys):
    import softtool.evaluate
    import softtool.threads

    seen = {}

    def fake_run_eval(folder, data, output, options, **kw):
        seen["options"] = options
        record = {"task": "translation", "split": "dev", "n": 1, "metrics": {"bleu": 1.0}, "tokens_per_s": 1.0}
        return {"soft_prompt": record}

    monkeypatch.setattr(softtool.evaluate, "run_eval", fake_run_eval)
    monkeypatch.setattr(softtool.threads, "configure_threads", lambda n: seen.setdefault("threads", n))
    (tmp_path / "adapter").mkdir()
    args = ["eval", tmp_path / "adapter", "--data", tmp_path, "--output", tmp_path / "eval", "--threads", "1"]
    code, _, err = run_cli([*args, "--do-sample", "--temperature", "0.5", "--batch-size", "2"], capsys)
    assert code == 0, err
    options = seen["options"]
    assert options.search == {"do_sample": True, "temperature": 0.5} and options.batch_size == 2
    assert seen["threads"] == 1
