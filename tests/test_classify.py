"""`--task classify` end to end on the tiny lively model: rank classification equal to one full forward per label
(torch, the traced export, a top-k export), the slot cache left as it was, train -> eval (report, confusion matrix,
baselines) -> export -> eval of the export (the same predictions) -> generate -> serve, PEFT loading the adapter
and scoring the labels the same, the chat template, and bad input refused before anything is written."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import Server, error_line, run_cli

# End to end (train, export, serve): in the full suite (make test), not in the edit loop (make test-fast).
pytestmark = pytest.mark.e2e

# Four labels; " may" is SmolLM2's first token of " mayhem" too (a label whose tokens start another's).
ROWS = [
    ("the match ended two to one", "yes"),
    ("rain all day in the hills", "no"),
    ("a new drug for the flu", "may"),
    ("the striker scored twice", "yes"),
    ("snow on the roads tonight", "no"),
    ("markets fell in the morning", "mayhem"),
    ("the keeper saved a penalty", "yes"),
    ("sunny with a light breeze", "no"),
    ("a comet passed close by", "may"),
    ("prices rose again", "mayhem"),
]
TEMPLATE = "Text: {sentence}\nAnswer:"


def write_data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"sentence": s, "label": label}) + "\n" for s, label in ROWS)
    (folder / "train.jsonl").write_text(lines)
    (folder / "dev.jsonl").write_text(lines)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("classify-data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data, lively_model_dir) -> Path:
    out = tmp_path_factory.mktemp("classify-run") / "adapter"
    args = ["train", "--task", "classify", "--data", data, "--template", TEMPLATE, "--model", lively_model_dir]
    args += ["--num-virtual-tokens", 4, "--max-steps", 6, "--eval-every", 3, "--eval-generate", "--lr", 0.3]
    code, _, _ = run_cli([*args, "--output", out, "--quiet"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def evaluated(trained, data) -> Path:
    out = trained.parent / "eval"
    code, _, _ = run_cli(["eval", trained, "--data", data, "--baseline", "--shots", 3, "--output", out, "-q"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def exported(trained) -> Path:
    out = trained.parent / "export"
    code, _, _ = run_cli(["export", trained, "-o", out])
    assert code == 0
    return out


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- rank scoring --------------------------------------------------------------------------------------------
def full_forward_scores(model, generator, rows, choices) -> np.ndarray:
    """The peer: one forward over prompt + label per (row, label), summing the label tokens' log-probs."""
    from softtool.prompts.embedding import merge_embeddings

    out = np.zeros((len(rows), len(choices)))
    table = generator.table if generator.table is not None else torch.zeros(1, model.config.hidden_size)
    for i, row in enumerate(rows):
        for j, choice in enumerate(choices):
            ids = torch.tensor([row + choice])
            with torch.no_grad():
                logits = model(inputs_embeds=merge_embeddings(model, ids, table, generator.vocab_size)).logits
            logprobs = torch.log_softmax(logits[0].double(), -1)
            out[i, j] = sum(logprobs[len(row) - 1 + k, t].item() for k, t in enumerate(choice))
    return out


@pytest.mark.parametrize("template", ["[P:5]Text: {s}\nAnswer:", "Text: {s}[P:3]\nAnswer:", "Text: {s}\nAnswer:"])
def test_ranking_scores_each_label_as_a_full_forward_would(tiny_model, smollm2_tokenizer, template):
    from softtool.prompts.template import Template
    from softtool.runtime.choices import score_choices
    from softtool.runtime.torch_backend import TorchGenerator

    tmpl = Template.parse(template)
    torch.manual_seed(0)
    table = torch.randn(tmpl.num_virtual_tokens, tiny_model.config.hidden_size) if tmpl.num_virtual_tokens else None
    generator = TorchGenerator(tiny_model, smollm2_tokenizer, tmpl, table)
    texts = ["a long sentence about the weather in the hills", "hi", "the match"]
    rows = generator.row_ids([generator.encode({"s": t}) for t in texts], [0] * 3)
    choices = [smollm2_tokenizer(f" {w}")["input_ids"] + [2] for w in ("yes", "no", "mayhem")]
    got = score_choices(generator, rows, [0] * 3, choices, max_rows=4)  # 4 rows a call: one example at a time
    np.testing.assert_allclose(got, full_forward_scores(tiny_model, generator, rows, choices), atol=2e-5)


