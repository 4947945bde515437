"""The tasks: how an input is phrased, what the model must produce, and how it is scored.

    squad        context + question -> answer       exact match, F1 (SQuAD v1.1), BLEU
    squad-qg     context + answer -> question       BLEU
    cnndm        article -> highlights              ROUGE-1/2/L(sum), BLEU
    translation  source -> target (src/tgt codes)   BLEU, chrF (sacrebleu, with signatures)
    text         your template -> your target       exact match/F1, BLEU, chrF, ROUGE-L or accuracy
    classify     your template -> one of the labels accuracy, macro-F1 (rank classification)

The last two are the user's own tasks (softtool.data.user_tasks): their template, columns and labels are options.

A task also turns a reader's record (a dict of columns) into an Example, accepting the column
names the common formats use (SQuAD JSON, the Hugging Face datasets, CSV/JSONL with named columns).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from softtool import metrics
from softtool.data.example import Example
from softtool.errors import SofttoolError
from softtool.prompts.template import Template

LANGUAGES = {
    "ar": "Arabic",
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "et": "Estonian",
    "fi": "Finnish",
    "fr": "French",
    "hi": "Hindi",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "lv": "Latvian",
    "nl": "Dutch",
    "pl": "Polish",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "zh": "Chinese",
}


@dataclass(frozen=True)
class TranslationOptions:
    """Options of the translation task."""

    src: str = field(
        default="en", metadata={"help": "source language code (e.g. en); also the source column/file suffix"}
    )
    tgt: str = field(
        default="de", metadata={"help": "target language code (e.g. de); also the target column/file suffix"}
    )

    def __post_init__(self) -> None:
        for side, code in (("src", self.src), ("tgt", self.tgt)):
            if code not in LANGUAGES:
                raise ValueError(f"{side}={code!r} is not a known language code; use one of {sorted(LANGUAGES)}")
        if self.src == self.tgt:
            raise ValueError(f"src and tgt are both {self.src!r}; translation needs two different languages")


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
        values = {key: _text(record.get(col)) for key, col in columns.items() if key != "answers"}
        if any(not v.strip() for v in values.values()):
            return None
        answers = _answers(record.get(columns["answers"])) if "answers" in columns else []
        if "answers" in columns and not answers:
            return None
        example_id = _text(record.get("id")) or str(index)
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


# SQuAD records (JSON, the Hugging Face dataset, CSV/JSONL), read by both SQuAD tasks.
_SQUAD_COLUMNS = {"context": ("context",), "question": ("question",), "answers": ("answers", "answer")}


class SquadTask(Task):
    name = "squad"
    fields = ("context", "question")
    main_metric = "f1"
    truncate_field = "context"
    max_target_tokens = 32
    instruction = "Answer the question with a short span copied from the context."
    input_text = "Context: {context}\nQuestion: {question}\nAnswer:"
    columns = _SQUAD_COLUMNS
    # None: an answer copies a span of the context, which n-gram blocking and repetition penalties forbid. On 50
    # SQuAD dev questions (SmolLM2, benchmarks/results/quality_squad_smollm2-135m.json) F1 fell from 58.9 to
    # 35.1 with no repeated 3-grams and to 34.4 with a repetition penalty of 1.2.
    decoding: ClassVar[dict[str, Any]] = {}

    def _example(self, example_id, values, answers):
        return Example(example_id, {"context": values["context"], "question": values["question"]}, answers)

    def _metrics(self, predictions, references):
        return metrics.squad_scores(predictions, references)


class SquadQuestionGenerationTask(Task):
    name = "squad-qg"
    fields = ("context", "answer")
    main_metric = "bleu"
    truncate_field = "context"
    max_target_tokens = 48
    instruction = "Write the question that the answer answers, given the context."
    input_text = "Context: {context}\nAnswer: {answer}\nQuestion:"
    columns = _SQUAD_COLUMNS

    def _example(self, example_id, values, answers):
        # Every gold answer of a SQuAD question is a span for the same question; the first is the input.
        return Example(example_id, {"context": values["context"], "answer": answers[0]}, [values["question"]])


class CnnDmTask(Task):
    name = "cnndm"
    fields = ("article",)
    main_metric = "rougeL"
    truncate_field = "article"
    max_target_tokens = 96
    instruction = "Summarize the news article in three short sentences, one per line."
    input_text = "Article: {article}\nSummary:"
    columns = {"article": ("article", "document"), "highlights": ("highlights", "summary")}
    # On 30 CNN/DM dev articles (SmolLM2, benchmarks/results/quality_cnndm_smollm2-135m.json) blocking repeated
    # 3-grams took the loop share from 3.3% to 0% at the same ROUGE-L (19.03 vs 19.09, within the 0.5-point
    # margin); a repetition penalty of 1.2 halved ROUGE-L (9.8).
    decoding: ClassVar[dict[str, Any]] = {"no_repeat_ngram_size": 3}

    def _example(self, example_id, values, answers):
        highlights = "\n".join(line.strip() for line in values["highlights"].strip().splitlines() if line.strip())
        return Example(example_id, {"article": values["article"]}, [highlights])

    def postprocess(self, generated: str) -> str:
        # Newlines separate summary sentences (rougeLsum needs them); drop blank lines only.
        return "\n".join(line.strip() for line in generated.strip().splitlines() if line.strip())

    def _metrics(self, predictions, references):
        return metrics.rouge(predictions, references)


class TranslationTask(Task):
    name = "translation"
    fields = ("source",)
    main_metric = "bleu"
    truncate_field = "source"
    # German takes about twice the tokens of its English source in SmolLM2's vocabulary: 96 covers every Multi30k target
    # (longest 95 tokens + EOS); see benchmarks/results/data_stats.json.
    max_target_tokens = 96
    # Chosen on 50 Multi30k val sentences (Gemma 3 270M, benchmarks/results/quality_translation_gemma3-270m.json):
    # blocking repeated 3-grams raised BLEU from 7.5 to 9.0 and the loop share from 2% to 0%; a repetition
    # penalty of 1.2 lowered BLEU to 5.4.
    decoding: ClassVar[dict[str, Any]] = {"no_repeat_ngram_size": 3}

    def __init__(self, options: TranslationOptions) -> None:
        self._options = options
        src, tgt = LANGUAGES[options.src], LANGUAGES[options.tgt]
        self.instruction = f"Translate the {src} sentence into {tgt}."
        self.input_text = f"{src}: {{source}}\n{tgt}:"
        # sacrebleu's 13a tokenizer splits on spaces; Chinese needs its own segmentation.
        self._bleu_tokenize = "zh" if options.tgt == "zh" else "13a"

    @property
    def src(self) -> str:
        return self._options.src

    @property
    def tgt(self) -> str:
        return self._options.tgt

    @property
    def options(self):
        return asdict(self._options)

    def column_choices(self):
        return {"source": (self.src, "source", "src"), "target": (self.tgt, "target", "tgt")}

    def _example(self, example_id, values, answers):
        return Example(example_id, {"source": values["source"].strip()}, [values["target"].strip()])

    def score(self, predictions, references):
        out = self._bleu(predictions, references)
        score, signature = metrics.chrf(predictions, references)
        out.update({"chrf": score, "chrf_signature": signature, "loop_share": metrics.loop_share(predictions)})
        out["n"] = len(predictions)
        return out


_TASKS: dict[str, type[Task]] = {
    "squad": SquadTask,
    "squad-qg": SquadQuestionGenerationTask,
    "cnndm": CnnDmTask,
    "translation": TranslationTask,
}
USER_TASKS = ("text", "classify")  # the user's own tasks (softtool.data.user_tasks)
TASK_NAMES = (*_TASKS, *USER_TASKS)


def get_task(name: str, **options: Any) -> Task:
    """The task `name` (see the module docstring). translation takes src and tgt; text and classify their
    TextOptions / ClassifyOptions (softtool.data.user_tasks)."""
    if name in USER_TASKS:
        from softtool.data.user_tasks import make_user_task

        return make_user_task(name, options)
    if name not in _TASKS:
        raise SofttoolError(f"--task {name!r} is not a task; use one of {', '.join(TASK_NAMES)}")
    if name == "translation":
        try:
            return TranslationTask(TranslationOptions(**options))
        except TypeError as exc:
            raise SofttoolError(f"task translation: {exc}; its options are src and tgt") from exc
        except ValueError as exc:
            raise SofttoolError(f"task translation: {exc}") from exc
    if options:
        raise SofttoolError(f"task {name} takes no options, got {sorted(options)}")
    return _TASKS[name]()


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _answers(value: Any) -> list[str]:
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
        text = _text(item.get("text") if isinstance(item, Mapping) else item).strip()
        if text and text not in texts:
            texts.append(text)
    return texts
