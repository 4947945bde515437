"""The async scheduler: softtool.runtime.decode.Engine on one dedicated thread, fed from the event loop.

The engine and the generator are not thread-safe, so only the engine thread touches them. The event loop
talks to it through a thread-safe command queue (submit a row, cancel a row, run a function such as adding
a task), drained at the start of every iteration; the engine thread answers through the loop
(`call_soon_threadsafe`), once per step for all the rows that step touched, into each row's asyncio queue.
Each iteration is one `Engine.step()`: waiting rows are admitted into free slots and prefilled, then one
decode step runs for every busy slot; rows of different tasks share that batch. When no row is waiting or
running, the thread sleeps on the command queue.

A `Row` is one sequence of one request (a request with n choices or several prompts has several rows); the rows
of a request share one asyncio queue. For each row it receives, in order, `(row.index, event)`: with
`prompt_logprobs`, first one `Prompt` (its prompt tokens scored at prefill), then `Tokens` (new token ids, the EOS
included when the row stops on it, each with its log-prob when the row asked for `logprobs`), then one
`Finished` (the hypothesis, or `cancelled`, or the error that ended it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from softtool.runtime.decode import Engine
from softtool.runtime.logprobs import TokenLogprob
from softtool.search import Hypothesis, SearchOptions

log = logging.getLogger("softtool.serve")


@dataclass
class Finished:
    """The last event of a row."""

    hypothesis: Hypothesis | None = None
    cancelled: bool = False
    error: str | None = None


@dataclass
class Tokens:
    """New tokens of a row, and their log-probs when it asked for them (else empty)."""

    ids: list[int]
    logprobs: list[TokenLogprob]


@dataclass
class Prompt:
    """A row's prompt scored at prefill: per position of its ids, a TokenLogprob or None."""

    logprobs: list[TokenLogprob | None]


@dataclass(eq=False)
class Row:
    """One sequence to decode: full ids (virtual ones included), its task, its search options."""

    ids: list[int]
    task: int
    options: SearchOptions
    logprobs: int | None = None  # score each new token with this many candidates
    prompt_logprobs: bool = False  # score the prompt's tokens at prefill (echo)
    index: int = 0  # the choice it is in its request
    events: asyncio.Queue | None = None  # (index, event) of every row of its request; set before submit
    item: int | None = None  # the engine's item id, set on the engine thread
    started: bool = False  # a first token was delivered (the row has left the queue)
    ended: bool = False  # the Finished event was delivered


@dataclass
class EngineStats:
    """What the engine thread publishes after every iteration (plain ints: read from any thread)."""

    slots: int = 0
    active: int = 0  # rows in a slot
    pending: int = 0  # rows waiting for a slot
    steps: int = 0
    alive: bool = False