def test_a_prompt_of_one_text_token_after_the_virtual_tokens_is_ranked_too(tiny_model, smollm2_tokenizer):
    from softtool.prompts.template import Template
    from softtool.runtime.choices import score_choices
    from softtool.runtime.torch_backend import TorchGenerator

    tmpl = Template.parse("[P:4]{s}")
    torch.manual_seed(1)
    generator = TorchGenerator(tiny_model, smollm2_tokenizer, tmpl, torch.randn(4, tiny_model.config.hidden_size))
    rows = generator.row_ids([[[smollm2_tokenizer("Hello")["input_ids"][0]]]], [0])  # text: one token
    choices = [[100, 2], [200]]
    got = score_choices(generator, rows, [0], choices)
    np.testing.assert_allclose(got, full_forward_scores(tiny_model, generator, rows, choices), atol=2e-5)


def test_ranking_leaves_the_cache_of_the_rows_being_decoded_as_it_was(tiny_model, smollm2_tokenizer):
    from softtool.prompts.template import Template
    from softtool.runtime.choices import score_choices
    from softtool.runtime.torch_backend import TorchGenerator

    generator = TorchGenerator(tiny_model, smollm2_tokenizer, Template.parse("{s}"))
    generator.reserve(2, 16)
    generator.prefill([0, 1], [[5, 6, 7], [8, 9]], [0, 0])
    before = [t.clone() for t in generator.kv]
    kept = generator.kv
    score_choices(generator, [[1, 2, 3]], [0], [[4, 2]])
    assert generator.kv is kept and all(torch.equal(a, b) for a, b in zip(before, generator.kv, strict=True))


def test_the_export_and_a_top_k_export_rank_like_pytorch(trained, exported, data, tmp_path):
    from softtool.classify import rank
    from softtool.data import get_task, load_split
    from softtool.runtime import load_generator

    topk = tmp_path / "topk"
    assert run_cli(["export", trained, "-o", topk, "--top-k", 8]).code == 0
    torch_gen = load_generator(trained, "torch")
    task = get_task("classify", **torch_gen.meta.task_options)
    examples = load_split(data, "dev", task=task).examples
    want = rank(torch_gen, task, examples, eos=True, progress=False)
    for folder in (exported, topk):
        got = rank(load_generator(folder, "onnx"), task, examples, eos=True, progress=False)
        assert got.predictions == want.predictions
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)


# -- the commands ----------------------------------------------------------------------------------------------
def test_the_adapter_records_the_task_the_train_split_decided(trained):
    meta = json.loads((trained / "softtool.json").read_text())
    assert meta["task"] == "classify" and meta["template"] == "[P:4]" + TEMPLATE
    options = meta["task_options"]
    assert options["labels"] == ["may", "mayhem", "no", "yes"] and options["target"] == "label"
    assert options["input"] == TEMPLATE and options["metric"] == "accuracy"
    evals = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r.get("kind") == "eval" and "accuracy" in r] == [0, 3, 6]  # dev curve


