"""benchmarks/classify_quality.py runs end to end on a tiny model and a CB-shaped folder: it writes the results JSON
with the selection on train data, PEFT's row, every dev prompt and the ONNX check, and a second run reuses it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

# It trains and exports (5 s on one core): classification end to end, in make test, not in make test-fast.
pytestmark = pytest.mark.e2e

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script():
    spec = importlib.util.spec_from_file_location("classify_quality", BENCHMARKS / "classify_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_cb(folder: Path) -> Path:
    labels = ["entailment", "contradiction", "neutral"]
    rows = [{"premise": f"The man said it was day {i}.", "hypothesis": f"It was day {i % 4}.", "label": labels[i % 3]}
            for i in range(30)]  # fmt: skip
    (folder / "cb").mkdir(parents=True)
    for split, part in (("train", rows[:24]), ("dev", rows[24:])):
        (folder / "cb" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


def test_the_script_selects_on_train_and_scores_every_prompt_once_on_dev(tmp_path, lively_model_dir):
    script = load_script()
    data = write_cb(tmp_path / "data")
    args = ["--model", str(lively_model_dir), "--sets", "cb", "--data", str(data), "--steps", "4", "--eval-every", "2",
            "--select-max", "6", "--select-share", "0.25", "--shots", "2", "--runs", str(tmp_path / "runs"),
            "--output", str(tmp_path / "results"), "--quiet"]  # fmt: skip
    assert script.main(args) == 0
    result = json.loads((tmp_path / "results" / f"classify_{lively_model_dir.name}.json").read_text())
    cb = result["sets"]["cb"]
    assert cb["slices"] == {"train_rows": 24, "fit_rows": 18, "select_rows": 6, "seed": 0}
    assert [run["lr"] for run in cb["soft_prompt_runs"]] == [0.03, 0.3]
    best = max(cb["soft_prompt_runs"], key=lambda r: r["select_accuracy"])
    assert cb["kept"]["lr"] == best["lr"] and cb["peft"]["steps"] == max(1, cb["kept"]["best_step"])
    assert set(cb["dev"]) >= {"soft_prompt", "peft", "majority", "baseline", "zero_shot", "2-shot"}
    assert cb["onnx"]["all_identical"] and cb["onnx"]["examples"] == 6
    assert result["versions"]["torch"] and result["commit"]
    selection = (tmp_path / "runs" / lively_model_dir.name / "cb" / "data" / "select.jsonl").read_text()
    dev = (data / "cb" / "dev.jsonl").read_text()
    assert not set(selection.splitlines()) & set(dev.splitlines())  # nothing of dev is chosen on
    before = (tmp_path / "runs" / lively_model_dir.name / "cb" / "dev_scores.json").stat().st_mtime_ns
    assert script.main([*args, "--resume-json"]) == 0  # every stage reused
    assert (tmp_path / "runs" / lively_model_dir.name / "cb" / "dev_scores.json").stat().st_mtime_ns == before
