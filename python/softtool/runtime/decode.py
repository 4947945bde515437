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
  reordered every step.
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


@dataclass
class EngineOptions:
    """How the decode loop schedules rows (fields are CLI options of eval, generate and bench)."""

    slots: int = field(default=16, metadata={"help": "Rows decoded together (the KV cache's batch).", "min": 1})
    continuous: bool = field(
        default=True,
        metadata={"help": "Give a finished row's slot to the next row at once (off: static batches, the reference)."},
    )

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")


def _history(model: SlotModel, row: Sequence[int]) -> np.ndarray:
    # The search sees each row's real tokens (no virtual ids), as transformers' generate does with PEFT prompts.
    return np.asarray([t for t in row if t < model.vocab_size], dtype=np.int64)


def _capacity(rows: Sequence[Sequence[int]], budget: int) -> int:
    return max(len(r) for r in rows) + budget + 1  # +1: the scratch column


def _select(head: Head, rows) -> Head:
    return tuple(np.ascontiguousarray(a[rows]) for a in head)


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

    def __init__(self, model: SlotModel, options: SearchOptions, slots: int, capacity: int, *, static: bool = False):
        if options.num_beams != 1:
            raise ValueError("continuous batching runs greedy search or sampling; beam search uses static batches")
        self.model = model
        self.options = options
        self.search = _search.make_slot_search(options, slots)
        model.reserve(slots, capacity)
        self.capacity = capacity
        self.tokens = np.full(slots, options.pad_token_id, dtype=np.int64)
        self.positions = np.full(slots, model.scratch, dtype=np.int64)
        self._rows: dict[int, tuple[list[int], int]] = {}  # waiting or running item -> (ids, task)
        self._item_of: dict[int, int] = {}  # slot -> the item it holds
        self.static = static  # admit only when every slot is free: static batches, the reference schedule
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

    def _prefill(self, slots: np.ndarray, items: list[int], rows: list[list[int]]) -> Head:
        tasks = [self._rows[i][1] for i in items]
        wanted = [i for i in items if self._scoring.get(i, (None, False))[1]]
        if not wanted:
            return self.model.prefill(slots, rows, tasks)
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
        admitted = self.search.admit() if not self.static or self.search.num_active() == 0 else []
        if admitted:
            slots = np.asarray([s for s, _ in admitted], dtype=np.int64)
            items = [i for _, i in admitted]
            rows = [self._rows[i][0] for i in items]
            head = self._prefill(slots, items, rows)
            for slot, item, row in zip(slots, items, rows, strict=True):
                self._item_of[slot] = item
                self.positions[slot] = len(row) - 1  # _advance moves it to the first new token's position
            self._advance(slots, self._search_step(head, slots), emitted, head)
        active = np.asarray(self.search.active_slots(), dtype=np.int64)
        if len(active):
            width = int(active.max()) + 1  # idle slots below it compute a pad token into their scratch column
            head = _select(self.model.step(self.tokens[:width], self.positions[:width]), active)
            self._advance(active, self._search_step(head, active), emitted, head)
        finished = list(self.search.take_finished())
        for item, _ in finished:
            self._rows.pop(item, None)
            self._scoring.pop(item, None)
        return emitted, finished


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
        return _decode_beams(model, rows, task_ids, options, engine.slots, progress)
    return _decode_slots(model, rows, task_ids, options, engine.slots, progress, static=not engine.continuous)


def _decode_slots(model, rows, task_ids, options, slots, progress, static: bool) -> list[list[Hypothesis]]:
    copies = options.num_return_sequences if options.do_sample else 1
    per_copy = options
    if copies > 1:  # each sampled copy is its own item; item ids follow the static search's row numbering
        from dataclasses import replace

        per_copy = replace(options, num_return_sequences=1)
    capacity = _capacity(rows, options.max_new_tokens)
    engine = Engine(model, per_copy, min(slots, len(rows) * copies), capacity, static=static)
    for row, task in zip(rows, task_ids, strict=True):
        for _ in range(copies):
            engine.submit(row, task)
    results: dict[int, Hypothesis] = {}
    waiting = [copies] * len(rows)  # copies of each row still running
    while not engine.done:
        _, finished = engine.step()
        done_rows = 0
        for item, hyp in finished:
            results[item] = hyp
            waiting[item // copies] -= 1
            done_rows += waiting[item // copies] == 0
        if progress and done_rows:
            progress(done_rows)
    return [[results[i * copies + c] for c in range(copies)] for i in range(len(rows))]


def _decode_beams(model, rows, task_ids, options, slots, progress) -> list[list[Hypothesis]]:
    out: list[list[Hypothesis]] = []
    per_batch = max(1, slots // options.num_beams)
    for start in range(0, len(rows), per_batch):
        batch = list(range(start, min(start + per_batch, len(rows))))
        out += _decode_batch(model, [rows[i] for i in batch], [task_ids[i] for i in batch], options)
        if progress:
            progress(len(batch))
    return out


def _decode_batch(model: SlotModel, rows, task_ids, options: SearchOptions) -> list[list[Hypothesis]]:
    searcher = _search.make_search(options)
    searcher.start([_history(model, row) for row in rows])
    repeat = searcher.num_rows // len(rows)
    order = [i for i in range(len(rows)) for _ in range(repeat)]  # item-major, as the search expects
    model.reserve(len(order), _capacity(rows, options.max_new_tokens))
    slots = list(range(len(order)))
    head = model.prefill(slots, [rows[i] for i in order], [task_ids[i] for i in order])
    positions = np.asarray([len(rows[i]) for i in order], dtype=np.int64)
    identity = np.arange(len(order))
    topk = len(head) == 2
    for _ in range(options.max_new_tokens):
        result = searcher.step_topk(head[0], head[1]) if topk else searcher.step(head[0])
        if searcher.is_done():
            break
        beams = np.asarray(result.beam_indices, dtype=np.int64)
        if not np.array_equal(beams, identity):  # greedy never reorders: skip copying the cache
            model.reorder(beams)
            positions = positions[beams]
        head = model.step(np.asarray(result.next_tokens, dtype=np.int64), positions)
        positions = positions + 1
    return [list(item) for item in searcher.finalize()]