def test_eval_reports_accuracy_macro_f1_per_class_and_a_confusion_matrix(evaluated, data):
    record = json.loads((evaluated / "metrics.json").read_text())
    metrics = record["metrics"]
    assert set(metrics["per_class"]) == {"may", "mayhem", "no", "yes"}
    assert sum(map(sum, metrics["confusion"])) == len(ROWS) and record["scored"] == "label + EOS"
    rows = read_rows(evaluated / "predictions.jsonl")
    assert all(set(r["label_scores"]) == set(metrics["per_class"]) for r in rows)
    best = [max(r["label_scores"], key=r["label_scores"].get) for r in rows]
    assert [r["prediction"] for r in rows] == best
    assert metrics["accuracy"] == pytest.approx(100 * np.mean([r["correct"] for r in rows]))
    assert (evaluated / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_baselines_add_the_majority_class_and_a_balanced_k_shot_prompt(evaluated):
    for kind in ("baseline", "zero_shot", "chat", "few_shot", "majority"):
        assert (evaluated / kind / "metrics.json").is_file(), kind
    majority = json.loads((evaluated / "majority" / "metrics.json").read_text())
    assert majority["majority_label"] == "no"  # "no" and "yes" have 3 rows each: the first in label order wins
    few = json.loads((evaluated / "few_shot" / "metrics.json").read_text())
    assert few["template"].startswith("Answer with one of: may, mayhem, no, yes.\n")
    assert few["scored"] == "label"  # a discrete prompt is scored on the label alone


def test_the_export_gives_the_same_predictions_as_pytorch(exported, evaluated, data, tmp_path):
    assert json.loads((exported / "softtool_export.json").read_text())["kv_layout"] == "slots"  # the traced form
    code, _, _ = run_cli(["eval", exported, "--data", data, "--output", tmp_path / "onnx", "-q"])
    assert code == 0
    torch_rows, onnx_rows = (
        read_rows(evaluated / "predictions.jsonl"),
        read_rows(tmp_path / "onnx" / "predictions.jsonl"),
    )
    assert [r["prediction"] for r in onnx_rows] == [r["prediction"] for r in torch_rows]
    for a, b in zip(torch_rows, onnx_rows, strict=True):
        assert a["label_scores"] == pytest.approx(b["label_scores"], abs=1e-4)


def test_the_gqa_form_is_refused_for_a_classify_task(trained, tmp_path, capsys):
    code, _, err = run_cli(["export", trained, "-o", tmp_path / "gqa", "--form", "gqa"], capsys)
    assert "classify task scores its labels in the graph" in error_line(code, err)
    assert not (tmp_path / "gqa").exists()


def test_generate_answers_with_the_label_eval_ranks_first(trained, evaluated):
    rows = read_rows(evaluated / "predictions.jsonl")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code, _, _ = run_cli(["generate", trained, *[r["sentence"] for r in rows[:4]], "-o", "-"])
    assert code == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["output"] for line in lines] == [r["prediction"] for r in rows[:4]]
    for line, row in zip(lines, rows, strict=False):
        assert line["label_scores"] == pytest.approx(row["label_scores"], abs=1e-5)


def test_serve_answers_a_classify_task_with_the_label_and_every_labels_score(trained, exported, evaluated, tmp_path):
    from helpers import save_tiny_adapter

    rows = read_rows(evaluated / "predictions.jsonl")[:3]
    torch.manual_seed(0)
    model_dir = json.loads((trained / "softtool.json").read_text())["base_model"]
    de = save_tiny_adapter(tmp_path / "de", Path(model_dir), torch.randn(4, 32))  # a translation task beside it
    expected = generated([de, "A dog runs.", "--raw", "--max-new-tokens", 8])[0]["output"]
    for folder, others in ((trained, [de]), (exported, [])):
        server = Server([folder, *others, "--slots", "2"], tmp_path / f"{folder.name}.log")
        try:
            client = server.client()
            for row in rows:
                reply = client.completions.create(model=folder.name, prompt=row["sentence"], logprobs=1)
                choice = reply.choices[0]
                assert choice.text == " " + row["prediction"] and choice.finish_reason == "stop"
                scores = {k.strip(): v for k, v in choice.logprobs.top_logprobs[0].items()}
                assert scores == pytest.approx(row["label_scores"], abs=1e-4)
            stream = client.completions.create(model=folder.name, prompt=rows[0]["sentence"], stream=True)
            assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == " " + rows[0]["prediction"]
            if others:  # a generation task served beside the classify task answers as generate does
                reply = client.completions.create(model="de", prompt="A dog runs.", max_tokens=8)
                assert reply.choices[0].text.strip() == expected  # generate --raw strips the text
        finally:
            assert server.stop() == 0, (tmp_path / f"{folder.name}.log").read_text()[-2000:]


