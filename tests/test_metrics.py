"""Metric values against hand-computed cases: SQuAD v1.1 EM/F1, sacrebleu BLEU/chrF, ROUGE."""

from __future__ import annotations

import math

import pytest

from softtool import metrics


def test_normalize_answer_lowercases_and_drops_punctuation_articles_and_extra_spaces():
    assert metrics.normalize_answer("  The Denver   Broncos! ") == "denver broncos"
    assert metrics.normalize_answer("an apple, a pear") == "apple pear"
    # "the" only as a word: "theory" keeps its letters.
    assert metrics.normalize_answer("Theory of the Case") == "theory of case"


def test_exact_match_compares_normalized_strings():
    assert metrics.exact_match("the Broncos.", "Broncos") == 1.0
    assert metrics.exact_match("Denver Broncos", "Broncos") == 0.0


def test_token_f1_matches_hand_computed_precision_and_recall():
    # 1 common token; precision 1/2, recall 1/1 -> F1 2/3.
    assert metrics.token_f1("Denver Broncos", "Broncos") == pytest.approx(2 / 3)
    # Repeated tokens count up to the smaller multiplicity: common = 2 ("y" twice), P = R = 2/3.
    assert metrics.token_f1("x y y", "y y z") == pytest.approx(2 / 3)
    assert metrics.token_f1("Carolina", "Broncos") == 0.0
    # Only articles/punctuation: nothing left to match.
    assert metrics.token_f1("the", "Broncos") == 0.0


def test_squad_scores_take_the_best_gold_answer_per_question_and_average():
    predictions = ["Broncos", "Carolina"]
    references = [["Denver Broncos", "Broncos"], ["Panthers"]]
    scores = metrics.squad_scores(predictions, references)
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(50.0)
    # A partial match: max(F1 vs "Denver Broncos" = 2/3 ... ) averaged with a zero.
    scores = metrics.squad_scores(["Denver", "x"], [["Denver Broncos"], ["y"]])
    assert scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx(100 * (2 / 3) / 2)


def test_bleu_of_identical_text_is_100_with_a_signature():
    score, signature = metrics.bleu(["A man rides a bike ."], [["A man rides a bike ."]])
    assert score == pytest.approx(100.0)
    assert "nrefs:1" in signature and "tok:13a" in signature and "version:" in signature


def test_bleu_matches_the_hand_computed_geometric_mean_of_ngram_precisions():
    # Precisions 5/6, 3/5, 2/4, 1/3 (equal lengths, no brevity penalty).
    score, _ = metrics.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert score == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)


def test_bleu_accepts_a_different_number_of_references_per_example():
    score, signature = metrics.bleu(["a b c d e", "f g h i"], [["x y", "a b c d e"], ["f g h i"]])
    assert score == pytest.approx(100.0)
    assert "nrefs:var" in signature


def test_sentence_bleu_uses_effective_order_so_short_sentences_are_not_zero():
    # "a cat" vs "a cat sat": 1- and 2-gram precision 1, brevity penalty exp(1 - 3/2).
    assert metrics.sentence_bleu("a cat", ["a cat sat"]) == pytest.approx(100 * math.exp(-0.5), abs=1e-6)
    assert metrics.sentence_bleu("a b c d e", ["a b c d e"]) == pytest.approx(100.0)
    assert metrics.sentence_bleu("q r", ["a b c"]) == 0.0


def test_chrf_of_identical_text_is_100_with_a_signature():
    score, signature = metrics.chrf(["Ein Mann fährt Rad."], [["Ein Mann fährt Rad."]])
    assert score == pytest.approx(100.0)
    assert "nc:6" in signature and "version:" in signature
    low, _ = metrics.chrf(["Eine Frau"], [["Ein Mann fährt Rad."]])
    assert 0.0 < low < 50.0


def test_rouge_matches_hand_computed_unigram_bigram_and_lcs_scores():
    scores = metrics.rouge(["the cat sat"], [["the cat ran"]])
    assert scores["rouge1"] == pytest.approx(100 * 2 / 3)
    assert scores["rouge2"] == pytest.approx(50.0)
    assert scores["rougeL"] == pytest.approx(100 * 2 / 3)


def test_rouge_l_is_summary_level_over_newline_separated_sentences():
    # As one sentence the LCS is 3 of 6 tokens; split into sentences, each matches fully (rougeLsum).
    assert metrics.rouge(["c d e a b f"], [["a b f c d e"]])["rougeL"] == pytest.approx(50.0)
    assert metrics.rouge(["c d e a b f"], [["a b f\nc d e"]])["rougeL"] == pytest.approx(100.0)


def test_rouge_takes_the_best_reference():
    scores = metrics.rouge(["the cat sat"], [["dogs bark loudly", "the cat sat"]])
    assert scores == {"rouge1": pytest.approx(100.0), "rouge2": pytest.approx(100.0), "rougeL": pytest.approx(100.0)}


def test_metrics_reject_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        metrics.squad_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="nothing to score"):
        metrics.bleu([], [])
    with pytest.raises(ValueError, match="at least one reference"):
        metrics.rouge(["a"], [[]])


@pytest.mark.parametrize(
    "text",
    [
        "Ein Mann mit einem einem einem",  # a one-word loop
        "Kinder spielen in the park in the park in the park",  # a three-word loop
        "a b c d a b c d a b c d a b",  # a loop cut by the budget mid-n-gram still counts
    ],
)
def test_ends_in_loop_finds_a_trailing_repeated_ngram(text):
    assert metrics.ends_in_loop(text)


@pytest.mark.parametrize(
    "text",
    [
        "Ein Mann fährt Fahrrad.",
        "einem einem",  # two repeats are not a loop
        "the park the park and more",  # the repetition does not reach the end
        "a b c d e f g h i a b c d e f g h i a b c d e f g h i",  # a 9-gram: longer than max_ngram
        "",
    ],
)
def test_ends_in_loop_leaves_ordinary_endings_alone(text):
    assert not metrics.ends_in_loop(text)


def test_loop_share_is_the_percentage_of_looping_predictions():
    preds = ["Ein Hund.", "einem einem einem", "Zwei Kinder.", "ja ja ja ja"]
    assert metrics.loop_share(preds) == 50.0
    with pytest.raises(ValueError):
        metrics.loop_share([])
