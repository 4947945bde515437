"""The benchmark workload: the examples, their token rows (virtual ids included), and the soft prompt.

Every backend is fed from the same `Workload`, so they all see identical ids: the text pieces of each
example are tokenized separately and joined with the virtual-token blocks, the layout training and
inference use (softtool.prompts.template). Backends that take text-only input (PEFT, plain
transformers) get the same rows with the virtual ids removed.

Without an adapter, an untrained prompt is made (vocabulary init): generation speed does not depend
on what the prompt has learned, so the speed comparison still runs before any training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softtool.bench.options import BenchOptions
from softtool.errors import SofttoolError

# Prefix templates for an untrained prompt when the data package has no task template to offer.
FALLBACK_TEMPLATES = {
    "translation": "[P:{n}]English: {{source}}\nGerman:",
    "squad": "[P:{n}]Context: {{context}}\nQuestion: {{question}}\nAnswer:",
    "cnndm": "[P:{n}]Article: {{article}}\nSummary:",
}
# The single template field of inline `inputs`, per task.
INLINE_FIELD = {"translation": "source", "cnndm": "article"}


@dataclass
class Workload:
    """What every backend generates for: rows of ids, the text-only rows, and the references."""

    rows: list[list[int]]  # full ids, virtual ids V + t*N + j included
    pieces: list[list[list[int]]]  # per row, the ids of each text slot (what softtool.runtime takes)
    text_rows: list[list[int]]  # the same rows without virtual ids (for PEFT and plain transformers)
    references: list[list[str]]
    adapter_dir: Path
    template: str
    num_virtual_tokens: int
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    untrained: bool
    data_source: str
    notes: list[str] = field(default_factory=list)
    # Decoding every backend applies (no_repeat_ngram_size, repetition_penalty): the adapter's task defaults,
    # then the bench's options. The hf rows get the same, so every row does the same kind of work.
    decoding: dict[str, Any] = field(default_factory=dict)

    def batches(self, batch_size: int) -> list[range]:
        return [range(i, min(i + batch_size, len(self.rows))) for i in range(0, len(self.rows), batch_size)]


def _data_api():
    """softtool.data's task API, or None while it is not installed in this build."""
    try:
        from softtool.data import encode_example, get_task, load_split  # noqa: F401
    except ImportError:
        return None
    import softtool.data as data

    return data


def get_task(options_task: str, task_options: dict[str, Any] | None = None):
    data = _data_api()
    if data is None:
        return None
    kwargs = dict(task_options or {})
    if options_task == "translation":
        kwargs.setdefault("src", "en")
        kwargs.setdefault("tgt", "de")
    return data.get_task(options_task, **kwargs)


def default_template(task_name: str, task: Any, n: int) -> str:
    if task is not None:
        return str(task.default_template(n))
    return FALLBACK_TEMPLATES[task_name].format(n=n)


def make_untrained_adapter(options: BenchOptions, model, out_dir: Path, template: str) -> Path:
    """An untrained prompt (softtool's default vocabulary init, seeded) saved as a normal adapter folder."""
    from softtool.adapter import Adapter, AdapterMeta, save_adapter
    from softtool.prompts.encoder import PromptConfig, initial_table
    from softtool.prompts.template import Template

    n = Template.parse(template).num_virtual_tokens
    embed = model.get_input_embeddings().weight
    table = initial_table(
        PromptConfig(num_virtual_tokens=n, init="vocab"), model.get_input_embeddings(), seed=options.seed
    )
    meta = AdapterMeta(
        base_model=options.model,
        num_virtual_tokens=n,
        token_dim=embed.shape[1],
        vocab_size=embed.shape[0],
        template=template,
        task=options.task,
        init="vocab",
        task_options={"src": "en", "tgt": "de"} if options.task == "translation" else {},
    )
    return save_adapter(out_dir, Adapter(table, meta), model.config)


def default_cache_dir(options: BenchOptions) -> Path:
    from softtool.models import cache_dir

    return Path(options.cache_dir) if options.cache_dir else cache_dir() / "bench"


