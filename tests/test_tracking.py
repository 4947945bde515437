"""`softtool train --report-to tensorboard`: the event files, read back with TensorBoard's own reader, hold what
metrics.jsonl holds (every number of every row at its step, once, also across --resume); `none` writes none;
a missing tensorboard package is one line before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import error_line, run_cli, write_translation_data
from softtool.training.tracking import TENSORBOARD_DIR, TensorBoardTracker, scalars


def _events(logdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar TensorBoard shows for `logdir`: tag -> {step: value}, one value per step (a repeat fails)."""
    reader = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    reader.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in reader.Tags()["scalars"]:
        events = reader.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag} repeats steps: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def _jsonl(output: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as the same mapping (the tags are `<kind>/<key>`)."""
    out: dict[str, dict[int, float]] = {}
    for line in (output / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for tag, value in scalars(row).items():
            assert row["step"] not in out.setdefault(tag, {}), f"{tag} twice at step {row['step']}"
            out[tag][row["step"]] = value
    return out


def _assert_same(events: dict, jsonl: dict) -> None:
    assert sorted(events) == sorted(jsonl)
    for tag, by_step in jsonl.items():
        assert sorted(events[tag]) == sorted(by_step), tag
        for step, value in by_step.items():  # TensorBoard stores float32
            assert events[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)


@pytest.fixture
def data(tmp_path):
    return write_translation_data(tmp_path / "data")


def _train(data, model_dir, output, steps, *extra):
    return [
        "train", "--task", "translation", "--data", data, "--model", model_dir, "--max-steps", steps,
        "--num-virtual-tokens", "2", "--batch-size", "2", "--device", "cpu", "--eval-every", "2",
        "--checkpoint-every", "2", "--output", output, "--quiet", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_tensorboard_event_files_hold_every_metrics_jsonl_number_at_its_step(tmp_path, data, tiny_model_dir, capsys):
    out = tmp_path / "run"
    result = run_cli([*_train(data, tiny_model_dir, out, 4), "--report-to", "tensorboard", "--eval-generate"], capsys)
    assert result.code == 0, result.err
    jsonl = _jsonl(out)
    # What the issue asks for is there: loss, learning rate, tokens/s, dev loss and the task's generated metrics.
    for tag in ("train/loss", "train/lr", "train/tokens_per_s", "eval/dev_loss", "eval/bleu", "eval/chrf"):
        assert tag in jsonl, sorted(jsonl)
    assert sorted(jsonl["train/loss"]) == [1, 2, 3, 4] and sorted(jsonl["eval/dev_loss"]) == [0, 2, 4]
    _assert_same(_events(out / TENSORBOARD_DIR), jsonl)


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_curves_without_repeating_a_step(tmp_path, data, tiny_model_dir, capsys):
    out = tmp_path / "run"
    assert run_cli([*_train(data, tiny_model_dir, out, 2), "--report-to", "tensorboard"], capsys).code == 0
    assert run_cli([*_train(data, tiny_model_dir, out, 4), "--report-to", "tensorboard", "--resume"], capsys).code == 0
    assert len(list((out / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2  # one per process
    jsonl = _jsonl(out)
    assert sorted(jsonl["train/loss"]) == [1, 2, 3, 4]
    _assert_same(_events(out / TENSORBOARD_DIR), jsonl)
    # A new run (--overwrite) starts from empty curves: the earlier run's event files go.
    assert (
        run_cli([*_train(data, tiny_model_dir, out, 2), "--report-to", "tensorboard", "--overwrite"], capsys).code == 0
    )
    assert len(list((out / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1
    _assert_same(_events(out / TENSORBOARD_DIR), _jsonl(out))


def test_what_a_stopped_run_logged_after_its_checkpoint_is_replaced_on_resume(tmp_path):
    # The run logged steps 1..5, but its checkpoint is at step 3: the resumed run logs 4 and 5 again.
    first = TensorBoardTracker(tmp_path)
    for step in range(1, 6):
        first.log({"kind": "train", "step": step, "loss": float(step)})
    first.close()
    resumed = TensorBoardTracker(tmp_path, start_step=3)
    for step in (4, 5):
        resumed.log({"kind": "train", "step": step, "loss": 10.0 * step})
    resumed.close()
    assert _events(tmp_path / TENSORBOARD_DIR) == {"train/loss": {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0}}


def test_report_to_none_is_the_default_and_writes_no_event_files(tmp_path, data, tiny_model_dir, capsys):
    out = tmp_path / "run"
    assert run_cli(_train(data, tiny_model_dir, out, 2), capsys).code == 0
    assert (out / "metrics.jsonl").is_file() and not (out / TENSORBOARD_DIR).exists()
    assert json.loads((out / "softtool.json").read_text())["train_options"]["report_to"] == "none"


def test_report_to_tensorboard_without_the_package_is_one_line_before_any_work(
    tmp_path, data, tiny_model_dir, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` meets when it is absent
    out = tmp_path / "run"
    result = run_cli([*_train(data, tiny_model_dir, out, 2), "--report-to", "tensorboard"], capsys)
    line = error_line(result.code, result.err)
    assert "--report-to tensorboard needs the tensorboard package" in line and "softtool[tracking]" in line
    assert not out.exists()


def test_report_to_names_its_choices(tmp_path, data, tiny_model_dir, capsys):
    result = run_cli([*_train(data, tiny_model_dir, tmp_path / "run", 2), "--report-to", "mlflow"], capsys)
    assert result.code == 2 and "'none', 'tensorboard'" in result.err.replace('"', "'")
