"""POST /v1/completions: a validated request in, engine rows out, a response or a stream of chunks back.

`CompletionService.prepare` turns a `CompletionRequest` into rows (or an `ApiError`: unknown task, a budget
over the cap, a prompt that does not fit the context, fields that do not fit the template); `generate`
submits them and yields each row's new text as it comes (detokenized, stop strings applied), which
`complete` collects into one response and `stream` turns into server-sent events. The engine knows nothing
of HTTP, and this module nothing of routes.

Prompts: in template mode (`model: TASK`) a string fills the task template's open field (token ids only a field
that stands alone in it); in prefix mode (`model: TASK:prefix`) the row is the task's virtual tokens, then the
prompt's tokens (a string tokenized without special tokens, or token ids as given), which needs a template with
every virtual token in front. Token ids are checked against the vocabulary. `echo` puts the row's real tokens
(the prompt, and in template mode the template's text) before the completion. Each choice's text and
log-probs are built by softtool.serve.choice.Choice.

A classify task (template mode) is answered as `softtool eval` predicts: every label is scored after the prompt
(rank classification, softtool.classify, run on the engine thread between two decode steps) and the completion is
the best label's text; with `logprobs`, the one entry's `top_logprobs` holds every label's log-likelihood.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from softtool.prompts.template import Template, assemble_ids, virtual_token_id
from softtool.search import DECODING_OFF, SearchOptions
from softtool.serve.choice import Choice
from softtool.serve.engine import AsyncEngine, Finished, Prompt, Row
from softtool.serve.metrics import Metrics
from softtool.serve.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    Usage,
    completion_id,
    error_body,
)
from softtool.serve.registry import PREFIX_MODE, Registry, Task

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
    echoes: list[list[int] | None] = field(default_factory=list)  # per row with echo: its prompt's real tokens
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))
    generated: int = 0  # tokens generated over all choices (set when generation ends)
    status: int = 200  # what a stream ended with (an error is sent as an event after the 200 header)
    ranked: bool = False  # a classify task's request: its labels are ranked, nothing is generated
    not_applied: list[str] = field(default_factory=list)  # task decoding defaults the engine does not apply


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
        found = self.registry.resolve(request.model)
        if found is None:
            raise ApiError(404, f"The model '{request.model}' does not exist", "model", "model_not_found")
        task, prefix = found
        cap = self.options.max_tokens
        budget = request.max_tokens if request.max_tokens is not None else min(DEFAULT_MAX_TOKENS, cap)
        if budget > cap:
            raise ApiError(400, f"max_tokens is {budget}; this server allows at most {cap}", "max_tokens")
        if request.n > self.options.max_n:
            raise ApiError(400, f"n is {request.n}; this server allows at most {self.options.max_n}", "n")
        if request.min_tokens is not None and request.min_tokens > budget:
            raise ApiError(400, f"min_tokens ({request.min_tokens}) is above max_tokens ({budget})", "min_tokens")
        if request.echo and not self.engine.generator.can_score_prompt:
            raise ApiError(
                400,
                f"echo needs the prompt's log-probs, which {self.engine.generator.where} cannot compute (an export "
                "made before format 3); re-run softtool export on its adapters to use echo",
                "echo",
            )
        ranked = task.classifier is not None and not prefix
        if ranked and not self.engine.ranks_labels:
            raise ApiError(
                400,
                f"'{task.name}' is a classify task, answered by ranking every label after the prompt; the vLLM engine "
                "cannot score a prompt given as embeddings, so classify tasks are served by softtool's engine "
                "(softtool serve without --engine vllm)",
                "model",
            )
        if request.echo and request.logprobs is not None and not self.engine.scores_prompt:
            raise ApiError(
                400,
                "echo with logprobs needs the prompt's log-probs, which vLLM does not return for a prompt given as "
                "embeddings; ask for echo or logprobs alone",
                "echo",
            )
        if ranked and request.echo:
            raise ApiError(400, f"'{task.name}' is a classify task: it answers with a label, without echo", "echo")
        options = self._search_options(request, budget, self.engine.generator.decoding(task.task_id))
        make_ids = self._prefix_ids(task, request) if prefix else self._template_ids(task, request)
        scoring = {"logprobs": request.logprobs, "prompt_logprobs": bool(request.echo) and request.logprobs is not None}
        rows, echoes, prompt_tokens = [], [], 0
        for prompt in request.prompts:
            if isinstance(prompt, list) and max(prompt) >= self.vocab_size:
                raise ApiError(
                    400, f"prompt token id {max(prompt)} is outside the vocabulary [0, {self.vocab_size})", "prompt"
                )
            ids = make_ids(prompt)
            if not any(t < self.vocab_size for t in ids):
                raise ApiError(400, "the prompt is empty: the template leaves no text to read", "prompt")
            limit = self.options.max_length
            if ranked:  # the completion is a label, whatever max_tokens says
                budget = max(len(c) for c in task.classifier.label_token_ids(self.tokenizer, eos=True))
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
            rows += [Row(ids, task.task_id, options, **scoring) for _ in range(request.n)]
            echoes += [[t for t in ids if t < self.vocab_size] if request.echo else None] * request.n
        return Prepared(
            request,
            task,
            rows,
            prompt_tokens,
            request.stops,
            arrived,
            echoes=echoes,
            ranked=ranked,
            not_applied=self.engine.not_applied(options),
        )

    def _prefix_ids(self, task: Task, request: CompletionRequest):
        """Prefix mode: the task's virtual tokens, then the prompt as it is (PEFT's prepend convention)."""
        template = task.template
        if not template.is_prefix:
            raise ApiError(
                400,
                f"'{request.model}' asks for prefix mode, but the template of '{task.name}' ({template}) has virtual "
                f"tokens after its text; prefix mode needs all of them in front: use model '{task.name}'",
                "model",
            )
        if request.fields:
            raise ApiError(400, f"prefix mode ('{task.name}{PREFIX_MODE}') takes no template fields", "fields")
        n = template.num_virtual_tokens
        virtual = [virtual_token_id(self.vocab_size, n, task.task_id, j) for j in range(n)]
        return lambda prompt: virtual + (prompt if isinstance(prompt, list) else self._tokenize(prompt))

    def _template_ids(self, task: Task, request: CompletionRequest):
        """Template mode: the prompt fills the template's one field that `fields` leaves open."""
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
        field_name = open_fields[0]

        def make(prompt: str | list[int]) -> list[int]:
            if isinstance(prompt, str):
                pieces = [self._tokenize(p) for p in template.render({**fields, field_name: prompt})]
            else:
                pieces = self._pieces_around(task, template, fields, field_name, prompt)
            return assemble_ids(template, pieces, self.vocab_size, task.task_id)

        return make

    def _pieces_around(self, task: Task, template: Template, fields: dict, field_name: str, ids: list[int]):
        """Token ids fill a text piece that is the field alone; text around them would tokenize differently."""
        alone = "{" + field_name + "}"
        pieces = []
        for text in template.render({**fields, field_name: alone}):
            if text == alone:
                pieces.append(list(ids))
            elif alone in text:
                raise ApiError(
                    400,
                    f"token-id prompts fill {alone} only where it stands alone in the template; the template of "
                    f"'{task.name}' ({template}) has text around it: send text, or use model "
                    f"'{task.name}{PREFIX_MODE}'",
                    "prompt",
                )
            else:
                pieces.append(self._tokenize(text))
        return pieces

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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
        """Submit the rows, or refuse with 429 (queue full) or 503 (shutting down). A classify request's rows are
        ranked when it is answered, not submitted."""
        if not self.accepting or not self.engine.alive:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if prepared.ranked:
            self.metrics.prompt_tokens.labels(prepared.task.name).inc(prepared.prompt_tokens)
            return
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

    async def generate(self, prepared: Prepared) -> AsyncIterator[tuple[int, str, Choice]]:
        """Yield (choice index, new text, choice) as text arrives, and once more per choice when it ends.

        Leaving early (a disconnect, an error) cancels the rows still running."""
        rows = prepared.rows
        want = prepared.request.logprobs
        choices = [Choice(self.tokenizer, prepared.stops, echo, want) for echo in prepared.echoes]
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
                elif isinstance(event, Prompt):  # the prompt's scores, before its first tokens
                    real = [s for t, s in zip(rows[index].ids, event.logprobs, strict=True) if t < self.vocab_size]
                    choice.prompt_scores = real
                    continue
                else:
                    if first:
                        first = False
                        self.metrics.ttft.labels(prepared.task.name).observe(time.perf_counter() - prepared.arrived)
                    emitted[index] += len(event.ids)
                    choice.add(event.ids, event.logprobs)
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

    async def rank(self, prepared: Prepared) -> list[CompletionChoice]:
        """A classify request's choices: its labels ranked after each prompt (n copies of each answer)."""
        from softtool.classify import rank_rows

        task, generator = prepared.task, self.engine.generator
        spec = task.classifier
        distinct = prepared.rows[:: prepared.request.n]
        ids = [row.ids for row in distinct]
        scores, labels = await self.engine.call(
            lambda: rank_rows(generator, spec, ids, [task.task_id] * len(ids), eos=True)
        )
        choices = []
        for i, (row, label) in enumerate(zip(scores, labels, strict=True)):
            text = spec.separator + spec.verbalize(label)
            logprobs = None
            if prepared.request.logprobs is not None:
                by_label = {
                    spec.separator + spec.verbalize(name): float(v) for name, v in zip(spec.labels, row, strict=True)
                }
                logprobs = CompletionLogprobs(
                    tokens=[text], token_logprobs=[by_label[text]], top_logprobs=[by_label], text_offset=[0]
                )
            for k in range(prepared.request.n):
                choices.append(CompletionChoice(index=i * prepared.request.n + k, text=text, logprobs=logprobs,
                                                finish_reason="stop"))  # fmt: skip
        label_ids = dict(zip(spec.labels, spec.label_token_ids(self.tokenizer), strict=True))
        prepared.generated = prepared.request.n * sum(len(label_ids[label]) for label in labels)
        self.metrics.generated_tokens.labels(task.name).inc(prepared.generated)
        self.metrics.latency.labels(task.name).observe(time.perf_counter() - prepared.arrived)
        return choices

    async def complete(self, prepared: Prepared) -> CompletionResponse:
        """The whole response at once."""
        if prepared.ranked:
            return CompletionResponse(
                id=prepared.id,
                created=prepared.created,
                model=prepared.request.model,
                choices=await self.rank(prepared),
                usage=self.usage(prepared),
            )
        texts: dict[int, Choice] = {}
        async for index, _, choice in self.generate(prepared):
            texts[index] = choice
        choices = [
            CompletionChoice(
                index=i,
                text=texts[i].echo + texts[i].text,
                logprobs=texts[i].logprobs(),
                finish_reason=texts[i].finish_reason,
                token_ids=list(texts[i].tokens) if prepared.request.return_token_ids else None,
            )
            for i in range(len(prepared.rows))
        ]
        return CompletionResponse(
            id=prepared.id,
            created=prepared.created,
            model=prepared.request.model,
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
                id=prepared.id, created=prepared.created, model=prepared.request.model, choices=choices, usage=usage
            )
            return f"data: {body.model_dump_json(exclude=leave_out)}\n\n"

        try:
            if prepared.ranked:
                for piece in await self.rank(prepared):
                    yield chunk([piece])
            else:
                ids_sent: dict[int, int] = {}  # per choice: token ids already sent (return_token_ids)
                async for index, delta, choice in self.generate(prepared):
                    logprobs = choice.take_logprobs()
                    ids = None
                    if prepared.request.return_token_ids:
                        ids = list(choice.tokens[ids_sent.get(index, 0) :])
                        ids_sent[index] = len(choice.tokens)
                    # release() gives the rest once a choice ends; a token's entry comes with the text it starts in
                    if delta or ids or choice.finish_reason is not None or (logprobs is not None and logprobs.tokens):
                        piece = CompletionChoice(
                            index=index,
                            text=delta,
                            logprobs=logprobs,
                            finish_reason=choice.finish_reason,
                            token_ids=ids,
                        )
                        yield chunk([piece])
        except ApiError as exc:
            prepared.status = exc.status
            yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.param, exc.code))}\n\n"
        else:
            if with_usage:
                yield chunk([], self.usage(prepared))
        yield "data: [DONE]\n\n"