def test_peft_loads_the_adapter_and_scores_the_labels_the_same(trained, evaluated, lively_model_dir):
    from peft import PeftModel

    from softtool.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(lively_model_dir))
    model = PeftModel.from_pretrained(load_model(str(lively_model_dir)), str(trained)).eval()
    meta = json.loads((trained / "softtool.json").read_text())
    for row in read_rows(evaluated / "predictions.jsonl")[:3]:
        prompt = tokenizer(TEMPLATE.format(sentence=row["sentence"]), add_special_tokens=False)["input_ids"]
        for label in meta["task_options"]["labels"]:
            target = tokenizer(" " + label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + target])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -ids.shape[1] :]  # PEFT prepends its virtual tokens
            logprobs = torch.log_softmax(logits.double(), -1)
            score = sum(logprobs[len(prompt) - 1 + k, t].item() for k, t in enumerate(target))
            assert score == pytest.approx(row["label_scores"][label], abs=1e-4)


def test_a_chat_template_wraps_the_input_for_training_and_eval(data, lively_model_dir, tmp_path):
    out = tmp_path / "chat"
    args = ["train", "--task", "classify", "--data", data, "--template", TEMPLATE, "--model", lively_model_dir]
    assert run_cli([*args, "--chat-template", "--num-virtual-tokens", 2, "--max-steps", 1, "-o", out, "-q"]).code == 0
    meta = json.loads((out / "softtool.json").read_text())
    assert (
        meta["template"].startswith("[P:2]<|im_start|>system") and "<|im_start|>user\n" + TEMPLATE in meta["template"]
    )
    assert meta["template"].endswith("<|im_start|>assistant\n") and meta["task_options"]["chat_template"] is True
    code, _, _ = run_cli(["eval", out, "--data", data, "--output", tmp_path / "chat-eval", "-q"])
    assert code == 0


