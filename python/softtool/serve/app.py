"""The HTTP layer: FastAPI routes, the API key check, error bodies, metrics and the server's lifetime.

Routes only wire requests to `CompletionService` (softtool.serve.completions) and format what it returns;
request shapes come from softtool.serve.protocol, the engine thread from softtool.serve.engine. uvicorn
runs the app; on SIGTERM it stops accepting connections, lets the requests in flight finish for up to
--shutdown-timeout seconds, cancels the rest, and then the engine thread stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from softtool.search import SearchOptions
from softtool.serve.completions import ApiError, CompletionService
from softtool.serve.engine import AsyncEngine
from softtool.serve.metrics import UNKNOWN_TASK, Metrics
from softtool.serve.options import ServeOptions
from softtool.serve.protocol import CompletionRequest, ModelCard, ModelList, error_body
from softtool.serve.registry import AdapterWatcher, Loaded

log = logging.getLogger("softtool.serve")

API_KEY_ENV = "SOFTTOOL_API_KEY"
NOT_APPLIED_HEADER = "X-Softtool-Not-Applied"  # decoding defaults of the task the engine did not apply
MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body larger than this is refused (413) before it is read


@dataclass
class ServerState:
    """Everything the routes share: the tasks, the engine thread, the completion service, the metrics."""

    options: ServeOptions
    loaded: Loaded
    engine: AsyncEngine = field(init=False)  # or a VllmEngine (--engine vllm): the same interface
    service: CompletionService = field(init=False)
    metrics: Metrics = field(init=False)
    watcher: AdapterWatcher | None = None

    def __post_init__(self) -> None:
        generator = self.loaded.generator
        tokenizer = generator.tokenizer
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        defaults = SearchOptions(
            max_new_tokens=self.options.max_tokens, eos_token_ids=eos, pad_token_id=generator.pad_token_id
        )
        if self.options.engine == "vllm":
            from softtool.serve.vllm.backend import VllmEngine
            from softtool.serve.vllm.balancer import Balancer, parse_urls

            balancer = Balancer(parse_urls(self.options.vllm_url))
            self.engine = VllmEngine(generator, balancer, processor=self.options.vllm_processor)
        else:
            # One position more than the longest row: the cache's scratch column.
            self.engine = AsyncEngine(generator, defaults, self.options.slots, self.options.max_length + 1)
        self.metrics = Metrics(self.engine.stats, lambda: self.service.inflight)
        self.service = CompletionService(
            self.engine, self.loaded.registry, tokenizer, generator.vocab_size, self.options, self.metrics
        )
        self.metrics.tasks.set_function(lambda: len(self.loaded.registry))


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app over a loaded generator (the engine thread starts with the app's lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        watching = None
        if state.options.adapters_dir is not None:
            state.watcher = AdapterWatcher(
                state.options.adapters_dir, state.loaded, state.engine, state.options.watch_interval
            )
            watching = asyncio.create_task(state.watcher.run())
        try:
            yield
        finally:
            state.service.accepting = False
            if watching is not None:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            await state.engine.stop()

    app = FastAPI(title="softtool serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.softtool = state
    service, metrics, registry = state.service, state.metrics, state.loaded.registry
    api_key = state.options.api_key

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        if api_key is not None and request.url.path.startswith("/v1/"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
                return _error(401, "Incorrect API key provided", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        if request.url.path == "/v1/completions":
            metrics.requests.labels(UNKNOWN_TASK, "400").inc()
        return _error(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.get("/health")
    async def health():
        ok, details = state.engine.health()
        ok = ok and service.accepting
        body = {"status": "ok" if ok else "unavailable", "tasks": len(registry), **details}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[_card(task) for task in registry.tasks.values()])

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> ModelCard:
        task = registry.get(name)
        if task is None:
            raise ApiError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return _card(task)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        arrived = time.perf_counter()
        found = registry.resolve(body.model)
        label = found[0].name if found is not None else UNKNOWN_TASK
        try:
            prepared = service.prepare(body, arrived)
            service.admit(prepared)
        except ApiError as exc:
            metrics.requests.labels(label, str(exc.status)).inc()
            raise
        if body.stream:
            return StreamingResponse(
                _counted(service.stream(prepared), prepared, metrics),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **_not_applied(prepared)},
            )
        work = asyncio.ensure_future(service.complete(prepared))
        left = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client went away: cancelling the work cancels its rows (their slots free up)
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, ApiError):
                await work
            metrics.requests.labels(label, "499").inc()
            return Response(status_code=499)
        left.cancel()
        try:
            response = work.result()
        except ApiError as exc:
            metrics.requests.labels(label, str(exc.status)).inc()
            raise
        metrics.requests.labels(label, "200").inc()
        if prepared.not_applied:
            return JSONResponse(response.model_dump(), headers=_not_applied(prepared))
        return response

    return app


def _not_applied(prepared) -> dict[str, str]:
    """The task's decoding defaults that this engine could not apply (--engine vllm --no-vllm-processor)."""
    return {NOT_APPLIED_HEADER: ", ".join(prepared.not_applied)} if prepared.not_applied else {}


def _card(task) -> ModelCard:
    return ModelCard(id=task.name, created=task.created, root=task.source)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _counted(chunks: AsyncIterator[str], prepared, metrics: Metrics) -> AsyncIterator[str]:
    """A stream that counts its request when it ends: 200, the error's status, or 499 when the client left."""
    status = "499"
    try:
        async for chunk in chunks:
            yield chunk
        status = str(prepared.status)
    finally:
        metrics.requests.labels(prepared.task.name, status).inc()


def _error(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's first complaint as one line ("max_tokens: Input should be greater than or equal to 1")."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', message)})", None
    if first.get("type") == "extra_forbidden":
        return f"unknown field {'.'.join(loc)!r}", ".".join(loc) or None
    if first.get("type") == "missing" and not loc:
        return "the body must be a JSON object", None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{'.'.join(loc)}: {message}" if loc else message) + more, (".".join(loc) or None)


# -- running it ---------------------------------------------------------------------------------------------
def serve(options: ServeOptions, loaded: Loaded, *, ready: Callable[[str], None] | None = None) -> None:
    """Run the server until SIGTERM or Ctrl-C (blocking). `ready(url)` is called once it accepts connections."""
    import uvicorn

    if not options.loopback and options.api_key is None:
        log.warning("binding %s without --api-key: anyone who can reach this address can use the server", options.host)
    state = ServerState(options, loaded)
    config = uvicorn.Config(
        create_app(state),
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        access_log=options.log_level == "debug",
        timeout_graceful_shutdown=int(options.shutdown_timeout + 0.999),
        lifespan="on",
    )
    sock = config.bind_socket()
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and ready is not None:
                ready(url)

    # uvicorn re-raises the signal it shut down on; after a graceful SIGTERM shutdown that is no failure.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        _Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()


def default_api_key(given: str | None) -> str | None:
    """--api-key, else $SOFTTOOL_API_KEY (a key on the command line shows in `ps`)."""
    return given if given is not None else (os.environ.get(API_KEY_ENV) or None)


def print_ready(url: str, names: list[str]) -> None:
    print(f"softtool serve: {len(names)} task(s) at {url}/v1 ({', '.join(names)})", flush=True)
    sys.stdout.flush()
