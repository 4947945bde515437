"""The user's own tasks (softtool.data.user_tasks): columns and defaults, what the train split decides, the label
set and its checks, class-balanced demonstrations, and the classification report against scikit-learn's."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from softtool.data import get_task, load_split
from softtool.data.user_tasks import default_metric, parse_verbalizer
from softtool.errors import SofttoolError, SofttoolWarning
from softtool.metrics import classification_scores
from softtool.prompts.template import Template


def write_jsonl(folder: Path, split: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


REVIEWS = [
    {"sentence": "a fine film", "label": "positive"},
    {"sentence": "dull and long", "label": "negative"},
    {"sentence": "great fun", "label": "positive"},
    {"sentence": "a mess", "label": "negative"},
    {"sentence": "moving", "label": "positive"},
]


def test_a_prompt_completion_file_needs_no_template_and_no_target(tmp_path, smollm2_tokenizer):
    data = write_jsonl(tmp_path, "train", [{"prompt": "The sky is", "completion": " blue."},
                                           {"prompt": "Grass is", "completion": " green."}])  # fmt: skip
    split = load_split(data, "train", task=get_task("text"))
    assert split.columns == {"prompt": "prompt", "target": "completion"}
    task = get_task("text").fit(split, smollm2_tokenizer)
    assert task.options["input"] == "{prompt}" and task.options["target"] == "completion"
    assert task.target_text(split.examples[0]) == " blue."
    assert task.main_metric == "exact_match"  # one-word targets
    longest = max(len(smollm2_tokenizer(" " + t)["input_ids"]) for t in ("blue.", "green."))
    assert task.max_target_tokens == longest + 1  # the budget: the longest target and its EOS


def test_the_target_defaults_to_the_first_known_column_and_the_input_to_the_one_left(tmp_path):
    data = write_jsonl(tmp_path / "a", "train", [{"id": 1, "text": "hi", "answer": "a"}])
    split = load_split(data, "train", task=get_task("text"))
    assert split.columns == {"text": "text", "target": "answer"}  # id is never the input
    data = write_jsonl(tmp_path / "b", "train", [{"text": "hi", "output": "a", "label": "b"}])
    split = load_split(data, "train", task=get_task("text", input="{text}"))
    assert split.columns == {"text": "text", "target": "output"}  # output comes before label


def test_the_default_metric_follows_the_target_lengths():
    assert default_metric(["yes", "no"]) == "exact_match"
    assert default_metric(["the red house", "in 1990"]) == "f1"
    assert default_metric(["line one\nline two"]) == "rougeL"
    assert default_metric([" ".join(["word"] * 20)]) == "rougeL"


@pytest.mark.parametrize(
    ("options", "rows", "says"),
    [
        ({"input": "Review: {text}"}, REVIEWS, "{text} are not columns"),
        ({"input": "{sentence}", "target": "stars"}, REVIEWS, "no target column 'stars'"),
        ({}, [{"a": "x", "b": "y", "label": "z"}], "say which the model reads with --template"),
        (
            {"input": "{sentence}"},
            [*REVIEWS, {"sentence": "so so", "label": ""}],
            "record 6: the target column 'label'",
        ),
    ],
)
def test_bad_columns_and_empty_targets_are_one_line_naming_the_file(tmp_path, options, rows, says):
    data = write_jsonl(tmp_path, "train", rows)
    with pytest.raises(SofttoolError) as err:
        load_split(data, "train", task=get_task("classify", **options))
    assert says in str(err.value) and str(data / "train.jsonl") in str(err.value)
    assert "\n" not in str(err.value)


def test_labels_come_from_train_sorted_or_from_the_given_order(tmp_path, smollm2_tokenizer):
    data = write_jsonl(tmp_path, "train", REVIEWS)
    split = load_split(data, "train", task=get_task("classify", input="Review: {sentence}\nSentiment:"))
    assert get_task("classify", input="{sentence}").fit(split, smollm2_tokenizer).labels == ("negative", "positive")
    given = get_task("classify", input="{sentence}", labels=("positive", "negative", "neutral"))
    assert given.fit(split, smollm2_tokenizer).labels == ("positive", "negative", "neutral")


@pytest.mark.parametrize(
    ("rows", "options", "says"),
    [
        (REVIEWS[:1] + REVIEWS[2:3], {}, "holds 1 class(es) ['positive']"),
        (REVIEWS, {"labels": ("positive", "neutral")}, "label(s) ['negative'] (2 rows) that --labels positive,neutral"),
        (REVIEWS, {"verbalizer": {"positive": "good", "negative": "good"}}, "are both written 'good'"),
        (REVIEWS, {"verbalizer": {"neutral": "meh"}}, "--verbalizer names ['neutral'], which are not labels"),
    ],
)
def test_a_label_set_that_cannot_be_ranked_is_refused_in_one_line(tmp_path, smollm2_tokenizer, rows, options, says):
    data = write_jsonl(tmp_path, "train", rows)
    task = get_task("classify", input="{sentence}", **options)
    split = load_split(data, "train", task=task)
    with pytest.raises(SofttoolError) as err:
        task.fit(split, smollm2_tokenizer)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_more_labels_than_the_maximum_are_refused():
    with pytest.raises(SofttoolError, match="65 labels, more than the 64"):
        get_task("classify", input="{x}", labels=tuple(f"l{i}" for i in range(65)))


def test_a_verbalizer_is_label_equals_text_pairs():
    assert parse_verbalizer("entailment=yes, not_entailment = no") == {"entailment": "yes", "not_entailment": "no"}
    with pytest.raises(SofttoolError, match="LABEL=TEXT"):
        parse_verbalizer("yes")


def test_the_model_reads_and_writes_the_verbalized_label(tmp_path, smollm2_tokenizer):
    data = write_jsonl(tmp_path, "train", REVIEWS)
    task = get_task("classify", input="Review: {sentence}\nSentiment:", verbalizer={"positive": "good"})
    task = task.fit(load_split(data, "train", task=task), smollm2_tokenizer)
    assert task.target_text(load_split(data, "train", task=task).examples[0]) == " good"
    assert task.label_token_ids(smollm2_tokenizer) == [smollm2_tokenizer(" negative")["input_ids"],
                                                       smollm2_tokenizer(" good")["input_ids"]]  # fmt: skip
    assert task.postprocess(" good\nmore") == "positive"  # generated text back to its label
    assert task.instruction == "Answer with one of: negative, good."


def test_a_dev_label_train_never_had_is_a_warning_with_its_count(tmp_path, smollm2_tokenizer):
    from softtool.classify import warn_unseen_labels

    data = write_jsonl(tmp_path, "train", REVIEWS)
    write_jsonl(tmp_path, "dev", [*REVIEWS, {"sentence": "ok", "label": "neutral"}])
    task = get_task("classify", input="{sentence}")
    task = task.fit(load_split(data, "train", task=task), smollm2_tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_unseen_labels(task, load_split(data, "dev", task=task))
    assert [str(w.message) for w in caught if w.category is SofttoolWarning] == [
        f"{data / 'dev.jsonl'}: label(s) 'neutral' (1 rows) are not among the task's labels ['negative', 'positive']; "
        "those rows count as wrong"
    ]


def test_k_shot_demonstrations_are_class_balanced_and_seeded(tmp_path, smollm2_tokenizer):
    rows = [{"sentence": f"s{i}", "label": "a" if i < 20 else "b" if i < 28 else "c"} for i in range(30)]
    data = write_jsonl(tmp_path, "train", rows)
    task = get_task("classify", input="{sentence}")
    examples = load_split(data, "train", task=task).examples
    task = task.fit(load_split(data, "train", task=task), smollm2_tokenizer)
    picked = task.demonstrations(examples, 5, seed=1)
    counts = {label: sum(ex.target == label for ex in picked) for label in "abc"}
    assert counts == {"a": 1, "b": 2, "c": 2}  # the rarest classes get the extra shots
    assert [ex.id for ex in task.demonstrations(examples, 5, seed=1)] == [ex.id for ex in picked]
    assert [ex.id for ex in task.demonstrations(examples, 5, seed=2)] != [ex.id for ex in picked]


def test_a_template_without_virtual_tokens_gets_the_default_prefix():
    from softtool.prompts.encoder import PromptConfig

    assert PromptConfig(template="Review: {s}").template == "[P:20]Review: {s}"
    assert PromptConfig(template="Review: {s}", num_virtual_tokens=5).num_virtual_tokens == 5
    assert Template.parse("[P:4]{a}[P:2]{b}\nAnswer:").text_only() == "{a} {b}\nAnswer:"


def test_the_classification_report_is_scikit_learns():
    sklearn = pytest.importorskip("sklearn.metrics")
    gold = ["a", "a", "b", "c", "a", "b", "c", "c"]
    pred = ["a", "b", "b", "c", "x", "a", "c", "b"]  # "x": not a label, always wrong
    report = classification_scores(pred, gold, ["a", "b", "c"])
    precision, recall, f1, support = sklearn.precision_recall_fscore_support(
        gold, pred, labels=["a", "b", "c"], zero_division=0
    )
    for i, label in enumerate("abc"):
        got = report["per_class"][label]
        assert got["precision"] == pytest.approx(100 * precision[i]) and got["recall"] == pytest.approx(100 * recall[i])
        assert got["support"] == support[i]
    assert report["macro_f1"] == pytest.approx(100 * f1.mean())
    assert report["accuracy"] == pytest.approx(100 * sklearn.accuracy_score(gold, pred))
    assert report["confusion"] == sklearn.confusion_matrix(gold, pred, labels=["a", "b", "c"]).tolist()
