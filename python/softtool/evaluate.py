"""Evaluation: generate on a data split with a soft prompt (or a discrete baseline prompt) and score.

Examples are encoded without their target, sorted by length so batches carry little padding,
generated, restored to file order, post-processed by the task and scored. A run writes
DIR/predictions.jsonl (one line per example) and DIR/metrics.json (scores, counts, options, speed).
A classify task ranks its labels instead of generating (softtool.classify): predictions.jsonl also holds each
label's score, metrics.json the classification report, and DIR/confusion.png its confusion matrix; its baselines
add the train split's majority class.

Under torchrun the length-sorted batches are dealt out to the ranks whole, so each batch is generated
exactly as in one process, and the predictions are gathered back in file order: same texts, same scores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from softtool.classify import (
    CONFUSION_PLOT,
    LENGTH_NORMS,
    Ranked,
    majority_label,
    plot_confusion,
    rank,
    warn_unseen_labels,
)
from softtool.distributed import DistributedContext, distributed_context
from softtool.errors import SofttoolError
from softtool.fileio import atomic_write_bytes, atomic_write_json
from softtool.prompts.chat import chat_template
from softtool.runtime.base import Generator, SearchOptions
from softtool.search import DECODING_OFF

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


@dataclass
class EvalOptions:
    """What to evaluate on and how to decode."""

    split: str | None = field(default=None, metadata={"help": "split to evaluate (default: the dev/validation split)"})
    limit: int | None = field(default=None, metadata={"help": "evaluate the first N examples only", "min": 1})
    offset: int = field(
        default=0, metadata={"help": "skip the split's first N examples (e.g. those a setting was chosen on)", "min": 0}
    )
    backend: str = field(
        default="torch", metadata={"help": "generation backend: torch or onnx", "choices": ("torch", "onnx")}
    )
    num_beams: int = field(default=1, metadata={"help": "beam size (1: greedy)", "min": 1})
    batch_size: int = field(
        default=8, metadata={"help": "rows decoded together (the decode loop's slots; beams count)", "min": 1}
    )
    continuous: bool = field(
        default=True,
        metadata={
            "help": "continuous batching: a finished row's slot takes the next example at once (off: static batches)"
        },
    )
    max_new_tokens: int = field(default=0, metadata={"help": "generation budget (0: the task's default)", "min": 0})
    max_length: int = field(
        default=512, metadata={"help": "longest input in tokens incl. virtual tokens and output", "min": 8}
    )
    baseline: bool = field(
        default=False,
        metadata={
            "help": "also evaluate the discrete prompts: the instruction, the bare input, and the instruction through "
            "the model's chat template when its tokenizer has one"
        },
    )
    shots: int = field(
        default=0,
        metadata={"help": "with --baseline, also a k-shot prompt: the instruction and the train split's first k "
                  "examples (classify: k drawn class-balanced with --seed) (0: none)", "min": 0},
    )  # fmt: skip
    instruction: str | None = field(
        default=None,
        metadata={"help": "the baseline's instruction (default: the task's; classify: one naming the labels)"},
    )
    length_norm: str = field(
        default="none",
        metadata={
            "help": "classify: rank labels by their log-likelihood (none), or divided by their length in tokens or "
            "characters",
            "choices": LENGTH_NORMS,
        },
    )
    search: dict[str, Any] = field(
        default_factory=dict,
        metadata={"cli": False, "help": "more SearchOptions fields (sampling, penalties), e.g. {'do_sample': True}"},
    )

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be torch or onnx, got {self.backend!r}")
        if self.num_beams < 1 or self.batch_size < 1:
            raise ValueError("num_beams and batch_size must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be positive, got {self.limit}")
        if self.offset < 0 or self.shots < 0:
            raise ValueError(f"offset and shots must be >= 0, got {self.offset} and {self.shots}")
        if self.max_new_tokens < 0 or self.max_length < 8:
            raise ValueError("max_new_tokens must be >= 0 and max_length >= 8")
        if self.length_norm not in LENGTH_NORMS:
            raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {self.length_norm!r}")
        owned = {"num_beams", "max_new_tokens", "eos_token_ids", "pad_token_id"} & set(self.search)
        if owned:
            raise ValueError(f"search sets {sorted(owned)}, which come from EvalOptions and the tokenizer")
        try:  # SearchOptions checks the combination (e.g. sampling with beams)
            SearchOptions(num_beams=self.num_beams, **self.search)
        except TypeError as exc:
            raise ValueError(f"search: {exc}") from exc

    def search_options(self, tokenizer, max_new_tokens: int, defaults: dict | None = None) -> SearchOptions:
        """The decoding options: beams from here, EOS and padding from the tokenizer, then the task's decoding
        `defaults` (its no-repeat-ngram size and repetition penalty), then `search`, which overrides them."""
        base = search_options(tokenizer, self.num_beams, max_new_tokens)
        return replace(base, **{**(defaults or {}), **self.search})


@dataclass
class Predictions:
    texts: list[str]
    truncated: int
    generated_tokens: int
    seconds: float


def search_options(tokenizer, num_beams: int, max_new_tokens: int) -> SearchOptions:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return SearchOptions(
        max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, num_beams=num_beams
    )


def predict(
    generator: Generator,
    task,
    examples: Sequence,
    *,
    options: SearchOptions,
    batch_size: int,
    max_length: int,
    progress: bool = True,
    desc: str = "generating",
    dist: DistributedContext | None = None,
    continuous: bool = True,
) -> Predictions:
    """Generate for `examples` with the generator's template; returns post-processed predictions in order.

    All examples go to the decode loop at once with `batch_size` slots (continuous batching unless
    `continuous` is False or beams are searched, then static batches of `batch_size`). Examples are
    ordered by length, which keeps static batches tight. Under torchrun the length-ordered examples are
    dealt out to the ranks in chunks of `batch_size`, and gathered back in file order.
    """
    from softtool.data import encode_example
    from softtool.runtime.decode import EngineOptions

    budget = max_length - options.max_new_tokens
    encoded = [
        encode_example(generator.tokenizer, generator.template, task, ex, max_length=budget, with_target=False)
        for ex in examples
    ]
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].input_length)
    dist = dist or DistributedContext()
    chunks = [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
    mine = [i for k in dist.strided(len(chunks)) for i in chunks[k]]
    engine = EngineOptions(slots=batch_size, continuous=continuous)
    start = time.perf_counter()
    with tqdm(total=len(mine), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True) as bar:
        outputs = generator.generate([encoded[i].pieces for i in mine], None, options, engine, bar.update)
    done: list[tuple[int, tuple[str, int]]] = []
    for i, hyps in zip(mine, outputs, strict=True):
        text = task.postprocess(generator.tokenizer.decode(hyps[0], skip_special_tokens=True))
        done.append((i, (text, len(hyps[0]))))
    seconds = max(dist.gather_objects(time.perf_counter() - start))  # the slowest rank's wall time
    results = dist.gather_in_order(done, len(encoded))
    texts = [text for text, _ in results]
    generated = sum(n for _, n in results)
    return Predictions(texts, sum(e.truncated for e in encoded), generated, seconds)


def write_eval(
    output: Path,
    task,
    examples: Sequence,
    preds: Predictions,
    info: dict[str, Any],
    row_extras: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Score `preds`, write predictions.jsonl (each row with its `row_extras`, e.g. the label scores) and
    metrics.json under `output`, and for a classify task confusion.png; returns the metrics record."""
    output.mkdir(parents=True, exist_ok=True)
    references = [ex.references for ex in examples]
    scores = task.score(preds.texts, references) if examples else {}
    lines = []
    for i, (ex, pred) in enumerate(zip(examples, preds.texts, strict=True)):
        row = {
            "id": ex.id,
            **ex.fields,
            "references": ex.references,
            "prediction": pred,
            **task.sentence_scores(pred, ex.references),
            **(row_extras[i] if row_extras else {}),
        }
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_bytes(output / PREDICTIONS_FILE, "".join(lines).encode())
    record = {
        "metrics": scores,
        "n": len(examples),
        "truncated": preds.truncated,
        "seconds": round(preds.seconds, 3),
        "generated_tokens": preds.generated_tokens,
        "tokens_per_s": round(preds.generated_tokens / preds.seconds, 2) if preds.seconds > 0 else None,
        "examples_per_s": round(len(examples) / preds.seconds, 2) if preds.seconds > 0 else None,
        **info,
    }
    atomic_write_json(output / METRICS_FILE, record)
    if "confusion" in scores:
        title = f"{task.name} on {info.get('split', '')}: {info.get('prompt', output.name)}"
        plot_confusion(output / CONFUSION_PLOT, scores, title)
    return record


