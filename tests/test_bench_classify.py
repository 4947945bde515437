"""`softtool bench --task classify` on the lively random Llama and a classify prompt trained for 2 steps: every
backend ranks the same examples, the result records speed, accuracy and agreement with the peer, the peer scores
labels as one unpadded forward per (example, label) would, the torch row ranks what `softtool eval` ranks, and
bad configs are one line. No timing is asserted (speed is only measured, in benchmarks/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import error_line, run_cli

REPO = Path(__file__).resolve().parents[1]
# Labels of 1 and 3 tokens (" positive", " so-so"): the peer pads label spans of different lengths.
ROWS = [
    ("a warm and funny film", "positive"),
    ("dull from start to finish", "negative"),
    ("the cast is wonderful", "positive"),
    ("a mess of a script that goes on and on without a point", "so-so"),
    ("one of the best of the year", "positive"),
    ("i wanted my two hours back", "negative"),
    ("great", "so-so"),
]
LABELS = ["negative", "positive", "so-so"]
TEMPLATE = "Review: {sentence}\nSentiment:"
RANK_BACKENDS = ["hf-rank", "torch", "onnx"]
# Nearly every test needs the trained prompt, and most the bench run (20 s on one core): not in make test-fast.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sst-like")
    lines = "".join(json.dumps({"sentence": s, "label": label}) + "\n" for s, label in ROWS)
    (folder / "train.jsonl").write_text(lines)
    (folder / "dev.jsonl").write_text(lines)
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, data, lively_model_dir) -> Path:
    out = tmp_path_factory.mktemp("classify-bench") / "adapter"
    args = ["train", "--task", "classify", "--data", data, "--template", TEMPLATE, "--model", lively_model_dir]
    args += ["--num-virtual-tokens", 4, "--max-steps", 2, "--eval-every", 0, "--lr", 0.3, "--output", out, "-q"]
    assert run_cli(args).code == 0
    return out


@pytest.fixture(scope="module")
def config(adapter, data, lively_model_dir) -> dict:
    """Three examples a batch (three batches, lengths mixed inside each), targets one backend meets and one
    misses whatever the machine, every backend in this process."""
    return {
        "task": "classify",
        "adapter": str(adapter),
        "data": str(data),
        "split": "dev",
        "model": str(lively_model_dir),
        "batch_size": 3,
        "warmup": 1,
        "limits": False,
        "isolate": False,
        "targets": {"torch": 1e-3, "onnx": 1e3},
        "cache_dir": str(adapter.parent / "cache"),
    }


@pytest.fixture(scope="module")
def ranked(config, adapter) -> tuple[Path, dict]:
    path = adapter.parent / "config.json"
    out = adapter.parent / "bench_classify.json"
    path.write_text(json.dumps({**config, "output": str(out)}))
    assert run_cli(["bench", "--config", path]).code == 0
    return out, json.loads(out.read_text())


def test_classify_bench_writes_examples_per_second_speedups_and_agreement_per_backend(ranked):
    path, result = ranked
    assert result["kind"] == "rank" and result["command"].startswith("softtool bench")
    for key in ("cpu_model", "logical_cores", "versions", "git_commit", "threads"):
        assert key in result["machine"]
    workload = result["workload"]
    assert workload["examples"] == len(ROWS) and workload["labels"] == LABELS
    assert workload["scored"] == "label + EOS" and all(ids[-1] == 2 for ids in workload["label_tokens"])
    assert sorted(map(len, workload["label_tokens"])) == [2, 2, 4]
    # The peer runs every example once per label; softtool runs each example's text once (the prefix prompt once for
    # all), then per label the example's last token and the label but its last.
    assert workload["model_tokens"]["hf-rank"] > workload["model_tokens"]["softtool"]
    n, count = workload["num_virtual_tokens"], workload["examples"]
    inputs = round(workload["mean_input_tokens"] * count)  # every row's ids, virtual ones included
    labels = sum(map(len, workload["label_tokens"]))
    assert n > 0 and workload["model_tokens"]["softtool"] == n + inputs - count * (1 + n) + count * labels
    assert [b["name"] for b in result["backends"]] == RANK_BACKENDS
    for b in result["backends"]:
        assert b["status"] == "ok", f"{b['name']} was {b['status']}: {b.get('reason')}"
        assert b["examples_per_s"] > 0 and b["speedup_vs_hf_rank"] > 0 and b["peak_rss_mb"] > 0
        assert np.asarray(b["scores"]).shape == (len(ROWS), len(LABELS))
        assert 0 <= b["metrics"]["accuracy"] <= 100 and b["metric"] == b["metrics"]["accuracy"]
        assert b["agrees_with_peer"] is True and b["max_abs_score_diff_vs_peer"] <= 1e-3
    rows = {b["name"]: b for b in result["backends"]}
    assert rows["hf-rank"]["speedup_vs_hf_rank"] == 1.0 and rows["hf-rank"]["max_abs_score_diff_vs_peer"] == 0
    assert (rows["torch"]["target_met"], rows["onnx"]["target_met"]) == (True, False)
    assert "target_speedup" not in rows["hf-rank"]
    for name in ("torch", "onnx"):  # softtool's timed passes split into the prompts' prefill and the labels' forward
        parts = rows[name]["prefill_s"], rows[name]["score_s"]
        assert min(parts) > 0 and sum(parts) <= rows[name]["timed_s"]
    assert "prefill_s" not in rows["hf-rank"]  # the peer has no such parts: one forward per batch
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_backend_predicts_the_peers_labels_with_the_same_scores(ranked):
    _, result = ranked
    rows = {b["name"]: b for b in result["backends"]}
    for name in ("torch", "onnx"):
        assert rows[name]["predictions"] == rows["hf-rank"]["predictions"], name
        assert rows[name]["same_predictions_as_peer"] == 1.0
        np.testing.assert_allclose(rows[name]["scores"], rows["hf-rank"]["scores"], atol=1e-4)
    # The scores tell the labels apart: a check of agreement between constant scores would mean nothing.
    scores = np.sort(np.asarray(rows["hf-rank"]["scores"]), axis=1)
    assert (scores[:, -1] - scores[:, -2]).min() > 1e-3


def test_make_table_renders_a_classification_row_per_backend(ranked):
    import sys

    path, result = ranked
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import make_table
    finally:
        sys.path.pop(0)
    text = make_table.make_tables([path])
    assert "| classification | examples/batch | backend | examples/s | vs hf-rank |" in text
    assert "| prefill / labels s |" in text
    for b in result["backends"]:
        assert f"| classify x{len(ROWS)} | 3 | {b['name']} |" in text
    assert "1.0x met" not in text and "0.0x met" in text and "1000.0x **missed**" in text


def test_the_peer_scores_each_label_as_one_unpadded_forward_would(config, lively_model_dir, ranked):
    """hf-rank's right-padded batch of (example, label) rows gives each pair what the pair alone gives: the log-probs
    of the label's tokens (EOS included) after the example, the soft prompt merged in."""
    from softtool.adapter import load_adapter
    from softtool.bench.options import BenchOptions
    from softtool.bench.rank import build_rank_workload
    from softtool.models import load_model, load_tokenizer
    from softtool.prompts.embedding import merge_embeddings

    model = load_model(str(lively_model_dir))
    workload = build_rank_workload(BenchOptions(**config), model, load_tokenizer(str(lively_model_dir)))
    table = load_adapter(workload.adapter_dir).prompt_table
    want = np.zeros((len(workload.rows), len(workload.choices)))
    for i, row in enumerate(workload.rows):
        for j, choice in enumerate(workload.choices):
            ids = torch.tensor([row + choice])
            with torch.no_grad():
                logits = model(inputs_embeds=merge_embeddings(model, ids, table, workload.vocab_size)).logits
            logprobs = torch.log_softmax(logits[0].double(), -1)
            want[i, j] = sum(logprobs[len(row) - 1 + k, t].item() for k, t in enumerate(choice))
    peer = next(b for b in ranked[1]["backends"] if b["name"] == "hf-rank")
    np.testing.assert_allclose(peer["scores"], want, atol=1e-4)


