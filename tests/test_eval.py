"""Evaluation writes predictions.jsonl and metrics.json whose scores are the task's metric of the
written predictions, keeps file order, and evaluates the discrete baselines when asked."""

from __future__ import annotations

import json

import torch

from helpers import save_tiny_adapter, write_translation_data
from softtool.data import get_task
from softtool.evaluate import EvalOptions, run_eval

SOURCES = ["A man rides a bike.", "Two dogs play in the snow near a tree.", "A girl.", "The cat sleeps on a warm bed."]
TARGETS = ["Ein Mann fährt Rad.", "Zwei Hunde spielen im Schnee.", "Ein Mädchen.", "Die Katze schläft."]


def _eval(tmp_path, model_dir, **options):
    """Evaluate a random translation prompt for the tiny model on SOURCES/TARGETS into tmp_path/eval."""
    torch.manual_seed(0)
    adapter = save_tiny_adapter(tmp_path / "adapter", model_dir, torch.randn(3, 32) * 0.1)
    data = write_translation_data(tmp_path / "data", SOURCES, TARGETS, splits=("val",))
    return run_eval(adapter, data, tmp_path / "eval", EvalOptions(**options), progress=False)


def test_eval_writes_predictions_and_the_metrics_of_those_predictions(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    results = _eval(tmp_path, tiny_model_dir, limit=3, batch_size=2, max_new_tokens=5)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == SOURCES[:3]  # file order, although batches were sorted by length
    assert [r["references"] for r in rows] == [[t] for t in TARGETS[:3]]
    metrics = json.loads((out / "metrics.json").read_text())
    task = get_task("translation", src="en", tgt="de")
    expected = task.score([r["prediction"] for r in rows], [r["references"] for r in rows])
    assert metrics["metrics"] == json.loads(json.dumps(expected))
    assert metrics["n"] == 3 and metrics["task"] == "translation" and metrics["split"] == "val"
    assert metrics["backend"] == "torch" and metrics["truncated"] == 0
    assert all(r["sentence_bleu"] == task.sentence_score(r["prediction"], r["references"]) for r in rows)
    assert results["soft_prompt"]["metrics"] == metrics["metrics"]


def test_eval_with_baseline_scores_the_instruction_and_zero_shot_prompts(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    results = _eval(tmp_path, tiny_model_dir, limit=2, max_new_tokens=3, baseline=True)
    assert set(results) == {"soft_prompt", "baseline", "zero_shot"}
    baseline = json.loads((out / "baseline" / "metrics.json").read_text())
    zero = json.loads((out / "zero_shot" / "metrics.json").read_text())
    assert baseline["template"].startswith("Translate the English sentence into German.")
    assert zero["template"] == "English: {source}\nGerman:"
    assert (out / "baseline" / "predictions.jsonl").read_text().count("\n") == 2


def test_inputs_longer_than_the_budget_are_truncated_and_counted(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    _eval(tmp_path, tiny_model_dir, max_new_tokens=4, max_length=20)
    metrics = json.loads((out / "metrics.json").read_text())
    # 20 tokens minus 4 to generate, 3 virtual and the template's own words leave ~8 for the source.
    assert metrics["truncated"] == 2
