"""The four tasks: options, templates, targets, post-processing, records -> examples, and scores."""

from __future__ import annotations

import pytest

from softtool.data import TASK_NAMES, Example, TranslationOptions, get_task
from softtool.errors import SofttoolError


def test_every_task_is_available_by_name():
    assert set(TASK_NAMES) == {"squad", "squad-qg", "cnndm", "translation", "text", "classify"}
    for name in TASK_NAMES:
        # The user's own tasks take their input template as an option (the train split fixes the rest).
        task = get_task(name, **({"input": "Q: {question}\nA:"} if name in ("text", "classify") else {}))
        assert task.name == name
        assert task.truncate_field in task.fields
        assert task.max_target_tokens > 0


def test_unknown_task_is_a_user_error_naming_the_option():
    with pytest.raises(SofttoolError, match=r"--task 'summarize' is not a task; use one of squad"):
        get_task("summarize")


def test_translation_input_uses_language_names_for_the_codes():
    task = get_task("translation", src="en", tgt="de")
    assert task.input_text == "English: {source}\nGerman:"
    assert task.instruction == "Translate the English sentence into German."
    assert task.options == {"src": "en", "tgt": "de"}
    reverse = get_task("translation", src="de", tgt="en")
    assert reverse.input_text == "German: {source}\nEnglish:"


def test_translation_options_reject_unknown_codes_and_identical_sides():
    with pytest.raises(ValueError, match="'xx' is not a known language code"):
        TranslationOptions(src="xx")
    with pytest.raises(SofttoolError, match="src and tgt are both 'de'"):
        get_task("translation", src="de", tgt="de")
    with pytest.raises(SofttoolError, match="its options are src and tgt"):
        get_task("translation", source="en")
    with pytest.raises(SofttoolError, match="task squad takes no options"):
        get_task("squad", src="en")


def test_default_template_puts_virtual_tokens_before_the_input_text():
    task = get_task("squad")
    template = task.default_template(20)
    assert template.num_virtual_tokens == 20 and template.is_prefix
    assert template.fields == ["context", "question"]
    assert template.render({"context": "C", "question": "Q"}) == ["Context: C\nQuestion: Q\nAnswer:"]


def test_baseline_template_is_instruction_then_input_without_virtual_tokens():
    task = get_task("translation")
    baseline = task.baseline_template()
    assert baseline.num_virtual_tokens == 0
    assert baseline.render({"source": "A dog."}) == [
        "Translate the English sentence into German.\nEnglish: A dog.\nGerman:"
    ]
    assert task.zero_shot_template().render({"source": "A dog."}) == ["English: A dog.\nGerman:"]


def test_target_text_is_the_first_reference_with_a_leading_space():
    example = Example("1", {"context": "c", "question": "q"}, ["  Denver Broncos ", "Broncos"])
    assert get_task("squad").target_text(example) == " Denver Broncos"


def test_postprocess_cuts_at_the_first_newline_except_for_summaries():
    assert get_task("squad").postprocess("  Denver Broncos\nQuestion: who?") == "Denver Broncos"
    assert get_task("translation").postprocess(" Ein Hund.\nEnglish: A cat.") == "Ein Hund."
    assert get_task("squad-qg").postprocess("Who won?\n\nContext:") == "Who won?"
    assert get_task("cnndm").postprocess("  First point .\n\n Second point .\n") == "First point .\nSecond point ."


def test_squad_record_accepts_the_common_answer_shapes():
    task = get_task("squad")
    columns = task.resolve_columns(["id", "context", "question", "answers"], "f")
    base = {"id": "q1", "context": "C", "question": "Q"}
    shapes = [
        [{"text": "A", "answer_start": 0}, {"text": "A"}, {"text": "B"}],  # SQuAD JSON
        {"text": ["A", "B"], "answer_start": [0, 3]},  # Hugging Face
        '["A", "B", "A"]',  # a JSON list in a CSV cell
    ]
    for answers in shapes:
        example = task.make_example({**base, "answers": answers}, columns, 0)
        assert example.references == ["A", "B"] and example.target == "A" and example.id == "q1"
    assert task.make_example({**base, "answers": "Just text"}, columns, 0).references == ["Just text"]


def test_records_with_an_empty_needed_field_give_no_example():
    task = get_task("squad")
    columns = task.resolve_columns(["context", "question", "answers"], "f")
    assert task.make_example({"context": "C", "question": "  ", "answers": ["A"]}, columns, 0) is None
    assert task.make_example({"context": "C", "question": "Q", "answers": []}, columns, 0) is None
    assert task.make_example({"context": "C", "question": "Q", "answers": [{"text": " "}]}, columns, 0) is None


def test_question_generation_swaps_question_and_answer():
    task = get_task("squad-qg")
    columns = task.resolve_columns(["context", "question", "answers"], "f")
    example = task.make_example({"context": "C", "question": "Who?", "answers": ["Ann", "Bob"]}, columns, 7)
    assert example.fields == {"context": "C", "answer": "Ann"}
    assert example.references == ["Who?"] and example.id == "7"


def test_cnndm_accepts_document_summary_columns_and_cleans_highlight_lines():
    task = get_task("cnndm")
    columns = task.resolve_columns(["document", "summary"], "f")
    example = task.make_example({"document": "Story.", "summary": " One .\n\n Two .\n"}, columns, 0)
    assert example.fields == {"article": "Story."} and example.target == "One .\nTwo ."


def test_missing_columns_error_names_the_needed_and_present_columns():
    with pytest.raises(
        SofttoolError, match=r"data\.csv: missing column\(s\) 'highlights' or 'summary'.*\['article', 'id'\]"
    ):
        get_task("cnndm").resolve_columns(["id", "article"], "data.csv")


def test_each_task_scores_its_main_metric_and_the_listed_metrics():
    expected = {
        "squad": {"exact_match", "f1", "bleu", "bleu_signature", "loop_share", "n"},
        "squad-qg": {"bleu", "bleu_signature", "loop_share", "n"},
        "cnndm": {"rouge1", "rouge2", "rougeL", "bleu", "bleu_signature", "loop_share", "n"},
        "translation": {"bleu", "chrf", "bleu_signature", "chrf_signature", "loop_share", "n"},
    }
    for name, keys in expected.items():
        task = get_task(name)
        scores = task.score(["a b c d", "e f g h"], [["a b c d"], ["x y z w", "e f g h"]])
        assert set(scores) == keys and task.main_metric in scores
        assert scores["n"] == 2 and scores["loop_share"] == 0.0
        assert scores[task.main_metric] == pytest.approx(100.0)
        for key, value in scores.items():
            if key.endswith("_signature"):
                assert "version:" in value


def test_translation_scores_partial_output_between_0_and_100():
    scores = get_task("translation").score(["Ein Mann fährt ein Rad."], [["Ein Mann fährt Fahrrad."]])
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100


def test_sentence_score_is_smoothed_sentence_bleu():
    task = get_task("translation")
    assert task.sentence_score("Ein Hund läuft.", ["Ein Hund läuft."]) == pytest.approx(100.0)
    assert 0 < task.sentence_score("Ein Hund", ["Ein Hund läuft schnell."]) < 100
