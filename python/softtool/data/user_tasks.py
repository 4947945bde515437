"""The user's own tasks: any columns, any template, text-to-text (`text`) or a label set (`classify`).

    text      the template's {column}s -> the target column      exact match/F1, BLEU, chrF, ROUGE-L or accuracy
    classify  the template's {column}s -> one of the labels        accuracy, macro-F1, per-class precision/recall

The input is the template's text (`Review: {sentence}\\nSentiment:`); its fields name the columns it reads. The
target column defaults to the first of TARGET_COLUMNS present, so a prompt/completion JSONL (TRL's and OpenAI's
format) needs no flag at all: the template defaults to `{prompt}`, or to the one column besides the target.

What the train split decides is fixed once by `fit` and recorded in the adapter's task options, so eval, export
and serve see the same task: the input template and target column, the metric (from the target lengths), the
generation budget (the longest target), and for classify the label set and how each label is written (the
verbalizer: `not_entailment=no`).
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

from softtool import metrics
from softtool.data.example import Example, Split
from softtool.data.task_base import Task, answer_texts, cell_text
from softtool.errors import SofttoolError
from softtool.prompts.template import Template

# The target column when --target is not given: the first of these the data has.
TARGET_COLUMNS = ("completion", "output", "target", "answer", "label")
# Columns that never hold the input (the default template reads the one column left besides these and the target).
_NOT_INPUT = ("id", "idx", "index")
TEXT_METRICS = ("exact_match", "f1", "bleu", "chrf", "rougeL", "accuracy")
# Rank classification scores every label for every example; beyond this many labels, generate the label instead.
MAX_LABELS = 64
# The longest generation budget `fit` derives from the train targets (--max-new-tokens may go further).
MAX_DERIVED_BUDGET = 512


def default_metric(references: Sequence[str]) -> str:
    """The metric that suits targets of these lengths: exact match for one or two words, SQuAD-style token F1 for
    short answers (exact match beside it), ROUGE-L for long or multi-line ones."""
    words = statistics.mean(len(r.split()) for r in references)
    if any("\n" in r for r in references) or words > 12:
        return "rougeL"
    return "exact_match" if words <= 1.5 else "f1"


@dataclass(frozen=True)
class TextOptions:
    """What a `text` task is: recorded in the adapter's task options, so every command rebuilds the same task."""

    # The input template without virtual tokens, e.g. "Review: {sentence}\nSentiment:" (the CLI's --template).
    input: str = field(default="", metadata={"cli": False, "help": "the input template, without virtual tokens"})
    target: str = field(
        default="",
        metadata={
            "help": "text/classify: the column to produce (default: the first of " + ", ".join(TARGET_COLUMNS) + ")"
        },
    )
    metric: str = field(
        default="",
        metadata={
            "help": "text: the main score (default: exact_match for one-word targets, f1 for short ones, rougeL for "
            "long or multi-line ones)",
            "choices": ("", *TEXT_METRICS),
            "show_default": False,
        },
    )
    max_target_tokens: int = field(
        default=0,
        metadata={
            "help": "text/classify: the generation budget (0: the longest train target, plus EOS)",
            "flag": "--max-new-tokens",
            "min": 0,
        },
    )
    truncate: str = field(
        default="",
        metadata={"help": "text/classify: the field shortened when an input is too long (default: the first)",
                  "flag": "--truncate-field"},
    )  # fmt: skip
    multiline: bool = field(default=False, metadata={"cli": False, "help": "targets span lines"})
    chat_template: bool = field(
        default=False,
        metadata={"help": "text/classify: wrap the input as the user turn of the tokenizer's chat template"},
    )
    instruction: str = field(
        default="",
        metadata={
            "help": "text/classify: the discrete baseline's instruction (default: one naming the target or labels)"
        },
    )

    def __post_init__(self) -> None:
        if self.metric and self.metric not in TEXT_METRICS:
            raise ValueError(f"metric {self.metric!r} is not one of {', '.join(TEXT_METRICS)}")
        if self.max_target_tokens < 0:
            raise ValueError(f"max_target_tokens must be >= 0, got {self.max_target_tokens}")
        if self.input:
            template = Template.parse(self.input)
            if template.num_virtual_tokens:
                raise ValueError(f"input {self.input!r} holds virtual tokens; the input is the text around them")
            if self.truncate and self.truncate not in template.fields:
                raise ValueError(f"truncate field {self.truncate!r} is not a field of the template {self.input!r}")


