"""softtool's decoding core from Python: batch building and step-wise greedy/beam search.

The work happens in the C++ module `softtool._core`; this module re-exports it and defines the
`SearchOptions` / `BatchOptions` dataclasses the CLI and the runtimes use (their field help is the CLI's
help). Protocol, for a model you run yourself:

    batch = build_batch(rows, task_ids, template.layout, BatchOptions(vocab_size=V, num_virtual_tokens=N))
    search = make_search(SearchOptions(max_new_tokens=32, eos_token_ids=[2], pad_token_id=2, num_beams=4))
    search.start(prompt_ids)                 # one id array per batch item
    # prefill with each item's inputs repeated num_beams times (item-major) -> logits [num_rows, vocab]
    while not search.is_done():
        r = search.step(last_logits)         # float32 [num_rows, vocab]
        # reorder the KV cache with r.beam_indices, feed r.next_tokens, get the next last_logits
    hypotheses = search.finalize()           # [batch][num_return_sequences] Hypothesis(tokens, score)

For continuous batching (greedy or sampling), `make_slot_search(options, num_slots)` gives a SlotSearch over
a fixed number of batch rows: submit() items at any time, admit() them into free slots, step() the slots
you have logits for, take_finished() the items that ended (docs/search.md, "Slots").

Greedy search matches transformers' generate(do_sample=False) and beam search its `_beam_search`
(tokens, order and sequences_scores), with the same processors. Sampling draws from the same warped
distribution as transformers but with its own seeded generator, so sampled tokens differ from torch's.
`SearchOptions(choices=[[...], ...])` makes greedy search and sampling output one of the given token sequences
(transformers' prefix_allowed_tokens_fn over a trie of them; docs/search.md, "Choices").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from softtool import _core
from softtool._core import (
    Batch,
    BeamSearch,
    GreedySearch,
    Hypothesis,
    SearchStrategy,
    SlotSearch,
    SlotStepResult,
    StepResult,
)

__all__ = [
    "Batch",
    "BatchOptions",
    "BeamSearch",
    "DECODING_OFF",
    "GreedySearch",
    "Hypothesis",
    "SearchOptions",
    "SearchStrategy",
    "SlotSearch",
    "SlotStepResult",
    "StepResult",
    "build_batch",
    "make_search",
    "make_slot_search",
]


def _to_core(options: Any, core_type: type) -> Any:
    """Copy a dataclass's fields onto the core struct; ValueError (from C++) names a bad field."""
    core = core_type()
    for f in fields(options):
        setattr(core, f.name, getattr(options, f.name))
    core.validate()
    return core


@dataclass
class BatchOptions:
    """How build_batch lays out ids and pads rows."""

    vocab_size: int = field(
        metadata={"help": "Size V of the model's vocabulary; virtual token j of task t is V + t*N + j."}
    )
    num_virtual_tokens: int = field(default=0, metadata={"help": "Virtual tokens N per task (the template's total)."})
    padding_side: str = field(default="left", metadata={"help": "Pad on the 'left' (generation) or the 'right'."})
    pad_id: int = field(default=0, metadata={"help": "Token id written at padded positions."})
    num_tasks: int = field(default=0, metadata={"help": "Tasks in the prompt table, to check task ids (0: unchecked)."})

    def __post_init__(self) -> None:
        self.to_core()

    def to_core(self) -> _core.BatchOptions:
        return _to_core(self, _core.BatchOptions)