def run_eval(
    path: str | Path,
    data: str | Path,
    output: str | Path,
    options: EvalOptions,
    *,
    task_name: str | None = None,
    task_options: dict | None = None,
    template: str | None = None,
    model_name: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    dist: DistributedContext | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate the adapter/export at `path` (and, with options.baseline, the discrete prompts).

    Returns {"soft_prompt": record, "baseline": record, "zero_shot": record, ...} (the discrete prompts of
    `discrete_prompts` only when asked).
    Under torchrun the examples are shared out over the ranks (or `dist`'s); rank 0 writes the files and
    every rank returns the same records.
    """
    from softtool.data import default_dev_split, get_task, load_split
    from softtool.runtime import load_generator
    from softtool.runtime.torch_backend import TorchGenerator

    if dist is None:
        with distributed_context(device) as ctx:
            return run_eval(
                path, data, output, options, task_name=task_name, task_options=task_options, template=template,
                model_name=model_name, device=device, progress=progress, dist=ctx,
            )  # fmt: skip
    device = str(dist.device)
    progress = progress and dist.is_main
    output = Path(output)
    kw: dict[str, Any] = {}
    if options.backend == "torch":
        kw = {"template": template, "model_name": model_name, "device": device}
    generator = load_generator(path, options.backend, **{k: v for k, v in kw.items() if v is not None})
    meta = generator.meta
    name = task_name or (meta.task if meta is not None and meta.task != "generic" else None)
    if name is None:
        raise SofttoolError(f"{path} does not say which task it was trained for; pass --task")
    task = get_task(name, **(task_options or (meta.task_options if meta is not None and not task_name else {})))
    if options.instruction:
        task.instruction = options.instruction
    split_name = options.split or default_dev_split(data)
    limit = None if options.limit is None else options.offset + options.limit
    split = load_split(data, split_name, task=task, limit=limit)
    split = replace(split, examples=split.examples[options.offset :])
    if not split.examples:
        raise SofttoolError(
            f"{data}: split {split_name} has no usable examples"
            + (f" after the first {options.offset} (--offset)" if options.offset else "")
        )
    classify = task.name == "classify"
    if classify:
        if not task.labels:  # a PEFT adapter, or a task given by hand without its labels
            raise SofttoolError(
                f"{path}: a classify task needs its labels, which this adapter does not record (a PEFT adapter?); "
                "train the prompt with softtool train --task classify"
            )
        warn_unseen_labels(task, split)
    max_new = options.max_new_tokens or task.max_target_tokens
    so = options.search_options(generator.tokenizer, max_new, generator.decoding(0))
    common = {
        "task": task.name,
        "task_options": task.options,
        "split": split_name,
        "data": str(data),
        "skipped_empty": split.skipped_empty,
        "backend": options.backend,
        "options": asdict(options),
        # What the outputs were decoded with (the task's defaults and --search overrides), every prompt alike.
        "decoding": {name: getattr(so, name) for name in DECODING_OFF},
    }

    def run(gen: Generator, desc: str, folder: Path, info: dict[str, Any], trained: bool = True) -> dict[str, Any]:
        info = {**info, "prompt": desc}
        if classify:
            # A trained prompt learned each label followed by EOS; a discrete prompt is scored on the label alone.
            ranked = rank(
                gen,
                task,
                split.examples,
                eos=trained,
                length_norm=options.length_norm,
                max_length=options.max_length,
                batch_size=options.batch_size,
                progress=progress,
                desc=desc,
                dist=dist,
            )
            extras = label_score_rows(task, ranked)
            info = {**info, "scored": "label + EOS" if trained else "label"}
            preds = Predictions(ranked.predictions, ranked.truncated, 0, ranked.seconds)
            return dist.on_main(write_eval, folder, task, split.examples, preds, {**common, **info}, extras)
        preds = predict(
            gen,
            task,
            split.examples,
            options=so,
            batch_size=options.batch_size,
            continuous=options.continuous,
            max_length=options.max_length,
            progress=progress,
            desc=desc,
            dist=dist,
        )
        return dist.on_main(write_eval, folder, task, split.examples, preds, {**common, **info})

    results = {
        "soft_prompt": run(
            generator, "soft prompt", output, {"adapter": str(path), "template": str(generator.template)}
        )
    }
    if options.baseline:
        # The discrete prompts run on the PyTorch model; an ONNX export carries only the soft-prompt graph.
        model = getattr(generator, "model", None)
        if model is None:
            from softtool.models import load_model

            base = model_name or (meta.base_model if meta is not None else None)
            if not base:
                raise SofttoolError(f"{path} does not name its base model; pass --model for --baseline")
            model = load_model(base, device=device)
        seed = int(options.search.get("seed", 0))
        for kind, tmpl in discrete_prompts(task, generator.tokenizer, data, options.shots, seed).items():
            plain = TorchGenerator(model, generator.tokenizer, tmpl, None, meta)
            info = {"backend": "torch", "adapter": None, "template": str(tmpl)}
            results[kind] = run(plain, kind.replace("_", "-"), output / kind, info, trained=False)
        if classify:
            label = majority_label(task, load_split(data, "train", task=task).examples)
            preds = Predictions([label] * len(split.examples), 0, 0, 0.0)
            info = {"backend": None, "adapter": None, "template": None, "prompt": "majority", "majority_label": label}
            results["majority"] = dist.on_main(
                write_eval, output / "majority", task, split.examples, preds, {**common, **info}
            )
    return results


def label_score_rows(task, ranked: Ranked) -> list[dict[str, Any]]:
    """predictions.jsonl's extra column for a classify task: each label's summed log-prob."""
    return [{"label_scores": {label: round(float(v), 6) for label, v in zip(task.labels, row, strict=True)}}
            for row in ranked.scores]  # fmt: skip


def discrete_prompts(task, tokenizer, data: str | Path, shots: int = 0, seed: int = 0) -> dict[str, Any]:
    """The discrete prompts a soft prompt is compared with, by name: the instruction prompt (baseline), the
    bare input (zero_shot), the instruction through the tokenizer's chat template (chat, for an instruct
    model: the way its makers prompt it), and with `shots` the instruction followed by the train split's
    first `shots` worked examples (few_shot; a classify task draws them class-balanced with `seed`)."""
    from softtool.data import load_split

    prompts: dict[str, Any] = {"baseline": task.baseline_template(), "zero_shot": task.zero_shot_template()}
    chat = chat_template(tokenizer, task.baseline_template())
    if chat is not None:
        prompts["chat"] = chat
    if shots:
        picks = getattr(task, "demonstrations", None)
        try:
            demos = load_split(data, "train", task=task, limit=None if picks else shots).examples
        except SofttoolError as exc:
            raise SofttoolError(f"--shots {shots} takes its examples from the train split: {exc}") from exc
        if picks:
            demos = picks(demos, shots, seed)
        prompts["few_shot"] = task.few_shot_template(demos)
    return prompts