@dataclass(frozen=True)
class ClassifyOptions(TextOptions):
    """A `text` task whose target is one of `labels`, written as `verbalizer[label]` (the label itself if absent)."""

    labels: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "classify: the label set, in order (default: the train split's labels, sorted)",
            "type": list[str],
        },
    )
    # label -> the text the model reads and writes for it (the label itself when absent); the CLI's --verbalizer.
    verbalizer: Mapping[str, str] = field(default_factory=dict, metadata={"cli": False, "help": "label -> text"})

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        object.__setattr__(self, "verbalizer", {str(k): str(v) for k, v in dict(self.verbalizer).items()})
        if self.metric and self.metric != "accuracy":
            raise ValueError(f"a classify task is scored by accuracy (and macro-F1), not {self.metric!r}")
        check_labels(self.labels, self.verbalizer, where="--labels")


def check_labels(labels: Sequence[str], verbalizer: Mapping[str, str], where: str) -> None:
    """ValueError for duplicate, empty or too many labels, a verbalizer entry for no label, or two labels written
    the same way (rank classification could not tell them apart)."""
    if len(set(labels)) != len(labels):
        dupes = sorted(k for k, n in Counter(labels).items() if n > 1)
        raise ValueError(f"{where}: label(s) {dupes} given twice")
    if any(not label.strip() for label in labels):
        raise ValueError(f"{where}: a label is empty")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{where}: {len(labels)} labels, more than the {MAX_LABELS} rank classification scores")
    if labels:
        unknown = sorted(set(verbalizer) - set(labels))
        if unknown:
            raise ValueError(f"--verbalizer names {unknown}, which are not labels (labels: {list(labels)})")
    empty = sorted(k for k, v in verbalizer.items() if not v.strip())
    if empty:
        raise ValueError(f"--verbalizer writes {empty} as empty text")
    written: dict[str, str] = {}
    for label in labels:
        text = verbalizer.get(label, label).strip()
        if text in written:
            raise ValueError(f"--verbalizer: labels {written[text]!r} and {label!r} are both written {text!r}")
        written[text] = label


