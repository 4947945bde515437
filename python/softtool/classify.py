"""Classification by rank: score every label after each input, predict the best, report and plot.

`rank` encodes each example without its target (as generation does), scores every label's tokens after it on the
generator's slot cache (softtool.runtime.choices: one prefill per example, the labels batched over its cache), and
predicts the label with the highest log-likelihood, optionally divided by the label's length in tokens or
characters (lm-evaluation-harness's acc_norm uses characters). A trained soft prompt learned each label followed by
the end of the text, so its labels are scored with the EOS token; a discrete prompt (instruction, k-shot) scores the
label's tokens alone, as lm-evaluation-harness does.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from softtool.distributed import DistributedContext
from softtool.errors import SofttoolWarning
from softtool.runtime.choices import score_choices

LENGTH_NORMS = ("none", "tokens", "chars")
CONFUSION_PLOT = "confusion.png"


@dataclass
class Ranked:
    """Rank classification of a split: per example every label's score, and the predicted labels."""

    scores: np.ndarray  # [examples, labels] summed log-probs (before any length normalisation)
    predictions: list[str]
    truncated: int
    seconds: float
    scored_tokens: int  # label tokens scored, over all examples and labels


def label_choices(task, tokenizer, eos: bool) -> list[list[int]]:
    """Each label's token ids after the input (and the EOS id when `eos`)."""
    return task.label_token_ids(tokenizer, eos=eos)


def normalized(scores: np.ndarray, task, choices: Sequence[Sequence[int]], length_norm: str) -> np.ndarray:
    """`scores` divided by each label's length in tokens or characters ("none": unchanged)."""
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")
    if length_norm == "tokens":
        return scores / np.array([len(c) for c in choices], dtype=np.float64)
    if length_norm == "chars":
        return scores / np.array([len(task.verbalize(label)) for label in task.labels], dtype=np.float64)
    return scores


def rank_rows(
    generator,
    task,
    rows: Sequence[Sequence[int]],
    task_ids: Sequence[int],
    *,
    eos: bool,
    length_norm: str = "none",
    timings: dict[str, float] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Every label's score after each row (full ids, virtual ones included) and the predicted labels: what `rank`
    does per batch, and what `generate` and `serve` answer a classify task with (`timings`: score_choices')."""
    choices = label_choices(task, generator.tokenizer, eos)
    max_rows = max(len(rows), 1) * len(choices)
    scores = score_choices(generator, rows, task_ids, choices, max_rows=max_rows, timings=timings)
    return scores, predict_labels(scores, task, choices, length_norm)


def predict_labels(scores: np.ndarray, task, choices: Sequence[Sequence[int]], length_norm: str) -> list[str]:
    """The best label of each row of `scores` (after length normalisation)."""
    return [task.labels[int(i)] for i in normalized(scores, task, choices, length_norm).argmax(axis=1)]


def rank(
    generator,
    task,
    examples: Sequence,
    *,
    eos: bool,
    length_norm: str = "none",
    max_length: int = 512,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "ranking",
    dist: DistributedContext | None = None,
) -> Ranked:
    """Score `task`'s labels after each example with `generator`'s template and prompt (task 0); see the module
    docstring. `batch_size` examples share one scoring forward; under torchrun the length-ordered batches are dealt
    out to the ranks and gathered back in order."""
    from softtool.data import encode_example

    choices = label_choices(task, generator.tokenizer, eos)
    budget = max_length - max(len(c) for c in choices)
    encoded = [
        encode_example(generator.tokenizer, generator.template, task, ex, max_length=budget, with_target=False)
        for ex in examples
    ]
    rows = generator.row_ids([e.pieces for e in encoded], [0] * len(encoded))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    dist = dist or DistributedContext()
    chunks = [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
    mine = [chunks[k] for k in dist.strided(len(chunks))]
    start = time.perf_counter()
    done: list[tuple[int, np.ndarray]] = []
    with tqdm(total=sum(map(len, mine)), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True) as bar:
        for chunk in mine:
            scores, _ = rank_rows(generator, task, [rows[i] for i in chunk], [0] * len(chunk), eos=eos)
            done += list(zip(chunk, scores, strict=True))
            bar.update(len(chunk))
    seconds = max(dist.gather_objects(time.perf_counter() - start))
    scores = np.stack(dist.gather_in_order(done, len(rows))) if rows else np.zeros((0, len(choices)))
    predictions = predict_labels(scores, task, choices, length_norm)
    tokens = len(rows) * sum(len(c) for c in choices)
    return Ranked(scores, predictions, sum(e.truncated for e in encoded), seconds, tokens)


def majority_label(task, train_examples: Sequence) -> str:
    """The most frequent label of the train split (ties: the first in the task's label order)."""
    counts = Counter(ex.target.strip() for ex in train_examples)
    return max(task.labels, key=lambda label: (counts.get(label, 0), -task.labels.index(label)))


def warn_unseen_labels(task, split) -> None:
    """A warning naming the labels of `split` the task never saw in training, with their counts (those rows are
    always scored as wrong)."""
    unseen = task.unseen_labels(split)
    if unseen:
        counts = ", ".join(f"{label!r} ({n} rows)" for label, n in unseen.items())
        warnings.warn(
            f"{split.source}: label(s) {counts} are not among the task's labels {list(task.labels)}; "
            "those rows count as wrong",
            SofttoolWarning,
            stacklevel=2,
        )


def plot_confusion(path: Path, report: dict, title: str) -> Path:
    """The confusion matrix of a classification report (metrics.classification_scores) as a PNG: counts in the
    cells, rows the gold labels, columns the predicted ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = report["labels"], np.array(report["confusion"])
    size = 1.6 + 0.7 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    peak = matrix.max() if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    ax.set_title(f"{title}\naccuracy {report['accuracy']:.1f}, macro-F1 {report['macro_f1']:.1f}", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