def test_chat_template_on_a_base_model_is_one_line(data, lively_model_dir, tmp_path, capsys):
    base = tmp_path / "base-model"
    shutil.copytree(lively_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    args = ["train", "--task", "classify", "--data", data, "--template", TEMPLATE, "--model", base, "--chat-template"]
    code, _, err = run_cli([*args, "-o", tmp_path / "out"], capsys)
    assert "has no chat template (a base model); drop the flag" in error_line(code, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "rows", "says"),
    [
        (["--template", "Text: {body}"], ROWS, "--template field(s) {body} are not columns"),
        ([], ROWS[:1] + ROWS[3:4], "holds 1 class(es) ['yes']"),
        (["--verbalizer", "yes=ok,no=ok"], ROWS, "labels 'no' and 'yes' are both written 'ok'"),
        (["--labels", "yes,no"], ROWS, "that --labels yes,no does not name"),
        ([], [*ROWS, ("empty label", "")], "record 11: the target column 'label' is empty"),
        (["--task", "text", "--labels", "a,b"], ROWS, "--labels: for --task classify, not text"),
        (["--task", "squad", "--target", "label"], ROWS, "--target: for --task text or classify, not squad"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, lively_model_dir, capsys, extra, rows, says):
    folder = tmp_path / "data"
    folder.mkdir()
    lines = "".join(json.dumps({"sentence": s, "label": label}) + "\n" for s, label in rows)
    (folder / "train.jsonl").write_text(lines)
    (folder / "dev.jsonl").write_text(lines)
    args = ["train", "--task", "classify", "--data", folder, "--template", TEMPLATE, "--model", lively_model_dir]
    code, _, err = run_cli([*args, *extra, "--max-steps", 1, "-o", tmp_path / "out"], capsys)
    assert says in error_line(code, err)
    assert not (tmp_path / "out").exists()


def generated(args: list) -> list[dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code, _, _ = run_cli(["generate", *args, "-o", "-"])
    assert code == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_constrained_generation_writes_a_label_where_free_generation_does_not(trained):
    texts = [s for s, _ in ROWS]
    labels = {"may", "mayhem", "no", "yes"}
    free = generated([trained, *texts, "--classify-by", "free", "--max-new-tokens", 6])
    assert any(line["output"] not in labels for line in free)
    constrained = generated([trained, *texts, "--classify-by", "constrained"])
    assert {line["output"] for line in constrained} <= labels


def test_labels_where_one_starts_the_other_are_both_reachable(trained, smollm2_tokenizer):
    assert smollm2_tokenizer(" mayhem")["input_ids"][:1] == smollm2_tokenizer(" may")["input_ids"]
    args = [trained, "a new comet", "--choice", "may", "--choice", "mayhem", "--raw"]
    lines = generated([*args, "--do-sample", "--temperature", 2.0, "--num-return-sequences", 40, "--seed", 3])
    outputs = {o["output"] for o in lines[0]["outputs"]}
    assert outputs == {"may", "mayhem"}


def test_the_documented_lm_eval_task_scores_each_label_as_softtool_ranks_it(lively_model_dir, tmp_path):
    """docs/lm_eval/softtool_sst2.yaml, run by `lm_eval` against `softtool serve` in prefix mode on a soft prompt
    trained with its template: every label's log-likelihood equals softtool's rank score without EOS (lm-eval scores
    the label alone), and its accuracy is the one those scores give."""
    import os
    import subprocess
    import sys

    import yaml

    from softtool.classify import rank
    from softtool.data import get_task, load_split
    from softtool.runtime import load_generator

    reviews = [("a gripping , funny film", "positive"), ("dull and far too long", "negative"),
               ("a triumph", "positive"), ("a mess from start to end", "negative")]  # fmt: skip
    data = tmp_path / "sst2"
    data.mkdir()
    lines = "".join(json.dumps({"sentence": s, "label": label}) + "\n" for s, label in reviews)
    for split in ("train", "dev"):
        (data / f"{split}.jsonl").write_text(lines)
    config = yaml.safe_load((Path(__file__).parents[1] / "docs" / "lm_eval" / "softtool_sst2.yaml").read_text())
    adapter = tmp_path / "sst2-adapter"
    args = ["train", "--task", "classify", "--data", data, "--model", lively_model_dir, "--num-virtual-tokens", 4]
    template = config["doc_to_text"].replace("{{sentence}}", "{sentence}")
    assert run_cli([*args, "--template", template, "--max-steps", 2, "-o", adapter, "-q"]).code == 0
    config["dataset_kwargs"]["data_files"]["validation"] = str(data / "dev.jsonl")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "softtool_sst2.yaml").write_text(yaml.safe_dump(config))

    server = Server([adapter, "--slots", "2", "--max-length", "128", "--max-tokens", "16"], tmp_path / "server.log")
    try:
        model_args = (f"model={adapter.name}:prefix,base_url={server.url}/v1/completions,tokenizer={lively_model_dir},"
                      "tokenizer_backend=huggingface,tokenized_requests=True,max_length=128,max_retries=1")  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
        command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
                   "--tasks", "softtool_sst2", "--include_path", str(tasks), "--batch_size", "4",
                   "--output_path", str(tmp_path / "out"), "--log_samples"]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
    finally:
        assert server.stop() == 0
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_*.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    generator = load_generator(adapter, "torch")
    task = get_task("classify", **generator.meta.task_options)
    ranked = rank(generator, task, load_split(data, "dev", task=task).examples, eos=False, progress=False)
    labels = list(task.labels)
    for sample, scores in zip(samples, ranked.scores, strict=True):
        got = [float(r[0][0]) for r in sample["resps"]]
        assert got == pytest.approx([scores[labels.index(c)] for c in config["doc_to_choice"]], abs=1e-4)
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["softtool_sst2"]
    gold = [label for _, label in reviews]
    assert results["acc,none"] == pytest.approx(
        np.mean([p == g for p, g in zip(ranked.predictions, gold, strict=True)])
    )


def test_a_peft_adapter_evaluated_as_classify_without_labels_is_one_line(trained, data, tmp_path, capsys):
    peft_only = tmp_path / "peft-only"
    shutil.copytree(trained, peft_only)
    (peft_only / "softtool.json").unlink()  # PEFT's two files: no task, no labels
    model = json.loads((trained / "softtool.json").read_text())["base_model"]
    args = ["eval", peft_only, "--data", data, "--task", "classify", "--template", "[P:4]" + TEMPLATE, "--model", model]
    code, _, err = run_cli([*args, "-o", tmp_path / "eval"], capsys)
    assert "a classify task needs its labels, which this adapter does not record" in error_line(code, err)
