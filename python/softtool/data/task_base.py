"""The base of every task: what a task provides (columns, templates, targets, scores), and how a record's cells
become text and gold answers. The tasks themselves are in softtool.data.tasks (the built-in ones) and
softtool.data.user_tasks (the user's own)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from softtool import metrics
from softtool.data.example import Example
from softtool.errors import SofttoolError
from softtool.prompts.template import Template


class Task:
    """What every task provides; see the module docstring for the four tasks."""

    name: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]  # template fields an Example carries
    main_metric: ClassVar[str]
    truncate_field: ClassVar[str]  # the long input field cut when the input is too long
    max_target_tokens: ClassVar[int]  # generation budget
    instruction: str  # the discrete instruction of the baseline prompt
    input_text: str  # the input format, with {field} placeholders, ending where the output starts
    columns: ClassVar[dict[str, tuple[str, ...]]]  # what column_choices returns, for a task with fixed columns
    # Decoding defaults (SearchOptions fields: no_repeat_ngram_size, repetition_penalty) chosen on the dev split
    # by benchmarks/quality.py; training records them in softtool.json, export in each task's entry, and
    # eval/generate/serve apply them unless told otherwise.
    decoding: ClassVar[dict[str, Any]] = {}

    @property
    def options(self) -> dict[str, Any]:
        """The task's options, as saved in the adapter metadata (task_options)."""
        return {}

    # -- records -> examples ------------------------------------------------------------------
    def column_choices(self) -> dict[str, tuple[str, ...]]:
        """For each value the task needs, the column names accepted for it (first found wins)."""
        return dict(self.columns)

    def resolve_columns(self, available: Sequence[str], where: str) -> dict[str, str]:
        """Map each needed value to a column of `available`; SofttoolError names what is missing."""
        chosen: dict[str, str] = {}
        missing: list[str] = []
        for key, choices in self.column_choices().items():
            found = next((c for c in choices if c in available), None)
            if found is None:
                missing.append(" or ".join(repr(c) for c in choices))
            else:
                chosen[key] = found
        if missing:
            raise SofttoolError(
                f"{where}: missing column(s) {', '.join(missing)} for task {self.name}; "
                f"it has {sorted(available)}; rename the columns or pick the right --task"
            )
        return chosen

    def make_example(self, record: Mapping[str, Any], columns: Mapping[str, str], index: int) -> Example | None:
        """The Example for one record, or None when a needed value is empty (the reader counts it)."""
        values = {key: cell_text(record.get(col)) for key, col in columns.items() if key != "answers"}
        if any(not v.strip() for v in values.values()):
            return None
        answers = answer_texts(record.get(columns["answers"])) if "answers" in columns else []
        if "answers" in columns and not answers:
            return None
        example_id = cell_text(record.get("id")) or str(index)
        return self._example(example_id, values, answers)

    def _example(self, example_id: str, values: dict[str, str], answers: list[str]) -> Example:
        raise NotImplementedError

    # -- templates ------------------------------------------------------------------------------
    def default_template(self, num_virtual_tokens: int) -> Template:
        """Prompt tuning's layout: the virtual tokens, then the task's input text."""
        return Template.prefix(num_virtual_tokens, self.input_text)

    @property
    def instruction_prompt(self) -> str:
        """The text the discrete baseline puts before the input: the instruction and its line break (the
        default init text of a soft prompt, which then starts as exactly this prompt)."""
        return self.instruction + "\n"

    def baseline_template(self) -> Template:
        """The discrete-prompt baseline: the instruction prompt, then the input text; no virtual tokens."""
        return Template.parse(self.instruction_prompt + self.input_text)

    def zero_shot_template(self) -> Template:
        return Template.parse(self.input_text)

    def few_shot_template(self, demos: Sequence[Example]) -> Template:
        """The instruction, then each demonstration (input text and its target) and a blank line, then the
        input text: the k-shot prompt of a base model."""
        shots = "".join(self.input_text.format(**ex.fields) + self.target_text(ex) + "\n\n" for ex in demos)
        shots = shots.replace("{", "{{").replace("}", "}}")
        return Template.parse(self.instruction_prompt + shots + self.input_text)

    def check_template(self, template: Template) -> None:
        """SofttoolError unless `template` uses every input field of the task, and no other field."""
        unknown = [f for f in template.fields if f not in self.fields]
        missing = [f for f in self.fields if f not in template.fields]
        if unknown or missing:
            problem = f"field(s) {unknown} are not fields of task {self.name}" if unknown else ""
            if missing:
                uses = ", ".join("{" + f + "}" for f in missing)
                problem += ("; " if problem else "") + f"it does not use the task's input field(s) {uses}"
            raise SofttoolError(
                f"--template {str(template)!r}: {problem}; a {self.name} template needs "
                + " and ".join("{" + f + "}" for f in self.fields)
            )

    # -- outputs --------------------------------------------------------------------------------
    def target_text(self, example: Example) -> str:
        # The input ends with "Answer:" etc.; the tokenizer encodes the following word with its space.
        return " " + example.target.strip()

    def postprocess(self, generated: str) -> str:
        """The prediction from the generated text: stripped and cut at the first newline."""
        return generated.strip().split("\n", 1)[0].strip()

    def score(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
        """The task's own metrics (_metrics), corpus BLEU and its signature, the loop share, then n."""
        out = dict(self._metrics(predictions, references))
        out.update(self._bleu(predictions, references))
        out["loop_share"] = metrics.loop_share(predictions)
        out["n"] = len(predictions)
        return out

    def _metrics(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Mapping[str, Any]:
        """The scores besides BLEU (none unless the task has its own)."""
        return {}

    def sentence_score(self, prediction: str, references: Sequence[str]) -> float:
        """Sentence BLEU (0-100, smoothed, effective order) of one prediction."""
        return metrics.sentence_bleu(prediction, references, tokenize=self._bleu_tokenize)

    def sentence_scores(self, prediction: str, references: Sequence[str]) -> dict[str, Any]:
        """One prediction's scores for predictions.jsonl: sentence BLEU and its sacrebleu signature."""
        score, signature = metrics.sentence_bleu_signed(prediction, references, tokenize=self._bleu_tokenize)
        return {"sentence_bleu": score, "sentence_bleu_signature": signature}

    _bleu_tokenize: ClassVar[str] = "13a"

    def _bleu(self, predictions, references) -> dict[str, Any]:
        score, signature = metrics.bleu(predictions, references, tokenize=self._bleu_tokenize)
        return {"bleu": score, "bleu_signature": signature}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"get_task({self.name!r}{', ' if opts else ''}{opts})"


def cell_text(value: Any) -> str:
    """A record's cell as text: "" for a missing one, a number or boolean written out."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def answer_texts(value: Any) -> list[str]:
    """Gold answers from any common shape, de-duplicated in order, empty ones dropped.

    SQuAD JSON gives [{"text": ...}], the Hugging Face dataset {"text": [...], "answer_start": [...]},
    a CSV cell a string (or a JSON list written as a string).
    """
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError:
                value = [value]
        else:
            value = [value]
    if isinstance(value, Mapping):
        value = value.get("text", [])
        value = [value] if isinstance(value, str) else value
    texts: list[str] = []
    for item in value or []:
        text = cell_text(item.get("text") if isinstance(item, Mapping) else item).strip()
        if text and text not in texts:
            texts.append(text)
    return texts
