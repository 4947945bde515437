"""`VllmEngine`: the serve engine whose rows are decoded by vLLM servers, one completions request per row.

It takes the place of softtool.serve.engine.AsyncEngine under the same CompletionService: `submit` a Row (its
full ids, virtual ones included, and its SearchOptions), read `(index, event)` from its queue: `Tokens` as vLLM
streams them, then one `Finished`. Each row becomes a streamed vLLM completions request whose `prompt_embeds` is
the row embedded exactly as softtool's own runtime embeds it (softtool.prompts.embedding.merge_embeddings over
the tasks' prompt tables), sent to the backend the Balancer picks.

What vLLM is asked for, and why:
- its token ids (`return_token_ids`) rather than its text: softtool detokenizes with its own tokenizer, so text,
  stop strings and log-prob entries are built as for softtool's engine (softtool.serve.choice);
- `ignore_eos` with softtool's EOS ids as `stop_token_ids`: the row stops where `softtool generate` stops, not on
  extra ids a model's generation config might add;
- the task's no-repeat n-gram size and repetition penalty, with the row's ids, as `vllm_xargs` for softtool's
  logits processor inside vLLM (softtool.serve.vllm.processor); vLLM sees only embeddings, so its own repetition
  penalty could not count the prompt;
- log-probs as `token_id:N` strings, raw (vLLM's default logprobs mode, softtool's too: the model's own).

A row cancelled (a stop string, a client gone) closes its HTTP stream, which makes vLLM abort the request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch

from softtool.prompts.embedding import merge_embeddings
from softtool.runtime.logprobs import TokenLogprob
from softtool.serve.engine import EngineStats, Finished, Row, Tokens
from softtool.serve.vllm.balancer import Backend, Balancer

log = logging.getLogger("softtool.serve")

TOKEN_PREFIX = "token_id:"  # vLLM's `return_tokens_as_token_ids` form of a token


@dataclass
class Ended:
    """What a row produced, shaped as the search's Hypothesis for Choice.finish: its tokens without the EOS."""

    tokens: list[int] = field(default_factory=list)
    score: float = 0.0


class BackendError(Exception):
    """A vLLM request that failed; `retry` when it never reached the model (another backend may take it)."""

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message)
        self.retry = retry


