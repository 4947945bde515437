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


def test_eval_with_baseline_scores_the_instruction_zero_shot_and_chat_prompts(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    results = _eval(tmp_path, tiny_model_dir, limit=2, max_new_tokens=3, baseline=True)
    # The tiny model carries SmolLM2-Instruct's tokenizer, chat template included: the chat row appears.
    assert set(results) == {"soft_prompt", "baseline", "zero_shot", "chat"}
    baseline = json.loads((out / "baseline" / "metrics.json").read_text())
    zero = json.loads((out / "zero_shot" / "metrics.json").read_text())
    chat = json.loads((out / "chat" / "metrics.json").read_text())
    assert baseline["template"].startswith("Translate the English sentence into German.")
    assert zero["template"] == "English: {source}\nGerman:"
    user_turn = "<|im_start|>user\n" + baseline["template"] + "<|im_end|>\n<|im_start|>assistant\n"
    assert chat["template"].startswith("<|im_start|>system\n") and chat["template"].endswith(user_turn)
    assert (out / "baseline" / "predictions.jsonl").read_text().count("\n") == 2


def test_chat_prompt_encodes_as_the_tokenizers_own_chat_formatting(smollm2_tokenizer):
    from softtool.data import encode_example
    from softtool.data.example import Example
    from softtool.evaluate import chat_template

    task = get_task("translation", src="en", tgt="de")
    template = chat_template(smollm2_tokenizer, task.baseline_template())
    example = Example("0", {"source": "A {curly} dog."}, ["Ein Hund."])
    ids = [i for piece in encode_example(smollm2_tokenizer, template, task, example, with_target=False).pieces
           for i in piece]  # fmt: skip
    message = task.baseline_template().render(example.fields)[0]
    expected = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                     add_generation_prompt=True, tokenize=True)  # fmt: skip
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # a BatchEncoding in transformers 5
    assert ids == list(expected)


def test_few_shot_prompt_puts_the_first_train_examples_after_the_instruction(tmp_path, tiny_model_dir):
    torch.manual_seed(0)
    adapter = save_tiny_adapter(tmp_path / "adapter", tiny_model_dir, torch.randn(3, 32) * 0.1)
    data = write_translation_data(tmp_path / "data", SOURCES, TARGETS, splits=("train", "val"))
    options = EvalOptions(limit=2, max_new_tokens=3, baseline=True, shots=2)
    results = run_eval(adapter, data, tmp_path / "eval", options, progress=False)
    assert results["few_shot"]["template"] == (
        "Translate the English sentence into German.\n"
        f"English: {SOURCES[0]}\nGerman: {TARGETS[0]}\n\nEnglish: {SOURCES[1]}\nGerman: {TARGETS[1]}\n\n"
        "English: {source}\nGerman:"
    )
    assert results["few_shot"]["n"] == 2


def test_offset_skips_the_first_examples_of_the_split(tmp_path, tiny_model_dir):
    _eval(tmp_path, tiny_model_dir, offset=1, limit=2, max_new_tokens=2)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == SOURCES[1:3]


def test_inputs_longer_than_the_budget_are_truncated_and_counted(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    _eval(tmp_path, tiny_model_dir, max_new_tokens=4, max_length=20)
    metrics = json.loads((out / "metrics.json").read_text())
    # 20 tokens minus 4 to generate, 3 virtual and the template's own words leave ~8 for the source.
    assert metrics["truncated"] == 2


def test_eval_decodes_with_the_adapters_decoding_defaults_and_search_overrides_them(
    tmp_path, lively_model_dir, smollm2_tokenizer
):
    """The lively model repeats itself within 12 tokens; the adapter's no-repeat-ngram default (1) forbids any
    repeated token, and an explicit search option turns it off again."""
    data = write_translation_data(tmp_path / "data", SOURCES, TARGETS, splits=("val",))

    def tokens(decoding, search=None):
        torch.manual_seed(0)
        adapter = save_tiny_adapter(tmp_path / "a", lively_model_dir, torch.randn(3, 32), decoding=decoding)
        out = tmp_path / "eval"
        options = EvalOptions(limit=4, max_new_tokens=12, search=search or {})
        run_eval(adapter, data, out, options, progress=False)
        metrics = json.loads((out / "metrics.json").read_text())
        preds = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
        # The lively model's tokenizer is SmolLM2's.
        return metrics["decoding"], [smollm2_tokenizer(p, add_special_tokens=False)["input_ids"] for p in preds]

    plain_decoding, plain = tokens({})
    assert plain_decoding == {"no_repeat_ngram_size": 0, "repetition_penalty": 1.0}
    assert any(len(set(ids)) < len(ids) for ids in plain)  # without the default some prediction repeats a token
    decoding, distinct = tokens({"no_repeat_ngram_size": 1})
    assert decoding["no_repeat_ngram_size"] == 1
    assert all(len(set(ids)) == len(ids) for ids in distinct)
    overridden, again = tokens({"no_repeat_ngram_size": 1}, search={"no_repeat_ngram_size": 0})
    assert overridden["no_repeat_ngram_size"] == 0 and again == plain
