"""The one decode loop: every backend, every command (eval, generate, bench, serve) generates through here.

A backend is a `SlotModel` (softtool.runtime.slots): prefill these rows into these slots, one step for the
first B slots, reorder slots for beams. The C++ search (softtool.search) owns every row's state: its
history, processors, the choice of the next token, when it ends. Python only moves tensors between them.

Schedules:
- continuous (the default for greedy search and sampling): a fixed number of slots; the moment a row ends
  (EOS or its token budget) the C++ `SlotSearch` hands its slot to the next waiting row, which is prefilled
  at once, so the batch stays full. `Engine` exposes this step by step for the server.
- static (the reference for greedy search and sampling): the same engine, but waiting rows are admitted
  only when every slot is free, so rows go in batches of `slots` and a batch runs until its last row ends.
  Rows are seeded by their own index either way, so sampling draws the same tokens in both.
- beam search: static batches of `slots / num_beams` items through the C++ `BeamSearch`, whose rows are
  reordered every step (on the static step: an index copy on the device, inside the captured step).

Steps (every search):
- dynamic: each step runs as many slots as the highest busy one, over the columns the busy rows use; tokens
  and positions go to the model from the host (the CPU's default: it computes nothing it does not need).
- static: fixed buffers and one step per slot bucket, tokens and positions kept on the device and advanced
  by the step, captured as a CUDA graph on cuda (softtool.runtime.static_step; cuda's default).

Admission: by default a waiting row is admitted the moment a slot is free. `admit_min` > 1 holds admission
until that many slots are free (or no row runs, or a row has waited `admit_wait` steps), so that one
prefill call takes several rows instead of one or two. A prefill runs at the admitted rows' own width, or with
`prefill="buckets"` at fixed (rows, length) shapes (captured on cuda, the same tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from softtool import search as _search
from softtool.runtime.logprobs import MAX_LOGPROBS, TokenLogprob, from_head
from softtool.runtime.slots import Head, SlotModel
from softtool.search import Hypothesis, SearchOptions

Progress = Callable[[int], None]  # called with the number of rows that just finished
STEPS = ("auto", "static", "dynamic")
PREFILLS = ("exact", "buckets")


@dataclass
class EngineOptions:
    """How the decode loop schedules rows (fields are CLI options of eval, generate and bench)."""

    slots: int = field(default=16, metadata={"help": "Rows decoded together (the KV cache's batch).", "min": 1})
    continuous: bool = field(
        default=True,
        metadata={"help": "Give a finished row's slot to the next row at once (off: static batches, the reference)."},
    )
    step: str = field(
        default="auto",
        metadata={
            "help": "Decode step: static (fixed slot buckets and cache, tokens kept on the device; captured as a "
            "CUDA graph on cuda), dynamic (as wide as the busy rows), auto (static on cuda, dynamic on the CPU).",
            "choices": STEPS,
        },
    )
    admit_min: int = field(
        default=1,
        metadata={
            "help": "Admit waiting rows only once this many slots are free (or nothing runs), so prefills take "
            "several rows at a time; 1: at once.",
            "min": 1,
        },
    )
    admit_wait: int = field(
        default=8, metadata={"help": "Most steps a waiting row is held back by --admit-min.", "min": 0}
    )
    prefill: str = field(
        default="exact",
        metadata={
            "help": "Prefill shape: exact (as wide as the admitted rows) or buckets (fixed (rows, length) shapes on "
            "kept buffers, captured as CUDA graphs on cuda; the same tokens).",
            "choices": PREFILLS,
        },
    )

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        if self.step not in STEPS:
            raise ValueError(f"step must be one of {', '.join(STEPS)}, got {self.step!r}")
        if self.admit_min < 1 or self.admit_wait < 0:
            raise ValueError(f"admit_min must be >= 1 and admit_wait >= 0, got {self.admit_min}, {self.admit_wait}")
        if self.prefill not in PREFILLS:
            raise ValueError(f"prefill must be one of {', '.join(PREFILLS)}, got {self.prefill!r}")

    def static_step(self, model: SlotModel) -> bool:
        """Whether `model` decodes with the static step under these options."""
        return self.step == "static" or (self.step == "auto" and model.kv_device.type == "cuda")


def _history(model: SlotModel, row: Sequence[int]) -> np.ndarray:
    # The search sees each row's real tokens (no virtual ids), as transformers' generate does with PEFT prompts.
    return np.asarray([t for t in row if t < model.vocab_size], dtype=np.int64)


def capacity_for(rows: Sequence[Sequence[int]], budget: int) -> int:
    """The cache positions rows of these lengths need with `budget` new tokens each."""
    return max(len(r) for r in rows) + budget + 1  # +1: the scratch column


def _select(head: Head, rows) -> Head:
    return tuple(np.ascontiguousarray(a[rows]) for a in head)


def greedy_only(options: SearchOptions) -> bool:
    """Whether the search needs nothing but each row's greedy choice (no sampling, no processors, no choices: a
    constrained row takes its best allowed token, often not the arg-max)."""
    return (
        not options.do_sample
        and options.repetition_penalty == 1.0
        and not (options.no_repeat_ngram_size or options.min_new_tokens or options.choices)
    )


class Engine:
    """Continuous batching over a SlotModel: submit rows at any time, call `step()` until `done`.

    Each step admits waiting rows into free slots (prefilling them and choosing their first token), then
    runs one decode step for every busy slot. `step()` returns the (item, token) pairs emitted and the
    (item, Hypothesis) pairs that finished, so a caller can stream.

    An item submitted with `logprobs=k` has each emitted token scored (runtime.logprobs: the model's own
    log-prob and k best candidates, from the rows that step already computed): after a step, `logprobs` maps
    it to one TokenLogprob per token it emitted in that step. With `prompt_logprobs`, its prefill also scores
    its prompt, and `prompt_logprobs` maps it to one entry per position of its row (None where nothing is scored).
    """

    def __init__(
        self,
        model: SlotModel,
        options: SearchOptions,
        slots: int,
        capacity: int,
        *,
        static: bool = False,
        engine: EngineOptions | None = None,
    ):
        if options.num_beams != 1:
            raise ValueError("continuous batching runs greedy search or sampling; beam search uses static batches")
        engine = engine or EngineOptions(slots=slots)
        self.model = model
        self.options = options
        self.search = _search.make_slot_search(options, slots)
        self.fixed = model.static_slots(slots, capacity) if engine.static_step(model) else None
        if self.fixed is None:
            model.reserve(slots, capacity)
        self.capacity = capacity
        self.tokens = np.full(slots, options.pad_token_id, dtype=np.int64)
        self.positions = np.full(slots, model.scratch, dtype=np.int64)
        self._rows: dict[int, tuple[list[int], int]] = {}  # waiting or running item -> (ids, task)
        self._item_of: dict[int, int] = {}  # slot -> the item it holds
        self.static = static  # admit only when every slot is free: static batches, the reference schedule
        self.admit_min, self.admit_wait = min(engine.admit_min, slots), engine.admit_wait
        self.buckets = engine.prefill == "buckets"
        self._held = 0  # steps admission has been held back
        self.greedy_only = greedy_only(options)  # every row so far needs only its greedy choice
        self._scoring: dict[int, tuple[int | None, bool]] = {}  # item -> (logprobs k, prompt_logprobs), if any
        self.logprobs: dict[int, list[TokenLogprob]] = {}  # this step's scores of emitted tokens, by item
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}  # this step's prompt scores, by item

    def submit(
        self,
        row: Sequence[int],
        task_id: int = 0,
        options: SearchOptions | None = None,
        *,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
    ) -> int:
        """Queue one row (full ids, virtual ones included); returns its item id (0, 1, 2, ...).

        logprobs: score each emitted token with its k best candidates (0 <= k <= MAX_LOGPROBS); prompt_logprobs:
        score the row's own tokens at prefill (k candidates each, k = logprobs or 0).
        """
        budget = (options or self.options).max_new_tokens
        if len(row) + budget > self.capacity - 1:
            raise ValueError(
                f"a row of {len(row)} tokens plus {budget} new ones exceeds the cache ({self.capacity - 1})"
            )
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}")
        if prompt_logprobs and not self.model.can_score_prompt:
            raise ValueError(f"{getattr(self.model, 'where', 'the model')} cannot score prompt tokens; re-export it")
        item = self.search.submit(_history(self.model, row), options)
        self._rows[item] = (list(row), int(task_id))
        # A row scored with k alternatives needs the step's top-k, not only its greedy choice.
        self.greedy_only = self.greedy_only and greedy_only(options or self.options) and not logprobs
        if logprobs is not None or prompt_logprobs:
            self._scoring[item] = (logprobs, prompt_logprobs)
        return item

    def cancel(self, item: int) -> None:
        self.search.cancel(item)

    @property
    def done(self) -> bool:
        return self.search.is_done()

    def _search_step(self, head: Head, slots: np.ndarray):
        if len(head) == 2:
            return self.search.step_topk(head[0], head[1], slots)
        return self.search.step(head[0], slots)

    def _advance(self, slots: np.ndarray, result, emitted: list[tuple[int, int]], head: Head) -> None:
        for row, (slot, token, finished) in enumerate(zip(slots, result.next_tokens, result.finished, strict=True)):
            item = self._item_of[slot]
            emitted.append((item, int(token)))
            k = self._scoring.get(item, (None, False))[0]
            if k is not None:
                self.logprobs.setdefault(item, []).append(from_head(head, row, int(token), k))
            if finished:
                self.tokens[slot] = self.options.pad_token_id
                self.positions[slot] = self.model.scratch
            else:
                self.tokens[slot] = token
                self.positions[slot] += 1

    def _admitting(self) -> bool:
        """Whether waiting rows go into free slots this step."""
        running = self.search.num_active()
        if self.static:
            return running == 0
        if self.admit_min <= 1 or running == 0:
            return True
        free = self.search.num_slots() - running
        if free >= min(self.admit_min, self.search.num_pending()) or self._held >= self.admit_wait:
            self._held = 0
            return True
        self._held += 1
        return False

    def _prefill(self, slots: np.ndarray, items: list[int], rows: list[list[int]]) -> Head:
        tasks = [self._rows[i][1] for i in items]
        wanted = [i for i in items if self._scoring.get(i, (None, False))[1]]
        if not wanted:
            return self.model.prefill(slots, rows, tasks, buckets=self.buckets)
        # The rows admitted with it are scored too (one forward); only the items that asked get their scores.
        head, scores = self.model.prefill_scored(slots, rows, tasks)
        for item, row_scores in zip(items, scores, strict=True):
            if item in wanted:
                k = self._scoring[item][0] or 0
                self.prompt_logprobs[item] = [s.keep(k) if s is not None else None for s in row_scores]
        return head

    def step(self) -> tuple[list[tuple[int, int]], list[tuple[int, Hypothesis]]]:
        emitted: list[tuple[int, int]] = []
        self.logprobs, self.prompt_logprobs = {}, {}
        with self.model.stream_context():
            self._admit(emitted)
            active = np.asarray(self.search.active_slots(), dtype=np.int64)
            if len(active) and self.fixed is not None:
                self._static_step(active, emitted)
            elif len(active):
                width = int(active.max()) + 1  # idle slots below it compute a pad token into their scratch column
                head = _select(self.model.step(self.tokens[:width], self.positions[:width]), active)
                self._advance(active, self._search_step(head, active), emitted, head)
        finished = list(self.search.take_finished())
        for item, _ in finished:
            self._rows.pop(item, None)
            self._scoring.pop(item, None)
        return emitted, finished

    def _admit(self, emitted: list[tuple[int, int]]) -> None:
        if not self.search.num_pending() or not self._admitting():
            return
        admitted = self.search.admit()
        if not admitted:
            return
        slots = np.asarray([s for s, _ in admitted], dtype=np.int64)
        items = [i for _, i in admitted]
        rows = [self._rows[i][0] for i in items]
        head = self._prefill(slots, items, rows)
        for slot, item, row in zip(slots, items, rows, strict=True):
            self._item_of[slot] = item
            self.positions[slot] = len(row) - 1  # _advance moves it to the first new token's position
        self._advance(slots, self._search_step(head, slots), emitted, head)
        if self.fixed is not None:  # the rows' first tokens and positions, into the device buffers
            self.model.set_slots(self.fixed, slots, self.tokens[slots], self.positions[slots])

    def _static_step(self, active: np.ndarray, emitted: list[tuple[int, int]]) -> None:
        """One captured (or fixed-shape) step; the step itself already fed each row its greedy choice, so only
        rows whose search chose otherwise get their token written back."""
        bucket = self.fixed.bucket(int(active.max()) + 1)
        head, best = self.model.static_step(self.fixed, bucket, self.greedy_only)
        head = _select(head, active)
        result = self._search_step(head, active)
        chosen = np.asarray(result.next_tokens, dtype=np.int64)
        differs = (chosen != best[active]) & ~np.asarray(result.finished, dtype=bool)
        if differs.any():
            self.model.set_slots(self.fixed, active[differs], chosen[differs])
        self._advance(active, result, emitted, head)


def decode(
    model: SlotModel,
    rows: Sequence[Sequence[int]],
    task_ids: Sequence[int],
    options: SearchOptions,
    engine: EngineOptions | None = None,
    progress: Progress | None = None,
) -> list[list[Hypothesis]]:
    """Per row, `num_return_sequences` hypotheses, in row order."""
    engine = engine or EngineOptions()
    if not rows:
        return []
    if options.num_beams > 1:
        return _decode_beams(model, rows, task_ids, options, engine, progress)
    return _decode_slots(model, rows, task_ids, options, engine, progress, static=not engine.continuous)


def _decode_slots(model, rows, task_ids, options, engine: EngineOptions, progress, static: bool):
    copies = options.num_return_sequences if options.do_sample else 1
    per_copy = options
    if copies > 1:  # each sampled copy is its own item; item ids follow the static search's row numbering
        from dataclasses import replace

        per_copy = replace(options, num_return_sequences=1)
    capacity = capacity_for(rows, options.max_new_tokens)
    # A static engine keeps its slot count whatever the rows (its buffers and graphs serve every call).
    width = engine.slots if engine.static_step(model) else min(engine.slots, len(rows) * copies)
    runner = Engine(model, per_copy, width, capacity, static=static, engine=engine)
    for row, task in zip(rows, task_ids, strict=True):
        for _ in range(copies):
            runner.submit(row, task)
    results: dict[int, Hypothesis] = {}
    waiting = [copies] * len(rows)  # copies of each row still running
    while not runner.done:
        _, finished = runner.step()
        done_rows = 0
        for item, hyp in finished:
            results[item] = hyp
            waiting[item // copies] -= 1
            done_rows += waiting[item // copies] == 0
        if progress and done_rows:
            progress(done_rows)
    return [[results[i * copies + c] for c in range(copies)] for i in range(len(rows))]


def _decode_beams(model, rows, task_ids, options, engine: EngineOptions, progress) -> list[list[Hypothesis]]:
    out: list[list[Hypothesis]] = []
    per_batch = max(1, engine.slots // options.num_beams)
    for start in range(0, len(rows), per_batch):
        batch = list(range(start, min(start + per_batch, len(rows))))
        out += _decode_batch(model, [rows[i] for i in batch], [task_ids[i] for i in batch], options, engine)
        if progress:
            progress(len(batch))
    return out


def _decode_batch(model: SlotModel, rows, task_ids, options: SearchOptions, engine: EngineOptions):
    """One static batch of beam search. On the static step the beams' rows live in the engine's slots: a reorder is
    an index copy on the device inside the (captured) step, and the search's tokens are written into the step's
    buffer; on the dynamic step the cache rows are reordered and the step runs as wide as the beams."""
    searcher = _search.make_search(options)
    searcher.start([_history(model, row) for row in rows])
    repeat = searcher.num_rows // len(rows)
    order = [i for i in range(len(rows)) for _ in range(repeat)]  # item-major, as the search expects
    capacity = capacity_for(rows, options.max_new_tokens)
    # Only when asked for: "auto" keeps beams on the dynamic step until a GPU run has checked the captured beam step.
    # More beams than slots (one item already overflows them) run on the dynamic step, as wide as they are.
    static = engine.step == "static" and len(order) <= engine.slots
    fixed = model.static_slots(engine.slots, capacity, beams=True) if static else None
    if fixed is None:
        model.reserve(len(order), capacity)
    slots = list(range(len(order)))
    buckets = engine.prefill == "buckets"
    head = model.prefill(slots, [rows[i] for i in order], [task_ids[i] for i in order], buckets=buckets)
    positions = np.asarray([len(rows[i]) for i in order], dtype=np.int64)
    if fixed is not None:
        with model.stream_context():  # each row's first new position; the step moves them on by itself
            model.set_slots(fixed, slots, np.full(len(order), options.pad_token_id), positions)
    identity = np.arange(len(order))
    topk = len(head) == 2
    for _ in range(options.max_new_tokens):
        result = searcher.step_topk(head[0], head[1]) if topk else searcher.step(head[0])
        if searcher.is_done():
            break
        beams = np.asarray(result.beam_indices, dtype=np.int64)
        tokens = np.asarray(result.next_tokens, dtype=np.int64)
        moved = not np.array_equal(beams, identity)  # greedy never reorders: skip copying the cache
        if fixed is not None:
            with model.stream_context():
                head = model.beam_step(fixed, tokens, beams if moved else None)
            continue
        if moved:
            model.reorder(beams)
            positions = positions[beams]
        head = model.step(tokens, positions)
        positions = positions + 1
    return [list(item) for item in searcher.finalize()]
