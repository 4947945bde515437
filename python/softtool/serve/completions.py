"""POST /v1/completions: a validated request in, engine rows out, a response or a stream of chunks back.

`CompletionService.prepare` turns a `CompletionRequest` into rows (or an `ApiError`: unknown task, a budget
over the cap, a prompt that does not fit the context, fields that do not fit the template); `generate`
submits them and yields each row's new text as it comes (detokenized, stop strings applied), which
`complete` collects into one response and `stream` turns into server-sent events. The engine knows nothing
of HTTP, and this module nothing of routes.

Text: each choice's text is `tokenizer.decode(tokens, skip_special_tokens=True)` of its tokens, exactly what
`softtool generate --raw` decodes (which then strips the ends). A stream sends the growth of that text,
holding back an incomplete character and, with `stop`, the tail that could still become a stop string, so
the chunks add up to the non-streamed text.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from softtool.prompts.template import assemble_ids
from softtool.search import DECODING_OFF, SearchOptions
from softtool.serve.engine import AsyncEngine, Finished, Row
from softtool.serve.metrics import Metrics
from softtool.serve.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    Usage,
    completion_id,
    error_body,
)
from softtool.serve.registry import Registry, Task

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """A request the server answers with an error status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


@dataclass
class Prepared:
    """A request turned into rows, ready to submit."""

    request: CompletionRequest
    task: Task
    rows: list[Row]
    prompt_tokens: int
    stops: list[str]
    arrived: float
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))
    generated: int = 0  # tokens generated over all choices (set when generation ends)
    status: int = 200  # what a stream ended with (an error is sent as an event after the 200 header)


class _Choice:
    """One row's text as it grows: detokenized, cut at a stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # chars that may start a stop string
        self.tokens: list[int] = []
        self.text = ""  # the text so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` already released
        self.finish_reason: str | None = None
        self._checked = 0  # `text` before this index holds no stop string

    def add(self, tokens: list[int]) -> None:
        self.tokens += tokens
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stops:
            start = max(0, self._checked - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish_reason = "stop"
            self._checked = len(self.text)

    def finish(self, event: Finished, emitted: int) -> None:
        if self.finish_reason is None:
            # The engine emits the EOS token but leaves it out of the hypothesis.
            hyp = event.hypothesis
            self.finish_reason = "stop" if hyp is not None and emitted > len(hyp.tokens) else "length"

    def release(self) -> str:
        """The text not yet sent that can be sent now."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= self.hold
            while end > self.sent and self.text[end - 1] == "\ufffd":  # a character still split between tokens
                end -= 1
        if end <= self.sent:
            return ""
        delta = self.text[self.sent : end]
        self.sent = end
        return delta


