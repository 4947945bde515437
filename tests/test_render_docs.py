"""The published numbers are rendered, not typed: every table of results in README.md and docs/*.md is what
benchmarks/render_docs.py makes of benchmarks/results/*.json, and a block that differs fails here (`make docs`
rewrites them). No model is loaded; the renderers read JSON only."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import render_docs  # noqa: E402

sys.path.pop(0)


def test_committed_docs_equal_what_the_results_render(capsys):
    code = render_docs.main(["--check"])
    assert code == 0, "README.md or docs/ differ from benchmarks/results (run `make docs`):\n" + capsys.readouterr().out


def test_render_rewrites_only_the_text_between_markers(tmp_path):
    text = "intro 1.0\n<!-- render:distributed-memory:start -->\nold 9.9\n<!-- render:distributed-memory:end -->\nend\n"
    out = render_docs.render_text(text, render_docs.RESULTS)
    assert out.startswith("intro 1.0\n<!-- render:distributed-memory:start -->\n| layout |")
    assert out.endswith("<!-- render:distributed-memory:end -->\nend\n") and "old 9.9" not in out
    assert "Source: `distributed_memory_7b.json` (" in out and render_docs.render_text(out, render_docs.RESULTS) == out


def test_check_reports_a_stale_block_and_changes_nothing(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    readme = tmp_path / "README.md"
    stale = "<!-- render:distributed-memory:start -->\n| typed | 1.0 |\n<!-- render:distributed-memory:end -->\n"
    readme.write_text(stale)
    assert render_docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert "-| typed | 1.0 |" in capsys.readouterr().out and readme.read_text() == stale
    assert render_docs.main(["--root", str(tmp_path)]) == 0
    assert render_docs.main(["--check", "--root", str(tmp_path)]) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- render:nope:start -->\n<!-- render:nope:end -->\n", "no renderer named 'nope'"),
        ("<!-- render:quality:start -->\n", "has no end marker"),
        ("<!-- render:quality:end -->\n", "without its start"),
        ("<!-- render:quality:start -->\n<!-- render:classify:start -->\n", "starts inside render:quality"),
    ],
)
def test_unknown_names_and_unpaired_markers_are_errors(text, message):
    with pytest.raises((KeyError, ValueError), match=message):
        render_docs.render_text(text, render_docs.RESULTS)


def test_a_dirty_commit_is_said_in_words():
    assert render_docs.commit_words("70272e9-dirty") == "commit 70272e9 plus uncommitted edits"
    assert render_docs.commit_words("70272e9") == "commit 70272e9"
    assert render_docs.commit_words(None) == "commit not recorded"


def classify_result() -> dict:
    """What benchmarks/classify_quality.py writes, cut to the fields the table reads: one set done, one still
    training (no dev scores yet)."""

    def score(acc: float, f1: float) -> dict:
        return {"accuracy": acc, "macro_f1": f1}

    dev = {"majority": {"label": "positive", **score(50.9, 33.7)}, "baseline": score(61.2, 58.0),
           "zero_shot": score(55.0, 50.1), "chat": score(66.4, 65.2), "4-shot": score(70.3, 70.0),
           "8-shot": score(72.5, 72.1), "peft": score(80.1, 80.0), "soft_prompt": score(86.7, 86.6)}  # fmt: skip
    return {
        "commit": "abc1234",
        "machine": {"cpu": "AMD EPYC", "cores": 2},
        "model": "smollm2-135m",
        "budget": {"steps": 300, "shots": [4, 8]},
        "sets": {
            "sst2": {"kept": {"lr": 0.3, "best_step": 150, "select_accuracy": 88.0}, "peft": {"lr": 0.3, "steps": 150},
                     "dev": dev, "onnx": {"examples": 872, "identical_predictions": 872, "all_identical": True}},
            "rte": {"kept": {"lr": 0.1, "best_step": 50, "select_accuracy": 60.0}},
        },
    }  # fmt: skip


def test_classify_table_shows_accuracy_with_macro_f1_and_the_kept_budget(tmp_path):
    (tmp_path / "classify_smollm2-135m.json").write_text(json.dumps(classify_result()))
    out = render_docs.render_block("classify", tmp_path)
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| data set"))
    assert header == ("| data set | majority | instruction | zero-shot | chat template | 4-shot | 8-shot | PEFT "
                      "| soft prompt | kept (selection set) | ONNX = PyTorch |")  # fmt: skip
    sst2 = next(line for line in lines if line.startswith("| sst2"))
    assert sst2 == ("| sst2 | 50.9 (33.7) | 61.2 (58.0) | 55.0 (50.1) | 66.4 (65.2) | 70.3 (70.0) | 72.5 (72.1) "
                    "| 80.1 (80.0) | **86.7 (86.6)** | lr 0.3, step 150 | 872/872 |")  # fmt: skip
    assert next(line for line in lines if line.startswith("| rte")).endswith("| pending | - |")
    assert "`classify_smollm2-135m.json` (AMD EPYC, commit abc1234)" in out


def test_classify_targets_judge_sst2_against_the_best_discrete_prompt_and_the_rest_against_the_majority(tmp_path):
    result = classify_result()
    rte = dict(result["sets"]["sst2"]["dev"])
    rte["soft_prompt"] = {"accuracy": 50.0, "macro_f1": 40.0}  # below the majority's 50.9
    result["sets"]["rte"]["dev"] = rte
    (tmp_path / "classify_smollm2-135m.json").write_text(json.dumps(result))
    lines = render_docs.render_block("classify", tmp_path).splitlines()
    assert "- sst2: soft prompt 86.7 against the best discrete prompt (8-shot 72.5): met" in lines
    assert "- rte: soft prompt 50.0 against the majority class (50.9): **missed**" in lines


def test_classify_table_before_any_run_says_the_runs_are_pending(tmp_path):
    out = render_docs.render_block("classify", tmp_path)
    assert out.startswith("The runs are pending") and "|" not in out


def test_a_study_table_gives_step_time_and_wall_time_apart():
    out = render_docs.render_block("study_method_squad_smollm2-135m", render_docs.RESULTS)
    assert "| steps | optimizer steps | wall time |" in out
    # PEFT's loop records no step time: its row leaves that column empty rather than putting wall time in it.
    peft = next(line for line in out.splitlines() if line.startswith("| PEFT P-tuning"))
    assert "| - | 11.7 min |" in peft


def test_a_study_table_gives_the_commit_each_run_trained_at():
    out = render_docs.render_block("study_spread_squad_smollm2-135m", render_docs.RESULTS)
    result = json.loads((render_docs.RESULTS / "study_spread_squad_smollm2-135m.json").read_text())
    for run in result["runs"]:
        row = next(line for line in out.splitlines() if line.startswith(f"| {run['label']} |"))
        assert row.endswith(f"| {run['train']['commit']} |")


def test_a_serving_row_pairs_the_requests_and_tokens_of_one_run(tmp_path):
    row = {"clients": 16, "requests": 64, "errors": 0, "requests_per_s": 3.46, "tokens_per_s": 135.56,
           "generated_tokens": 2507, "runs_tokens_per_s": [135.56, 136.62], "ttft_s": None, "latency_s": None}  # fmt: skip
    result = json.loads((render_docs.RESULTS / "serve_load.json").read_text())
    result["serve"] = [row]
    (tmp_path / "serve_load.json").write_text(json.dumps(result))
    line = next(
        x
        for x in render_docs.render_block("serve-load", tmp_path).splitlines()
        if x.startswith("| `softtool serve` | 16")
    )
    assert "| 3.46 | 135.6 (other run: 136.6) |" in line