def parse_verbalizer(text: str | None) -> dict[str, str]:
    """`not_entailment=no,entailment=yes` -> {"not_entailment": "no", "entailment": "yes"}."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        label, sep, word = part.partition("=")
        if not sep or not label.strip():
            raise SofttoolError(f"--verbalizer {text!r}: write LABEL=TEXT pairs separated by commas, e.g. 0=no,1=yes")
        out[label.strip()] = word.strip()
    return out


class TextTask(Task):
    """Text-to-text on the user's columns (see the module docstring)."""

    name = "text"
    options_type: ClassVar[type[TextOptions]] = TextOptions

    def __init__(self, options: TextOptions) -> None:
        self._options = options
        self.input_text = options.input
        self.fields = tuple(Template.parse(options.input).fields) if options.input else ()
        self.truncate_field = options.truncate or (self.fields[0] if self.fields else "")
        self.max_target_tokens = options.max_target_tokens or MAX_DERIVED_BUDGET
        self.main_metric = options.metric or "f1"
        self.instruction = options.instruction or self.default_instruction()

    @property
    def options(self) -> dict[str, Any]:
        return asdict(self._options)

    @property
    def task_options(self) -> TextOptions:
        return self._options

    @property
    def chat_template(self) -> bool:
        return self._options.chat_template

    @property
    def is_fitted(self) -> bool:
        return bool(self._options.input and self._options.target and self._options.metric)

    def default_instruction(self) -> str:
        target = self._options.target or "answer"
        return f"Write the {target.replace('_', ' ')}."

    # -- records -> examples ----------------------------------------------------------------------
    def column_choices(self) -> dict[str, tuple[str, ...]]:
        choices = {f: (f,) for f in self.fields}
        choices["target"] = (self._options.target,) if self._options.target else TARGET_COLUMNS
        return choices

    def resolve_columns(self, available: Sequence[str], where: str) -> dict[str, str]:
        """Each template field is the column of that name; the target is --target or the first of TARGET_COLUMNS;
        without a template the input is `prompt`, or the one column left. One line names what is missing."""
        available = list(available)
        target = self._options.target or next((c for c in TARGET_COLUMNS if c in available), "")
        if not target or target not in available:
            wanted = repr(target) if target else "any of " + ", ".join(TARGET_COLUMNS)
            raise SofttoolError(
                f"{where}: no target column {wanted}; it has columns {available}; name the output with --target"
            )
        fields = self.fields or (self._default_input(available, target, where),)
        missing = [f for f in fields if f not in available]
        if missing:
            raise SofttoolError(
                f"{where}: --template field(s) {', '.join('{' + f + '}' for f in missing)} are not columns; "
                f"it has columns {available}"
            )
        if target in fields:
            raise SofttoolError(f"{where}: the target column {target!r} is also an input field of the template")
        return {**{f: f for f in fields}, "target": target}

    @staticmethod
    def _default_input(available: Sequence[str], target: str, where: str) -> str:
        if "prompt" in available:
            return "prompt"
        rest = [c for c in available if c != target and c not in _NOT_INPUT]
        if len(rest) == 1:
            return rest[0]
        raise SofttoolError(
            f"{where}: columns {list(available)}: say which the model reads with --template, "
            f"e.g. --template '{{{rest[0] if rest else 'text'}}}\\nAnswer:'"
        )

    def make_example(self, record: Mapping[str, Any], columns: Mapping[str, str], index: int) -> Example | None:
        """The Example of one record; None when an input field is empty (counted, as for every task). An empty
        target is an error: the user's own data should not lose rows silently."""
        references = _references(record.get(columns["target"]))
        if not references:
            raise SofttoolError(
                f"record {index + 1}: the target column {columns['target']!r} is empty or missing; fill or remove it"
            )
        values = {key: cell_text(record.get(col)) for key, col in columns.items() if key != "target"}
        if any(not v.strip() for v in values.values()):
            return None
        return Example(cell_text(record.get("id")) or str(index), values, references)

    # -- fitting to the train split ------------------------------------------------------------------
    def fit(self, split: Split, tokenizer) -> TextTask:
        """This task with what the train split decides filled in (the options left empty)."""
        opts = self._options
        targets = [ex.target for ex in split.examples]
        fields = [k for k in split.columns if k != "target"]
        fitted = type(self)(
            replace(
                opts,
                input=opts.input or "{" + fields[0] + "}",
                target=opts.target or split.columns["target"],
                metric=opts.metric or self._default_metric(targets),
                multiline=self._multiline(targets),
            )
        )
        if opts.max_target_tokens:
            return fitted
        return type(self)(replace(fitted.task_options, max_target_tokens=fitted._budget(tokenizer, targets)))

    def _default_metric(self, targets: Sequence[str]) -> str:
        return default_metric(targets)

    def _multiline(self, targets: Sequence[str]) -> bool:
        return self._options.multiline or any("\n" in t for t in targets)

    def _budget(self, tokenizer, targets: Sequence[str]) -> int:
        """The longest target in tokens, plus its EOS (at most MAX_DERIVED_BUDGET)."""
        longest = max(
            len(tokenizer(self.separator + t.strip(), add_special_tokens=False)["input_ids"]) for t in targets
        )
        return min(MAX_DERIVED_BUDGET, longest + 1)

    # -- outputs ---------------------------------------------------------------------------------------
    def target_text(self, example: Example) -> str:
        return self.separator + example.target.strip()

    @property
    def separator(self) -> str:
        """What goes between the input and the target: nothing when the input ends in whitespace (a prompt ending
        in a newline) or is a chat template's user turn (the assistant's turn starts on a new line), else a space."""
        return "" if self._options.chat_template or self.input_text[-1:].isspace() else " "

    def postprocess(self, generated: str) -> str:
        if self._options.multiline:
            return "\n".join(line.strip() for line in generated.strip().splitlines() if line.strip())
        return super().postprocess(generated)

    def score(self, predictions, references):
        metric = self.main_metric
        if metric in ("exact_match", "f1"):
            out: dict[str, Any] = dict(metrics.squad_scores(predictions, references))
        elif metric == "rougeL":
            out = dict(metrics.rouge(predictions, references))
        elif metric == "accuracy":
            out = {"accuracy": metrics.accuracy(predictions, references)}
        else:
            out = {}
        if metric in ("chrf", "bleu"):
            score, signature = metrics.chrf(predictions, references)
            out.update({"chrf": score, "chrf_signature": signature})
        out.update(self._bleu(predictions, references))
        out["loop_share"] = metrics.loop_share(predictions)
        out["n"] = len(predictions)
        return out

    def __repr__(self) -> str:
        return f"get_task({self.name!r}, **{self.options!r})"