class CompletionService:
    """Requests to engine rows and back (the serving class of /v1/completions)."""

    def __init__(self, engine: AsyncEngine, registry: Registry, tokenizer, vocab_size: int, options, metrics: Metrics):
        self.engine = engine
        self.registry = registry
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.options = options  # ServeOptions
        self.metrics = metrics
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.inflight = 0  # rows submitted and not finished (event loop only)
        self.accepting = True

    # -- a request into rows ----------------------------------------------------------------------------
    def prepare(self, request: CompletionRequest, arrived: float) -> Prepared:
        task = self.registry.get(request.model)
        if task is None:
            raise ApiError(404, f"The model '{request.model}' does not exist", "model", "model_not_found")
        cap = self.options.max_tokens
        budget = request.max_tokens if request.max_tokens is not None else min(DEFAULT_MAX_TOKENS, cap)
        if budget > cap:
            raise ApiError(400, f"max_tokens is {budget}; this server allows at most {cap}", "max_tokens")
        if request.n > self.options.max_n:
            raise ApiError(400, f"n is {request.n}; this server allows at most {self.options.max_n}", "n")
        if request.min_tokens is not None and request.min_tokens > budget:
            raise ApiError(400, f"min_tokens ({request.min_tokens}) is above max_tokens ({budget})", "min_tokens")
        options = self._search_options(request, budget, self.engine.generator.decoding(task.task_id))
        fields = dict(request.fields or {})
        template = task.template
        unknown = sorted(set(fields) - set(template.fields))
        open_fields = [f for f in template.fields if f not in fields]
        if unknown or len(open_fields) != 1:
            raise ApiError(
                400,
                f"the template of '{task.name}' has the field(s) {template.fields}: the prompt fills one, `fields` "
                f"gives the others (got fields {sorted(fields)})",
                "fields",
            )
        rows, prompt_tokens = [], 0
        for text in request.prompts:
            pieces = template.render({**fields, open_fields[0]: text})
            ids = assemble_ids(
                template,
                [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces],
                self.vocab_size,
                task.task_id,
            )
            if not any(t < self.vocab_size for t in ids):
                raise ApiError(400, "the prompt is empty: the template leaves no text to read", "prompt")
            limit = self.options.max_length
            if len(ids) + budget > limit:
                raise ApiError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{len(ids) + budget} tokens ({len(ids)} in the prompt, virtual tokens included; {budget} in the "
                    "completion). Please reduce the prompt or max_tokens.",
                    "prompt",
                    "context_length_exceeded",
                )
            prompt_tokens += len(ids)
            rows += [Row(ids, task.task_id, options) for _ in range(request.n)]
        return Prepared(request, task, rows, prompt_tokens, request.stops, arrived)

    def _search_options(self, request: CompletionRequest, budget: int, decoding: dict) -> SearchOptions:
        """The request's decoding; what it leaves unset comes from the task's recorded defaults (`decoding`)."""
        decoding = {**DECODING_OFF, **decoding}
        temperature = 0.0 if request.temperature is None else float(request.temperature)
        sample = temperature > 0  # temperature 0 (the default) is greedy search, as `softtool generate`
        try:
            return SearchOptions(
                max_new_tokens=budget,
                min_new_tokens=request.min_tokens or 0,
                eos_token_ids=self.eos,
                pad_token_id=self.pad,
                do_sample=sample,
                temperature=temperature if sample else 1.0,
                top_p=float(request.top_p) if sample and request.top_p is not None else 1.0,
                top_k=(request.top_k or 0) if sample else 0,
                repetition_penalty=float(request.repetition_penalty or decoding["repetition_penalty"]),
                no_repeat_ngram_size=int(decoding["no_repeat_ngram_size"]),
                seed=request.seed if request.seed is not None else random.getrandbits(62),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc

    # -- rows through the engine ------------------------------------------------------------------------
    def admit(self, prepared: Prepared) -> None:
        """Submit the rows, or refuse with 429 (queue full) or 503 (shutting down)."""
        if not self.accepting or not self.engine.alive:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        rows = len(prepared.rows)
        room = self.options.slots + self.options.max_queue - self.inflight
        if rows > room:
            raise ApiError(
                429,
                f"the server is busy: {self.inflight} rows in flight, room for {self.options.max_queue} waiting; "
                "retry later",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        queue: asyncio.Queue = asyncio.Queue()
        for index, row in enumerate(prepared.rows):
            row.index, row.events = index, queue
            self.engine.submit(row)
        self.inflight += rows
        self.metrics.prompt_tokens.labels(prepared.task.name).inc(prepared.prompt_tokens)

    async def generate(self, prepared: Prepared) -> AsyncIterator[tuple[int, str, _Choice]]:
        """Yield (choice index, new text, choice) as text arrives, and once more per choice when it ends.

        Leaving early (a disconnect, an error) cancels the rows still running."""
        rows = prepared.rows
        choices = [_Choice(self.tokenizer, prepared.stops) for _ in rows]
        emitted = [0] * len(rows)
        open_rows = set(range(len(rows)))
        queue = rows[0].events
        first = True
        try:
            while open_rows:
                index, event = await queue.get()
                if index not in open_rows:
                    continue  # a row already ended by a stop string: its last tokens are dropped
                choice = choices[index]
                if isinstance(event, Finished):
                    if event.error is not None and choice.finish_reason is None:
                        raise ApiError(500 if not event.cancelled else 503, event.error, code="engine_error")
                    choice.finish(event, emitted[index])
                else:
                    if first:
                        first = False
                        self.metrics.ttft.labels(prepared.task.name).observe(time.perf_counter() - prepared.arrived)
                    emitted[index] += len(event)
                    choice.add(event)
                    if choice.finish_reason is not None:  # a stop string: end the row now
                        self.engine.cancel(rows[index])
                if choice.finish_reason is not None:
                    open_rows.discard(index)
                    self.inflight -= 1
                yield index, choice.release(), choice
        finally:
            for index in open_rows:
                self.engine.cancel(rows[index])
                self.inflight -= 1
            generated = sum(emitted)
            self.metrics.generated_tokens.labels(prepared.task.name).inc(generated)
            prepared.generated = generated
            if not open_rows:
                self.metrics.latency.labels(prepared.task.name).observe(time.perf_counter() - prepared.arrived)

    def usage(self, prepared: Prepared) -> Usage:
        prompt = prepared.prompt_tokens  # each prompt once, whatever n (as OpenAI counts)
        return Usage(
            prompt_tokens=prompt, completion_tokens=prepared.generated, total_tokens=prompt + prepared.generated
        )

    async def complete(self, prepared: Prepared) -> CompletionResponse:
        """The whole response at once."""
        texts: dict[int, _Choice] = {}
        async for index, _, choice in self.generate(prepared):
            texts[index] = choice
        choices = [
            CompletionChoice(index=i, text=texts[i].text, finish_reason=texts[i].finish_reason)
            for i in range(len(prepared.rows))
        ]
        return CompletionResponse(
            id=prepared.id,
            created=prepared.created,
            model=prepared.task.name,
            choices=choices,
            usage=self.usage(prepared),
        )

    async def stream(self, prepared: Prepared) -> AsyncIterator[str]:
        """Server-sent events: a chunk per new piece of text, a last chunk per choice with its finish reason,
        the usage when stream_options.include_usage, then `data: [DONE]`."""
        options = prepared.request.stream_options
        with_usage = options is not None and options.include_usage
        leave_out = None if with_usage else {"usage"}  # OpenAI sends "usage" only when asked to

        def chunk(choices, usage=None) -> str:
            body = CompletionStreamResponse(
                id=prepared.id, created=prepared.created, model=prepared.task.name, choices=choices, usage=usage
            )
            return f"data: {body.model_dump_json(exclude=leave_out)}\n\n"

        try:
            async for index, delta, choice in self.generate(prepared):
                if delta or choice.finish_reason is not None:  # release() gives the rest once a choice ends
                    yield chunk([CompletionChoice(index=index, text=delta, finish_reason=choice.finish_reason)])
        except ApiError as exc:
            prepared.status = exc.status
            yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.param, exc.code))}\n\n"
        else:
            if with_usage:
                yield chunk([], self.usage(prepared))
        yield "data: [DONE]\n\n"