def test_the_torch_row_ranks_what_softtool_eval_ranks(adapter, data, ranked):
    from softtool.classify import rank
    from softtool.data import get_task, load_split
    from softtool.runtime import load_generator

    generator = load_generator(adapter, "torch")
    task = get_task("classify", **generator.meta.task_options)
    want = rank(generator, task, load_split(data, "dev", task=task).examples, eos=True, progress=False)
    row = next(b for b in ranked[1]["backends"] if b["name"] == "torch")
    assert row["predictions"] == want.predictions
    np.testing.assert_allclose(row["scores"], want.scores, atol=1e-5)


def test_a_rank_backend_runs_in_a_fresh_process_with_its_own_peak_memory(config, adapter, tmp_path):
    path, out = tmp_path / "config.json", tmp_path / "isolated.json"
    path.write_text(json.dumps({**config, "isolate": True, "backends": ["hf-rank"], "output": str(out)}))
    assert run_cli(["bench", "--config", path]).code == 0
    (row,) = json.loads(out.read_text())["backends"]
    assert row["status"] == "ok" and row["peak_rss_isolated"] is True and row["peak_rss_mb"] > 0


@pytest.fixture(scope="module")
def translation_adapter(tmp_path_factory, tiny_model) -> Path:
    from softtool.bench.options import BenchOptions
    from softtool.bench.workload import make_untrained_adapter

    out = tmp_path_factory.mktemp("translation-adapter")
    options = BenchOptions(inputs=["x"], model="tiny")
    return make_untrained_adapter(options, tiny_model, out, "[P:4]English: {source}\nGerman:")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"adapter": "TRANSLATION"}, "is for task translation; the classify workload ranks the labels of a classify"),
        ({"adapter": None}, "task classify needs `adapter`, a classify prompt"),
        ({"backends": ["torch", "peft"]}, "task classify ranks labels with hf-rank, torch, onnx; ['peft'] generate"),
        ({"task": "translation", "backends": ["hf-rank"]}, "hf-rank ranks labels: it is a backend of task classify"),
        ({"data": None, "inputs": ["a fine film"]}, "task classify reads its examples and gold labels from `data`"),
        ({"targets": {"peft": 2}}, "targets: peft=2; give a positive speedup for any of"),
        ({"split": "test"}, "test"),
    ],
)
def test_a_bad_classify_config_is_one_error_line(config, translation_adapter, tmp_path, capsys, change, says):
    values = {**config, **change}
    if values["adapter"] == "TRANSLATION":
        values["adapter"] = str(translation_adapter)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
    code, _, err = run_cli(["bench", "--config", path, "--output", tmp_path / "out.json"], capsys)
    assert says in error_line(code, err)
    assert not (tmp_path / "out.json").exists()


def test_the_training_comparison_refuses_the_classify_task(config, tmp_path, capsys):
    path = tmp_path / "classify.json"
    path.write_text(json.dumps(config))
    code, _, err = run_cli(["bench", "--config", path, "--train"], capsys)
    assert "the training comparison covers tasks" in error_line(code, err)


def test_the_sst2_config_is_a_valid_classify_workload():
    from softtool.bench.options import BenchOptions, build_options, load_config

    config = load_config(REPO / "benchmarks" / "configs" / "classify_sst2.json")
    options = build_options(BenchOptions, config, "classify_sst2.json")
    assert options.task == "classify" and options.backends == RANK_BACKENDS
    assert options.targets == {"torch": 1.5, "onnx": 3.0} and options.dtype == "float32" and options.threads == 2
