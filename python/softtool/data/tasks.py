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

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from softtool import metrics
from softtool.data.example import Example
from softtool.data.task_base import Task
from softtool.data.user_tasks import make_user_task
from softtool.errors import SofttoolError

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
