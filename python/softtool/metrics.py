"""Scores for generated text: SQuAD v1.1 exact match / F1, sacrebleu BLEU and chrF, and ROUGE; and for
classification, accuracy, macro-F1, per-class precision and recall and the confusion matrix.

All scores are on a 0-100 scale. BLEU and chrF come from sacrebleu with their signatures, so a
number can be reproduced; ROUGE comes from Google's rouge-score package, with rougeLsum (the
summary-level LCS over newline-separated sentences) reported as ROUGE-L, the standard for CNN/DM.
Beside them, `loop_share` counts degenerate outputs: the share of predictions that end in a repeated
n-gram loop, which small models fall into under greedy decoding.

The SQuAD metrics follow the definition of the official v1.1 evaluation: answers are normalized
(lowercase, punctuation removed, the articles a/an/the removed, whitespace collapsed), exact match
and token-overlap F1 are taken as the maximum over the gold answers, then averaged.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 answer normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalization (0.0 when nothing overlaps)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus exact match and F1 (0-100): per question the best score over its gold answers, averaged."""
    _check_lengths(predictions, references)
    em = sum(max(exact_match(p, g) for g in refs) for p, refs in zip(predictions, references, strict=True))
    f1 = sum(max(token_f1(p, g) for g in refs) for p, refs in zip(predictions, references, strict=True))
    n = len(predictions)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


@lru_cache(maxsize=8)
def _bleu_metric(tokenize: str, sentence: bool):
    from sacrebleu.metrics import BLEU

    # Sentence-level BLEU needs effective order: a short sentence has no 4-grams, and without it
    # every such sentence would score 0 whatever its quality.
    return BLEU(tokenize=tokenize, effective_order=sentence)


def _one_line(text: str) -> str:
    # sacrebleu scores one segment per line; multi-sentence outputs (summaries) are joined.
    return " ".join(text.split("\n")).strip()


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Transpose per-example reference lists into sacrebleu's streams, padding with None (ignored)."""
    width = max(len(refs) for refs in references)
    return [[_one_line(refs[k]) if k < len(refs) else None for refs in references] for k in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: str = "13a") -> tuple[float, str]:
    """Corpus BLEU (sacrebleu) and its signature; examples may have different numbers of references."""
    _check_lengths(predictions, references)
    metric = _bleu_metric(tokenize, False)
    result = metric.corpus_score([_one_line(p) for p in predictions], _reference_streams(references))
    return float(result.score), str(metric.get_signature())


def sentence_bleu(prediction: str, references: Sequence[str], tokenize: str = "13a") -> float:
    """Sentence BLEU (sacrebleu, exponential smoothing, effective order) for one example."""
    return sentence_bleu_signed(prediction, references, tokenize)[0]


def sentence_bleu_signed(prediction: str, references: Sequence[str], tokenize: str = "13a") -> tuple[float, str]:
    """Sentence BLEU and its sacrebleu signature, e.g. `nrefs:1|case:mixed|eff:yes|tok:13a|smooth:exp|version:2.6.0`."""
    if not references:
        raise ValueError("sentence_bleu needs at least one reference")
    metric = _bleu_metric(tokenize, True)
    score = metric.sentence_score(_one_line(prediction), [_one_line(r) for r in references]).score
    return float(score), str(metric.get_signature())


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, str]:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2) and its signature."""
    from sacrebleu.metrics import CHRF

    _check_lengths(predictions, references)
    metric = CHRF()
    result = metric.corpus_score([_one_line(p) for p in predictions], _reference_streams(references))
    return float(result.score), str(metric.get_signature())


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (0-100), best over the references; rougeL is rougeLsum.

    Sentences must be separated by newlines in both predictions and references (CNN/DM highlights
    already are); rougeLsum then matches the summary-level LCS of the original ROUGE script.
    """
    _check_lengths(predictions, references)
    scorer = _rouge_scorer()
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeLsum": 0.0}
    for prediction, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi(list(refs), prediction) if len(refs) > 1 else scorer.score(refs[0], prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = len(predictions)
    return {
        "rouge1": 100 * totals["rouge1"] / n,
        "rouge2": 100 * totals["rouge2"] / n,
        "rougeL": 100 * totals["rougeLsum"] / n,
    }


def ends_in_loop(text: str, min_repeats: int = 3, max_ngram: int = 8) -> bool:
    """True when `text` ends in a loop: its last words repeat one n-gram (n <= max_ngram words) at least
    `min_repeats` times in a row ("... einem einem einem", "... in the park in the park in the park").

    A loop cut by the token budget mid-n-gram still counts: the test is that the trailing words are
    periodic with period n over at least min_repeats * n words. Words are whitespace-separated.
    """
    words = text.split()
    for n in range(1, max_ngram + 1):
        if len(words) < min_repeats * n:
            break
        periodic = 0  # trailing positions i with words[i] == words[i - n]
        for i in range(len(words) - 1, n - 1, -1):
            if words[i] != words[i - n]:
                break
            periodic += 1
        if periodic + n >= min_repeats * n:
            return True
    return False


def loop_share(predictions: Sequence[str]) -> float:
    """Percentage (0-100) of predictions that end in a repeated n-gram loop (`ends_in_loop`)."""
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    return 100 * sum(ends_in_loop(p) for p in predictions) / len(predictions)


def accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Percentage (0-100) of predictions equal to one of their references (both stripped; case kept)."""
    _check_lengths(predictions, references)
    hits = sum(p.strip() in {r.strip() for r in refs} for p, refs in zip(predictions, references, strict=True))
    return 100 * hits / len(predictions)


def classification_scores(predictions: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy and macro-F1 (0-100), per-class precision, recall, F1 and support, and the confusion matrix
    (rows: gold label, columns: predicted label, in `labels` order).

    The definitions are scikit-learn's (precision_recall_fscore_support, confusion_matrix): a class never predicted
    has precision 0, macro-F1 averages the F1 of every class in `labels`. A prediction or gold label outside
    `labels` counts as wrong and lands in no matrix cell.
    """
    if len(predictions) != len(gold):
        raise ValueError(f"{len(predictions)} predictions but {len(gold)} gold labels")
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for p, g in zip(predictions, gold, strict=True):
        if p in index and g in index:
            confusion[index[g]][index[p]] += 1
    per_class, f1s = {}, []
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(p == label for p in predictions)
        support = sum(1 for g in gold if g == label)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        per_class[label] = {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1, "support": support}
    correct = sum(p == g for p, g in zip(predictions, gold, strict=True))
    return {
        "accuracy": 100 * correct / len(predictions),
        "macro_f1": 100 * sum(f1s) / len(f1s),
        "per_class": per_class,
        "confusion": confusion,
        "labels": list(labels),
    }


def _check_lengths(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every prediction needs at least one reference")