@dataclass
class SearchOptions:
    """How to search; the semantics of each field are transformers' generate() arguments of the same name."""

    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens to generate per sequence.", "min": 0})
    min_new_tokens: int = field(
        default=0, metadata={"help": "EOS is blocked until this many tokens are generated.", "min": 0}
    )
    eos_token_ids: list[int] = field(default_factory=list, metadata={"help": "Token ids that end a sequence."})
    pad_token_id: int = field(default=0, metadata={"help": "Token fed for rows that have finished."})
    num_beams: int = field(default=1, metadata={"help": "Beam size; 1 is greedy search (or sampling).", "min": 1})
    length_penalty: float = field(
        default=1.0, metadata={"help": "Beam scores are divided by generated_length ** length_penalty."}
    )
    early_stopping: bool | str = field(
        default=False,
        metadata={"help": "Beam stop rule: True (num_beams finished), False (heuristic) or 'never'."},
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "Penalty > 1 for tokens already in the sequence (1.0: off).", "min": 0, "min_open": True},
    )
    no_repeat_ngram_size: int = field(
        default=0, metadata={"help": "Forbid repeating n-grams of this size (0: off).", "min": 0}
    )
    num_return_sequences: int = field(
        default=1, metadata={"help": "Sequences returned per input (<= num_beams).", "min": 1}
    )
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy (needs num_beams == 1)."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (> 0).", "min": 0, "min_open": True}
    )
    top_k: int = field(default=0, metadata={"help": "Sample only from the k most likely tokens (0: off).", "min": 0})
    top_p: float = field(
        default=1.0,
        metadata={
            "help": "Sample from the smallest set with this probability mass.",
            "min": 0,
            "min_open": True,
            "max": 1,
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sampling generator.", "min": 0})
    num_threads: int = field(
        default=1,
        metadata={"help": "Threads for per-row work in a step (0: one per core; 1 measured fastest here).", "min": 0},
    )
    choices: list[list[int]] = field(
        default_factory=list,
        metadata={
            "help": "Token-id sequences the output must be one of, each then followed by an EOS (labels; empty: "
            "unconstrained). Greedy search and sampling only; docs/search.md, 'Choices'.",
            "cli": False,
        },
    )

    def __post_init__(self) -> None:
        # The core struct converts and validates every field (one int or ids for eos_token_ids, arrays for
        # choices); keep its plain lists.
        core = self.to_core()
        self.eos_token_ids = list(core.eos_token_ids)
        self.choices = [list(c) for c in core.choices]

    def to_core(self) -> _core.SearchOptions:
        return _to_core(self, _core.SearchOptions)


# The fields a task's decoding defaults set (softtool.data.tasks.Task.decoding, recorded in adapters and exports),
# each with its value when off: SearchOptions' own default.
DECODING_OFF = {
    name: SearchOptions.__dataclass_fields__[name].default for name in ("no_repeat_ngram_size", "repetition_penalty")
}


def _core_options(options: Any, dataclass_type: type, core_type: type) -> Any:
    if isinstance(options, core_type):
        options.validate()
        return options
    if isinstance(options, dataclass_type):
        return options.to_core()
    raise TypeError(f"expected {dataclass_type.__name__}, got {type(options).__name__}")


def make_search(options: SearchOptions | _core.SearchOptions) -> SearchStrategy:
    """GreedySearch when num_beams == 1 (greedy or sampling), else BeamSearch; ValueError on bad options."""
    return _core.make_search(_core_options(options, SearchOptions, _core.SearchOptions))


def make_slot_search(options: SearchOptions | _core.SearchOptions, num_slots: int) -> SlotSearch:
    """A SlotSearch (greedy or sampling, num_beams == 1) over `num_slots` batch rows; ValueError on bad options.

    submit(prompt_ids, options=None) -> item id; admit() -> [(slot, item_id)]; step(logits, slots) ->
    SlotStepResult(next_tokens, finished); take_finished() -> [(item_id, Hypothesis)]. Per-item options in
    submit() may be a SearchOptions dataclass or the core struct.
    """
    return _core.SlotSearch(_core_options(options, SearchOptions, _core.SearchOptions), num_slots)


def build_batch(
    rows: Sequence[Sequence[Any]],
    task_ids: Sequence[int] | int,
    layout: Sequence[tuple[str, int]],
    options: BatchOptions | _core.BatchOptions,
) -> Batch:
    """Model inputs for `rows` (per row, one token-id array per text slot) laid out as `layout`.

    Returns a Batch with numpy int64 `input_ids`, `attention_mask`, `position_ids` ([B, T]) and `lengths`
    ([B]); also readable as batch["input_ids"]. ValueError on a bad task id, token id or layout.
    """
    return _core.build_batch(rows, task_ids, layout, _core_options(options, BatchOptions, _core.BatchOptions))
