"""`--task text` end to end on the tiny lively model: SQuAD data trained and evaluated as a text task with the squad
task's template, truncated field and multi-reference F1 gives byte-identical predictions and the same scores as
`--task squad`; a prompt/completion JSONL trains with no other flag; the export of a text task evaluates the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli

# End to end (train, export, serve): in the full suite (make test), not in the edit loop (make test-fast).
pytestmark = pytest.mark.e2e

# A SQuAD v1.1 file: two paragraphs, questions with one or several (differently worded) gold answers.
CONTEXTS = [
    (
        "The old mill on the river was built in 1820 by the Hartley family. It ground wheat for the town until a "
        "fire closed it in 1902, and it reopened as a museum in 1975.",
        [
            ("When was the mill built?", ["1820", "in 1820"]),
            ("Who built the mill?", ["the Hartley family", "Hartley family"]),
            ("What closed the mill?", ["a fire"]),
            ("What is the mill now?", ["a museum", "museum"]),
        ],
    ),
    (
        "Marta Rossi won the regional chess title three times. She learned the game from her grandfather in Genoa "
        "and later coached the national junior team.",
        [
            ("How many titles did Marta Rossi win?", ["three", "three times"]),
            ("Where did she learn chess?", ["Genoa", "in Genoa"]),
            ("Whom did she coach?", ["the national junior team"]),
        ],
    ),
]
SQUAD_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"


def write_squad(folder: Path) -> Path:
    paragraphs = [
        {"context": c, "qas": [{"id": f"q{i}-{j}", "question": q, "answers": [{"text": a} for a in answers]}
                               for j, (q, answers) in enumerate(qas)]}
        for i, (c, qas) in enumerate(CONTEXTS)
    ]  # fmt: skip
    doc = {"version": "1.1", "data": [{"title": "Tiny", "paragraphs": paragraphs}]}
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        (folder / f"{split}.json").write_text(json.dumps(doc))
    return folder


def train_and_eval(task_args: list, data: Path, model: Path, out: Path) -> Path:
    # max-length 60 cuts every context, so the truncated field matters
    common = ["--data", data, "--model", model, "--num-virtual-tokens", 4, "--max-steps", 3, "--lr", 0.3]
    assert run_cli(["train", *task_args, *common, "--max-length", 60, "-o", out / "adapter", "-q"]).code == 0
    assert run_cli(["eval", out / "adapter", "--data", data, "--max-length", 90, "-o", out / "eval", "-q"]).code == 0
    return out / "eval"


def test_squad_as_a_text_task_gives_the_squad_tasks_examples_predictions_and_scores(tmp_path, lively_model_dir):
    data = write_squad(tmp_path / "squad")
    squad = train_and_eval(["--task", "squad"], data, lively_model_dir, tmp_path / "squad-run")
    text_args = ["--task", "text", "--target", "answers", "--template", SQUAD_TEMPLATE, "--truncate-field", "context"]
    text_args += ["--metric", "f1", "--max-new-tokens", 32]  # the squad task's generation budget
    text = train_and_eval(text_args, data, lively_model_dir, tmp_path / "text-run")
    assert (text / "predictions.jsonl").read_bytes() == (squad / "predictions.jsonl").read_bytes()
    squad_record, text_record = (json.loads((d / "metrics.json").read_text()) for d in (squad, text))
    assert text_record["metrics"] == squad_record["metrics"]
    assert text_record["truncated"] == squad_record["truncated"] > 0
    rows = [json.loads(line) for line in (text / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["references"] == ["1820", "in 1820"]  # every gold answer, scored as SQuAD scores them
    train_meta = json.loads((tmp_path / "text-run" / "adapter" / "softtool.json").read_text())
    assert train_meta["metrics"]["train_truncated"] > 0


def write_prompt_completion(folder: Path) -> Path:
    pairs = [("The capital of France is", " Paris."), ("Two plus two is", " four."), ("The sky is", " blue."),
             ("Snow is", " white."), ("A week has", " seven days.")]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs)
    (folder / "train.jsonl").write_text(lines)
    (folder / "dev.jsonl").write_text(lines)
    return folder


@pytest.fixture(scope="module")
def completion_adapter(tmp_path_factory, lively_model_dir) -> Path:
    root = tmp_path_factory.mktemp("completion")
    data = write_prompt_completion(root / "data")
    out = root / "adapter"
    args = ["train", "--task", "text", "--data", data, "--model", lively_model_dir, "--max-steps", 2]
    assert run_cli([*args, "--num-virtual-tokens", 4, "-o", out, "-q"]).code == 0
    return out


def test_a_prompt_completion_file_trains_with_no_other_flag(completion_adapter, smollm2_tokenizer):
    meta = json.loads((completion_adapter / "softtool.json").read_text())
    options = meta["task_options"]
    assert meta["template"] == "[P:4]{prompt}" and options["target"] == "completion"
    assert options["metric"] == "exact_match"  # 1.2 words on average: exact match
    longest = max(len(smollm2_tokenizer(" " + t)["input_ids"]) for t in ("Paris.", "four.", "seven days."))
    assert options["max_target_tokens"] == longest + 1  # the generation budget, from the train targets


def test_a_text_tasks_export_evaluates_as_pytorch_does(completion_adapter, tmp_path):
    data = completion_adapter.parent / "data"
    assert run_cli(["export", completion_adapter, "-o", tmp_path / "export"]).code == 0
    for name, folder in (("torch", completion_adapter), ("onnx", tmp_path / "export")):
        assert run_cli(["eval", folder, "--data", data, "-o", tmp_path / name, "-q"]).code == 0
    torch_eval, onnx_eval = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("torch", "onnx"))
    assert (tmp_path / "torch" / "predictions.jsonl").read_text() == (
        tmp_path / "onnx" / "predictions.jsonl"
    ).read_text()
    assert set(torch_eval["metrics"]) >= {"exact_match", "f1", "bleu", "loop_share"}
    assert onnx_eval["metrics"] == torch_eval["metrics"]