class VllmEngine:
    """Rows in, vLLM requests out: the AsyncEngine interface over a Balancer of vLLM servers."""

    scores_prompt = False  # vLLM gives no prompt log-probs for prompt_embeds: no echo with logprobs
    ranks_labels = False  # a classify task's labels need the prompt's scores too

    def __init__(
        self,
        generator,
        balancer: Balancer,
        *,
        processor: bool = True,
        timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.generator = generator  # the tasks' tables, templates and decoding defaults; its model embeds
        self.balancer = balancer
        self.processor = processor  # the backends run softtool's logits processor
        self.timeout = timeout
        self.transport = transport  # tests: a fake vLLM
        # /metrics: `active` counts rows in flight to vLLM; slots, pending and steps are vLLM's (its own /metrics)
        self.stats = EngineStats()
        self._client: httpx.AsyncClient | None = None
        self._tasks: dict[Row, asyncio.Task] = {}
        self._watch: asyncio.Task | None = None
        self._stopping = False
        self._looked: asyncio.Event | None = None  # set once every backend was looked at (rows wait for it)
        self._embed = generator.model.get_input_embeddings()

    # -- life ---------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=10.0), transport=self.transport)
        self.stats.alive = True
        self._looked = asyncio.Event()
        self._watch = asyncio.ensure_future(self._health_loop())

    async def _health_loop(self) -> None:
        try:
            await self.balancer.check(self._client)
        finally:
            self._looked.set()
        await self.balancer.watch(self._client)

    @property
    def alive(self) -> bool:
        return self._client is not None and not self._stopping

    def health(self) -> tuple[bool, dict]:
        """Healthy when at least one backend is; the body lists each backend."""
        backends = [b.as_dict() for b in self.balancer.backends]
        return self.alive and bool(self.balancer.healthy), {"engine": "vllm", "backends": backends}

    async def stop(self) -> None:
        self._stopping = True
        for task in [*self._tasks.values(), self._watch]:
            if task is not None:
                task.cancel()
        for task in [*self._tasks.values(), self._watch]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._client is not None:
            await self._client.aclose()
        self._client = None
        self.stats.alive = False

    # -- from the event loop -------------------------------------------------------------------------
    def submit(self, row: Row) -> None:
        if not self.alive:
            raise RuntimeError("the engine is not running")
        self.stats.active += 1
        self._tasks[row] = asyncio.ensure_future(self._run(row))

    def cancel(self, row: Row) -> None:
        task = self._tasks.get(row)
        if task is not None and not row.ended:
            task.cancel()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` (adding a task to the generator): nothing decodes on this process, so no thread to wait for."""
        return fn()

    # -- one row -------------------------------------------------------------------------------------
    async def _run(self, row: Row) -> None:
        try:
            body = self.request_body(row)
            ended = await self._send(row, body)
            self._deliver(row, Finished(hypothesis=ended))
        except asyncio.CancelledError:
            row.ended = True  # nobody reads this row's events any more (CompletionService cancelled it)
        except BackendError as exc:
            self._deliver(row, Finished(error=str(exc), cancelled=exc.retry))
        except Exception as exc:  # noqa: BLE001 - a bad row must not take the server down
            log.exception("a vLLM request failed")
            self._deliver(row, Finished(error=f"{type(exc).__name__}: {exc}"))
        finally:
            self._tasks.pop(row, None)
            self.stats.active -= 1

    def _deliver(self, row: Row, event) -> None:
        if isinstance(event, Finished):
            row.ended = True
        row.events.put_nowait((row.index, event))

    async def _send(self, row: Row, body: dict) -> Ended:
        """Send to the least busy healthy backend; one that cannot be reached before any token is skipped."""
        await self._looked.wait()  # a row that arrives with the server has its backends looked at first
        tried: set[str] = set()
        while True:
            backend = self.balancer.pick()
            if backend is None or backend.url in tried:
                down = "; ".join(f"{b.url}: {b.error or 'not checked yet'}" for b in self.balancer.backends)
                raise BackendError(f"no vLLM backend is healthy ({down})", retry=True)
            tried.add(backend.url)
            backend.outstanding += 1
            try:
                return await self._stream(row, backend, {**body, "model": backend.model})
            except BackendError as exc:
                if not exc.retry:
                    raise
                self.balancer.mark_down(backend, str(exc))
            finally:
                backend.outstanding -= 1

    async def _stream(self, row: Row, backend: Backend, body: dict) -> Ended:
        tokens: list[int] = []
        finish = None
        try:
            async with self._client.stream("POST", f"{backend.url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    raise BackendError(f"vLLM at {backend.url} answered {response.status_code}: {_message(text)}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:
                        raise BackendError(f"vLLM at {backend.url}: {_message(json.dumps(chunk))}")
                    for choice in chunk.get("choices", []):
                        ids = [int(t) for t in choice.get("token_ids") or []]
                        if ids:
                            tokens += ids
                            scores = _logprobs(choice.get("logprobs"), ids) if row.logprobs is not None else []
                            row.started = True
                            self._deliver(row, Tokens(ids, scores))
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as exc:
            # Before the first token nothing was generated: another backend can take the row.
            raise BackendError(f"vLLM at {backend.url}: {type(exc).__name__}: {exc}", retry=not tokens) from exc
        eos = set(row.options.eos_token_ids)
        kept = tokens[:-1] if finish == "stop" and tokens and tokens[-1] in eos else tokens
        return Ended(kept)

    # -- the request ---------------------------------------------------------------------------------
    def embed(self, ids: list[int]) -> torch.Tensor:
        """The row's input embeddings [T, H]: text ids through the model's embedding, virtual ids from the table."""
        generator = self.generator
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long, device=generator.kv_device)
            return merge_embeddings(self._embed, x, generator.table, generator.vocab_size)[0].float().cpu()

    def request_body(self, row: Row) -> dict:
        """The vLLM completions request of one row (without `model`, which the chosen backend names)."""
        options = row.options
        buffer = io.BytesIO()
        torch.save(self.embed(row.ids).contiguous(), buffer)
        body: dict[str, Any] = {
            "prompt_embeds": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "max_tokens": int(options.max_new_tokens),
            "min_tokens": int(options.min_new_tokens),
            "temperature": float(options.temperature) if options.do_sample else 0.0,
            "top_p": float(options.top_p) if options.do_sample else 1.0,
            "top_k": int(options.top_k) if options.do_sample and options.top_k else -1,
            # The n rows of a request share its options: each its own seed, or their samples would all be one.
            "seed": (int(options.seed) + row.index) % 2**63,
            "ignore_eos": True,
            "stop_token_ids": [int(t) for t in options.eos_token_ids],
            "stream": True,
            "return_token_ids": True,
        }
        if row.logprobs is not None:
            body["logprobs"] = int(row.logprobs)
            body["return_tokens_as_token_ids"] = True
        xargs = self.processor_args(row)
        if xargs:
            body["vllm_xargs"] = xargs
        return body

    def processor_args(self, row: Row) -> dict:
        """softtool's logits processor's arguments for this row, or {} when it has nothing to do."""
        options = row.options
        if not self.processor:
            return {}
        n, penalty = int(options.no_repeat_ngram_size), float(options.repetition_penalty)
        if n <= 0 and penalty == 1.0:
            return {}
        return {"softtool_ngram": n, "softtool_penalty": penalty, "softtool_history": [int(t) for t in row.ids]}

    def not_applied(self, options) -> list[str]:
        """The task defaults a request's decoding would lose on these backends (without softtool's processor)."""
        if self.processor:
            return []
        lost = []
        if options.no_repeat_ngram_size > 0:
            lost.append(f"no_repeat_ngram_size={options.no_repeat_ngram_size}")
        if options.repetition_penalty != 1.0:
            lost.append(f"repetition_penalty={options.repetition_penalty:g}")
        return lost


def _token(text: str) -> int:
    return int(text.removeprefix(TOKEN_PREFIX))


def _logprobs(entry: dict | None, ids: list[int]) -> list[TokenLogprob]:
    """vLLM's legacy `logprobs` of a chunk (tokens as token_id:N) -> one TokenLogprob per new token."""
    if not entry:
        return [TokenLogprob(t, float("nan")) for t in ids]
    out = []
    values = entry.get("token_logprobs") or []
    tops = entry.get("top_logprobs") or []
    for i, token in enumerate(ids):
        value = values[i] if i < len(values) and values[i] is not None else float("nan")
        top = tops[i] if i < len(tops) and tops[i] else {}
        ranked = sorted(((_token(k), float(v)) for k, v in top.items()), key=lambda p: -p[1])
        out.append(TokenLogprob(int(token), float(value), ranked))
    return out


def _message(text: str) -> str:
    """vLLM's error message out of its error body (or the body, cut short)."""
    try:
        body = json.loads(text)
        error = body.get("error", body)
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return text[:300]