def prepare_adapter(options: BenchOptions, model, tokenizer) -> tuple[Path, bool, Any]:
    """The adapter folder to benchmark (the user's, or a fresh untrained one) and the task object."""
    from softtool.adapter import check_compatible, load_adapter

    if options.adapter:
        adapter = load_adapter(options.adapter)
        check_compatible(adapter, model)
        if adapter.meta.task not in (options.task, "generic"):
            raise SofttoolError(f"adapter {options.adapter} is for task {adapter.meta.task}, not --task {options.task}")
        return Path(options.adapter), False, get_task(options.task, adapter.meta.task_options)
    task = get_task(options.task)
    template = options.template or default_template(options.task, task, options.num_virtual_tokens)
    # "init-v2": the product's vocab init (ids below 5000); earlier caches drew from the whole vocabulary.
    key = hashlib.sha1(json.dumps([options.model, template, options.seed, "init-v2"]).encode()).hexdigest()[:12]
    out = default_cache_dir(options) / f"untrained-{key}"
    if not (out / "adapter_model.safetensors").is_file():
        make_untrained_adapter(options, model, out, template)
    return out, True, task


def _examples(options: BenchOptions, task: Any) -> tuple[list[dict[str, str]], list[list[str]], str, list[Any]]:
    """Template fields and references of the first `limit` examples, plus the raw examples if any."""
    if options.inputs is not None:
        name = task.fields[0] if task is not None and len(task.fields) == 1 else INLINE_FIELD.get(options.task)
        if name is None:
            raise SofttoolError(f"inline `inputs` support tasks {sorted(INLINE_FIELD)}; use `data` for {options.task}")
        inputs = options.inputs[: options.limit]
        refs = [[r] for r in (options.references or [""] * len(options.inputs))[: options.limit]]
        return [{name: text} for text in inputs], refs, "inline inputs", []
    data = _data_api()
    if data is None:
        raise SofttoolError("reading a data folder needs softtool.data, which this build lacks; give inline `inputs`")
    split = data.load_split(options.data, options.split, task=task, limit=options.limit)
    if not split.examples:
        raise SofttoolError(f"{options.data}: split {options.split!r} has no examples")
    examples = split.examples[: options.limit]
    return [ex.fields for ex in examples], [ex.references for ex in examples], split.source or options.data, examples


def build_workload(options: BenchOptions, model, tokenizer) -> Workload:
    """Tokenize the workload once; every backend gets the same rows."""
    from softtool.adapter import load_adapter
    from softtool.prompts.template import Template, assemble_ids
    from softtool.search import DECODING_OFF

    adapter_dir, untrained, task = prepare_adapter(options, model, tokenizer)
    adapter = load_adapter(adapter_dir)
    template = Template.parse(adapter.meta.template)
    if not template.is_prefix and any(b.startswith("peft") for b in options.backends):
        raise SofttoolError(
            f"adapter template {template} is not a prefix template; PEFT only prepends prompts: drop the peft backend"
        )
    vocab = model.get_input_embeddings().weight.shape[0]
    fields_list, references, source, examples = _examples(options, task)
    data = _data_api()
    rows, text_rows, all_pieces = [], [], []
    for i, example_fields in enumerate(fields_list):
        if examples and data is not None:
            # The data package's encoding, truncation included, exactly as training and eval use it.
            enc = data.encode_example(tokenizer, template, task, examples[i], max_length=512, with_target=False)
            pieces = enc.pieces
        else:
            pieces = [
                tokenizer(text, add_special_tokens=False)["input_ids"] for text in template.render(example_fields)
            ]
        all_pieces.append([list(p) for p in pieces])
        rows.append(assemble_ids(template, pieces, vocab, 0))
        text_rows.append([t for piece in pieces for t in piece])
    decoding = dict(adapter.meta.decoding)  # an untrained prompt records none: speed only, plain greedy
    for name in DECODING_OFF:
        if getattr(options, name) is not None:
            decoding[name] = getattr(options, name)
    notes = []
    if untrained:
        notes.append("no adapter given: an untrained prompt (vocab init) was used; speed is valid, metrics are not")
    return Workload(
        rows=rows,
        pieces=all_pieces,
        text_rows=text_rows,
        references=references,
        adapter_dir=adapter_dir,
        template=str(template),
        num_virtual_tokens=template.num_virtual_tokens,
        vocab_size=vocab,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        untrained=untrained,
        data_source=str(source),
        notes=notes,
        decoding=decoding,
    )


def score(options: BenchOptions, task: Any, predictions: list[str], references: list[list[str]]) -> dict[str, Any]:
    """The task metric: the data package's scorer, or sacreBLEU for translation while it is missing."""
    if not any(r and r[0] for r in references):
        return {}
    if task is not None:
        return dict(task.score(predictions, references))
    if options.task == "translation":
        import sacrebleu

        return {"bleu": sacrebleu.corpus_bleu(predictions, [[r[0] for r in references]]).score}
    return {}


def main_metric(options: BenchOptions, task: Any) -> str | None:
    if task is not None:
        return getattr(task, "main_metric", None)
    return "bleu" if options.task == "translation" else None