class AsyncEngine:
    """Continuous batching for the server: `submit` rows from the event loop, read their `events`."""

    def __init__(self, generator, options: SearchOptions, slots: int, capacity: int, *, idle_wait: float = 0.5):
        self.generator = generator
        self.options = options
        self.num_slots = slots
        self.capacity = capacity
        self.idle_wait = idle_wait
        self.stats = EngineStats(slots=slots)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._rows: dict[int, Row] = {}  # engine thread only: item -> row
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._engine: Engine | None = None

    # -- life ---------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._engine = Engine(self.generator, self.options, self.num_slots, self.capacity)
        self.stats.alive = True
        self._thread = threading.Thread(target=self._run, name="softtool-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    scores_prompt = True  # echo with logprobs, where the generator can score a prompt
    ranks_labels = True  # classify tasks rank their labels on the engine thread

    def health(self) -> tuple[bool, dict]:
        """Whether the engine can take rows, and what /health adds about it."""
        return self.alive, {}

    def not_applied(self, options: SearchOptions) -> list[str]:
        """Decoding options of a row this engine would not apply (none: the search applies all)."""
        return []

    async def stop(self) -> None:
        """Cancel what is left and end the thread (the server drains requests before calling this)."""
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put(("stop", None))
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # -- from the event loop -------------------------------------------------------------------------
    def submit(self, row: Row) -> None:
        if self._stopping or self._thread is None:
            raise RuntimeError("the engine is not running")
        self._commands.put(("submit", row))

    def cancel(self, row: Row) -> None:
        if not row.ended and self._thread is not None:
            self._commands.put(("cancel", row))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the engine thread between two steps (it may use the generator); returns its result."""
        if self._thread is None:
            raise RuntimeError("the engine is not running")
        future = self._loop.create_future()
        self._commands.put(("call", (fn, future)))
        return await future

    # -- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if self._engine.done:  # nothing waiting or running: sleep until a command comes
                    try:
                        command = self._commands.get(timeout=self.idle_wait)
                    except queue.Empty:
                        self._publish()
                        continue
                    if self._handle(command):
                        return
                while True:  # every command that arrived since the last step
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if self._handle(command):
                        return
                if not self._engine.done:
                    self._step()
                self._publish()
        finally:
            self.stats.alive = False
            self._fail_all("the server is shutting down", cancelled=True)

    def _handle(self, command) -> bool:
        """Apply one command; True to stop the thread."""
        kind, arg = command
        if kind == "stop":
            return True
        if kind == "submit":
            try:
                arg.item = self._engine.submit(
                    arg.ids, arg.task, arg.options, logprobs=arg.logprobs, prompt_logprobs=arg.prompt_logprobs
                )
            except Exception as exc:  # noqa: BLE001 - a bad row must not stop the engine
                self._deliver({arg: [Finished(error=str(exc))]})
                return False
            self._rows[arg.item] = arg
        elif kind == "cancel":
            if arg.item is not None and arg.item in self._rows:
                self._engine.cancel(arg.item)  # it shows up in the next step's finished list
        elif kind == "call":
            fn, future = arg
            try:
                result, error = fn(), None
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                result, error = None, exc
            self._loop.call_soon_threadsafe(_settle, future, result, error)
        return False

    def _step(self) -> None:
        try:
            emitted, finished = self._engine.step()
        except Exception as exc:  # noqa: BLE001 - fail the rows in flight, keep serving
            log.exception("engine step failed; failing %d row(s) in flight", len(self._rows))
            self._fail_all(f"the engine failed: {type(exc).__name__}: {exc}", cancelled=False)
            self._engine = Engine(self.generator, self.options, self.num_slots, self.capacity)
            return
        self.stats.steps += 1
        out: dict[Row, list] = {}
        for item, scores in self._engine.prompt_logprobs.items():
            row = self._rows.get(item)
            if row is not None:
                out[row] = [Prompt(scores)]
        scores = {item: iter(lps) for item, lps in self._engine.logprobs.items()}  # one per emitted token
        for item, token in emitted:
            row = self._rows.get(item)
            if row is None:
                continue
            events = out.setdefault(row, [])
            if not events or not isinstance(events[-1], Tokens):
                events.append(Tokens([], []))
            events[-1].ids.append(token)
            if item in scores:
                events[-1].logprobs.append(next(scores[item]))
        for item, hyp in finished:
            row = self._rows.pop(item, None)
            if row is not None:
                out.setdefault(row, []).append(Finished(hypothesis=hyp))
        if out:
            self._deliver(out)

    def _fail_all(self, message: str, cancelled: bool) -> None:
        rows, self._rows = self._rows, {}
        out = {row: [Finished(cancelled=cancelled, error=message)] for row in rows.values()}
        while True:  # rows submitted but never handled
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                out[arg] = [Finished(cancelled=cancelled, error=message)]
            elif kind == "call":
                self._loop.call_soon_threadsafe(_settle, arg[1], None, RuntimeError(message))
        if out:
            self._deliver(out)

    def _deliver(self, out: dict[Row, list]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(_dispatch, out)

    def _publish(self) -> None:
        search = self._engine.search
        self.stats.active = int(search.num_active())
        self.stats.pending = int(search.num_pending())


def _dispatch(out: dict[Row, list]) -> None:
    """On the event loop: hand each row its events of one step."""
    for row, events in out.items():
        for event in events:
            if isinstance(event, Finished):
                row.ended = True
            row.events.put_nowait((row.index, event))


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