class ClassifyTask(TextTask):
    """A text task whose target is one of a label set, scored by rank classification (softtool.classify)."""

    name = "classify"
    options_type = ClassifyOptions
    main_metric = "accuracy"

    def __init__(self, options: ClassifyOptions) -> None:
        super().__init__(options)
        self.main_metric = "accuracy"
        self.labels: tuple[str, ...] = options.labels
        self.max_target_tokens = options.max_target_tokens or 16

    @property
    def is_fitted(self) -> bool:
        return super().is_fitted and bool(self.labels)

    def default_instruction(self) -> str:
        if not self._options.labels:
            return "Answer with the label."
        return "Answer with one of: " + ", ".join(self.verbalize(label) for label in self._options.labels) + "."

    def verbalize(self, label: str) -> str:
        """The text the model reads and writes for `label`."""
        return self._options.verbalizer.get(label, label).strip()

    def label_of(self, text: str) -> str | None:
        """The label written as `text` (after postprocessing), or None."""
        text = text.strip()
        return next((label for label in self.labels if self.verbalize(label) == text), None)

    def make_example(self, record, columns, index):
        example = super().make_example(record, columns, index)
        if example is not None and len(example.references) > 1:
            raise SofttoolError(
                f"record {index + 1}: the label column {columns['target']!r} holds {len(example.references)} values; "
                "a classify task needs one label per row"
            )
        return example

    def fit(self, split: Split, tokenizer) -> ClassifyTask:
        """The label set (--labels, or the train split's labels sorted), checked, then TextTask.fit."""
        opts = self._options
        counts = Counter(ex.target.strip() for ex in split.examples)
        column = opts.target or split.columns["target"]
        if opts.labels:
            unknown = {k: n for k, n in counts.items() if k not in opts.labels}
            if unknown:
                raise SofttoolError(
                    f"{split.source}: column {column!r} has label(s) {sorted(unknown)} ({sum(unknown.values())} rows) "
                    f"that --labels {','.join(opts.labels)} does not name"
                )
        labels = opts.labels or tuple(sorted(counts))
        if len(labels) < 2:
            raise SofttoolError(
                f"{split.source}: column {column!r} holds {len(labels)} class(es) {list(labels)}; "
                "classification needs two or more (--labels names them)"
            )
        try:
            check_labels(labels, opts.verbalizer, where=f"{split.source}: column {column!r}")
        except ValueError as exc:
            raise SofttoolError(str(exc)) from exc
        return TextTask.fit(type(self)(replace(opts, labels=labels)), split, tokenizer)

    def _default_metric(self, targets: Sequence[str]) -> str:
        return "accuracy"

    def _multiline(self, targets: Sequence[str]) -> bool:
        return False

    def _budget(self, tokenizer, targets: Sequence[str]) -> int:
        """The longest label in tokens, plus its EOS."""
        return 1 + max(len(ids) for ids in self.label_token_ids(tokenizer))

    def label_token_ids(self, tokenizer, eos: bool = False) -> list[list[int]]:
        """Each label's token ids as it follows the input (the target text, tokenized on its own as in training),
        with the EOS id appended when `eos`."""
        out = []
        for label in self.labels:
            ids = list(tokenizer(self.separator + self.verbalize(label), add_special_tokens=False)["input_ids"])
            out.append(ids + ([tokenizer.eos_token_id] if eos else []))
        return out

    def target_text(self, example: Example) -> str:
        label = example.target.strip()
        return self.separator + (self.verbalize(label) if label in self.labels else label)

    def postprocess(self, generated: str) -> str:
        """The label a generated text names (the text itself when it names none)."""
        text = super().postprocess(generated)
        return self.label_of(text) or text

    def unseen_labels(self, split: Split) -> dict[str, int]:
        """Labels of `split` the task does not know, with their row counts (such rows always count as wrong)."""
        counts = Counter(ex.target.strip() for ex in split.examples)
        return {label: n for label, n in sorted(counts.items()) if label not in self.labels}

    def demonstrations(self, examples: Sequence[Example], k: int, seed: int = 0) -> list[Example]:
        """k demonstrations for a k-shot prompt, class-balanced (labels in turn, the rarest classes first when k is
        not a multiple) and drawn with `seed`, then shuffled so no label sits always last."""
        rng = random.Random(seed)
        by_label: dict[str, list[Example]] = {label: [] for label in self.labels}
        for ex in examples:
            by_label.setdefault(ex.target.strip(), []).append(ex)
        pools = {
            label: rng.sample(pool, len(pool)) for label, pool in by_label.items() if pool and label in self.labels
        }
        order = sorted(pools, key=lambda label: (len(pools[label]), self.labels.index(label)))
        picked: list[Example] = []
        while len(picked) < k and any(pools.values()):
            for label in order:
                if pools[label] and len(picked) < k:
                    picked.append(pools[label].pop())
        rng.shuffle(picked)
        return picked

    def score(self, predictions, references):
        out: dict[str, Any] = dict(metrics.classification_scores(predictions, [r[0] for r in references], self.labels))
        out["n"] = len(predictions)
        return out

    def sentence_scores(self, prediction: str, references: Sequence[str]) -> dict[str, Any]:
        return {"correct": prediction.strip() == references[0].strip()}


def _references(value: Any) -> list[str]:
    """The target's references: a text, a list of texts (or SQuAD's answer records), or a number or boolean label."""
    if value is None or isinstance(value, str | list | tuple | Mapping):
        return answer_texts(value)
    text = cell_text(value).strip()
    return [text] if text else []


def make_user_task(name: str, options: Mapping[str, Any]) -> TextTask:
    """The text or classify task with these options (as recorded in an adapter, or given on the command line)."""
    cls = ClassifyTask if name == "classify" else TextTask
    known = {f for f in cls.options_type.__dataclass_fields__}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SofttoolError(f"task {name} has no option(s) {unknown}; its options are {sorted(known)}")
    try:
        return cls(cls.options_type(**dict(options)))
    except (TypeError, ValueError) as exc:
        raise SofttoolError(f"task {name}: {exc}") from exc
