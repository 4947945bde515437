"""`softtool serve --engine vllm` against fake vLLM servers (no vLLM needed): least-outstanding-requests balancing,
health that follows the backends, the request each row becomes (prompt_embeds, stop ids, the processor's
arguments), token ids and log-probs streamed back into softtool's own choices, and the refusals of what vLLM cannot
do with embeddings. tests/test_serve_vllm_live.py runs the same engine against a real vLLM (`make test-vllm`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
import torch

from helpers import save_tiny_adapter
from softtool.prompts.embedding import merge_embeddings
from softtool.search import SearchOptions
from softtool.serve.engine import Finished, Row
from softtool.serve.options import ServeOptions
from softtool.serve.vllm.backend import VllmEngine
from softtool.serve.vllm.balancer import Balancer, parse_urls

A, B = "http://vllm-a:8000", "http://vllm-b:8000"
EOS = 2
REPLY = [310, 1234, 77, EOS]  # what every fake answers: three tokens, then the EOS


class FakeVllm:
    """Fake vLLM servers behind one httpx transport: /health, /v1/models, and streamed completions that answer
    REPLY as token ids (one chunk per token). `hold` keeps completions open until `release`; `down` hosts answer
    503 to /health and refuse connections."""

    def __init__(self):
        self.bodies: list[tuple[str, dict]] = []  # (backend, request body) per completion
        self.down: set[str] = set()
        self.hold = False
        self._release = asyncio.Event()
        self.open = {A: 0, B: 0}  # completions in progress per backend

    def release(self) -> None:
        self._release.set()

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if base in self.down:
            if request.url.path == "/health":
                return httpx.Response(503)
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "/models/smol"}]})
        body = json.loads(request.content)
        self.bodies.append((base, body))
        return httpx.Response(200, content=self._chunks(base, body), headers={"content-type": "text/event-stream"})

    async def _chunks(self, base: str, body: dict):
        self.open[base] += 1
        try:
            if self.hold:
                await self._release.wait()
            for i, token in enumerate(REPLY[: body["max_tokens"]]):
                last = i == len(REPLY) - 1 or i + 1 == body["max_tokens"]
                choice = {"index": 0, "text": "", "token_ids": [token], "finish_reason": None}
                if last:
                    choice["finish_reason"] = "stop" if token == EOS else "length"
                if body.get("logprobs") is not None:
                    top = {f"token_id:{token}": -0.5, "token_id:9": -1.5, "token_id:8": -2.5}
                    choice["logprobs"] = {"tokens": [f"token_id:{token}"], "token_logprobs": [-0.5],
                                          "top_logprobs": [top], "text_offset": [0]}  # fmt: skip
                yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            self.open[base] -= 1


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    table = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("vllm-adapters") / "de"
    return save_tiny_adapter(folder, tiny_model_dir, table, decoding={"no_repeat_ngram_size": 3})


@pytest.fixture(scope="module")
def loaded(adapter):
    from softtool.serve.registry import load

    return load([str(adapter)], None, None)


def _client(loaded, fake: FakeVllm, **options):
    from fastapi.testclient import TestClient

    from softtool.serve.app import ServerState, create_app

    options = ServeOptions(engine="vllm", vllm_url=f"{A},{B}", slots=4, max_length=128, max_tokens=32, **options)
    state = ServerState(options, loaded)
    state.engine.transport = fake.transport()
    return TestClient(create_app(state)), state


def _row(ids, **kw) -> Row:
    options = SearchOptions(max_new_tokens=8, eos_token_ids=[EOS], no_repeat_ngram_size=kw.pop("ngram", 0))
    return Row(list(ids), 0, options, **kw)


# -- the balancer ------------------------------------------------------------------------------------------------
def test_vllm_urls_are_parsed_from_one_comma_separated_flag():
    assert parse_urls("http://a:1/v1, http://b:2/") == ["http://a:1", "http://b:2"]
    for bad in ("a:1", "http://a:1,http://a:1", " , "):
        with pytest.raises(ValueError):
            parse_urls(bad)


def test_balancer_picks_the_healthy_backend_with_fewest_outstanding_and_rotates_ties():
    balancer = Balancer(["http://a", "http://b", "http://c"])
    for backend in balancer.backends:
        backend.healthy = True
    a, b, c = balancer.backends
    a.outstanding, b.outstanding, c.outstanding = 2, 0, 1
    assert balancer.pick() is b
    b.outstanding = 5
    assert balancer.pick() is c
    a.outstanding = b.outstanding = c.outstanding = 0
    assert {balancer.pick().url for _ in range(3)} == {"http://a", "http://b", "http://c"}  # equals take turns
    b.healthy = c.healthy = False
    a.outstanding = 9
    assert balancer.pick() is a  # busy but the only healthy one
    a.healthy = False
    assert balancer.pick() is None


def test_engine_spreads_concurrent_rows_by_least_outstanding_requests(loaded):
    fake = FakeVllm()
    fake.hold = True

    async def main():
        engine = VllmEngine(loaded.generator, Balancer([A, B]), transport=fake.transport())
        engine.start()
        queue: asyncio.Queue = asyncio.Queue()
        rows = [_row([5, 6, 7], events=queue, index=i) for i in range(6)]
        for row in rows[:4]:
            engine.submit(row)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if sum(fake.open.values()) == 4:
                break
        assert fake.open == {A: 2, B: 2}
        # B's requests end: the next two rows both go to B, which now has none outstanding
        a, b = engine.balancer.backends
        b.outstanding = 0
        a.outstanding = 2
        engine.submit(rows[4])
        await asyncio.sleep(0.05)
        engine.submit(rows[5])
        await asyncio.sleep(0.05)
        sent_to = [base for base, _ in fake.bodies]
        fake.release()
        ends = 0
        while ends < 6:
            _, event = await queue.get()
            ends += isinstance(event, Finished)
        await engine.stop()
        return sent_to

    sent_to = asyncio.run(main())
    assert sorted(sent_to[:4]) == [A, A, B, B]
    assert sent_to[4:] == [B, B]


def test_a_backend_that_refuses_connections_is_skipped_and_marked_down(loaded):
    fake = FakeVllm()

    async def main():
        engine = VllmEngine(loaded.generator, Balancer([A, B]), transport=fake.transport())
        engine.start()
        await asyncio.sleep(0.05)  # the first look: both healthy
        fake.down.add(A)
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(2):
            engine.submit(_row([5, 6], events=queue, index=i))
        events = []
        while sum(isinstance(e, Finished) for _, e in events) < 2:
            events.append(await queue.get())
        health = engine.health()
        await engine.stop()
        return events, health

    events, (ok, details) = asyncio.run(main())
    finished = [e for _, e in events if isinstance(e, Finished)]
    assert all(e.error is None and list(e.hypothesis.tokens) == REPLY[:-1] for e in finished)
    assert ok and [b["healthy"] for b in details["backends"]] == [False, True]


# -- the request a row becomes -----------------------------------------------------------------------------------
def test_row_becomes_prompt_embeds_of_the_merged_table_with_softtool_stop_ids_and_ngram_args(loaded):
    engine = VllmEngine(loaded.generator, Balancer([A]))
    generator = loaded.generator
    ids = [generator.vocab_size + j for j in range(4)] + [100, 200, 300]
    body = engine.request_body(_row(ids, ngram=3, logprobs=2))
    sent = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
    expected = merge_embeddings(generator.model, torch.tensor([ids]), generator.table, generator.vocab_size)[0]
    assert sent.shape == expected.shape and sent.dtype == torch.float32
    assert torch.equal(sent, expected)
    assert body["ignore_eos"] is True and body["stop_token_ids"] == [EOS]
    assert body["temperature"] == 0.0 and body["max_tokens"] == 8 and body["stream"] is True
    assert body["return_token_ids"] is True and body["logprobs"] == 2 and body["return_tokens_as_token_ids"] is True
    assert body["vllm_xargs"] == {"softtool_ngram": 3, "softtool_penalty": 1.0, "softtool_history": ids}
    assert "vllm_xargs" not in engine.request_body(_row(ids))  # nothing for the processor to do


# -- through the HTTP API ----------------------------------------------------------------------------------------
def test_completion_through_vllm_engine_is_softtool_detokenized_with_task_defaults_sent(loaded):
    fake = FakeVllm()
    client, state = _client(loaded, fake)
    tokenizer = loaded.generator.tokenizer
    with client:
        response = client.post("/v1/completions", json={"model": "de", "prompt": "A dog runs.", "max_tokens": 8})
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["text"] == tokenizer.decode(REPLY[:-1], skip_special_tokens=True)
        assert choice["finish_reason"] == "stop"
        assert response.json()["usage"]["completion_tokens"] == len(REPLY)
        (_, body), = fake.bodies  # fmt: skip
        assert body["model"] == "/models/smol"
        assert body["vllm_xargs"]["softtool_ngram"] == 3  # the adapter's decoding default
        assert "x-softtool-not-applied" not in response.headers


def test_streaming_logprobs_and_n_through_vllm_engine(loaded):
    fake = FakeVllm()
    client, _ = _client(loaded, fake)
    with client:
        request = {"model": "de", "prompt": "Two dogs.", "max_tokens": 3, "n": 2, "logprobs": 2, "stream": True}
        with client.stream("POST", "/v1/completions", json=request) as response:
            lines = [json.loads(x[6:]) for x in response.iter_lines() if x.startswith("data: {")]
        assert len(fake.bodies) == 2  # n rows, n vLLM requests
        for index in (0, 1):
            pieces = [c for line in lines for c in line["choices"] if c["index"] == index]
            tokens = [t for c in pieces if c["logprobs"] for t in c["logprobs"]["tokens"]]
            values = [v for c in pieces if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
            assert len(tokens) == 3 and values == [-0.5, -0.5, -0.5]
            assert pieces[-1]["finish_reason"] == "length"


def test_stop_string_cancels_the_vllm_row_and_cuts_the_text(loaded):
    fake = FakeVllm()
    client, _ = _client(loaded, fake)
    tokenizer = loaded.generator.tokenizer
    first = tokenizer.decode(REPLY[:1], skip_special_tokens=True)
    stop = tokenizer.decode(REPLY[1:2], skip_special_tokens=True).strip()
    with client:
        response = client.post(
            "/v1/completions", json={"model": "de", "prompt": "Rain.", "max_tokens": 8, "stop": stop}
        )
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and stop not in choice["text"]
        assert choice["text"].strip() == first.strip()


def test_health_follows_the_vllm_backends(loaded):
    fake = FakeVllm()
    fake.down.add(A)
    client, state = _client(loaded, fake)
    with client:
        body = client.get("/health").json()
        assert body["status"] == "ok" and body["engine"] == "vllm"
        assert {b["url"]: b["healthy"] for b in body["backends"]} == {A: False, B: True}
        fake.down.add(B)
        asyncio.run(state.engine.balancer.check(httpx.AsyncClient(transport=fake.transport())))
        response = client.get("/health")
        assert response.status_code == 503 and response.json()["status"] == "unavailable"
        refused = client.post("/v1/completions", json={"model": "de", "prompt": "Rain."})
        assert refused.status_code == 503 and "no vLLM backend is healthy" in refused.json()["error"]["message"]


def test_vllm_engine_refuses_echo_with_logprobs_and_says_when_defaults_are_not_applied(loaded):
    fake = FakeVllm()
    client, _ = _client(loaded, fake, vllm_processor=False)
    with client:
        refused = client.post("/v1/completions", json={"model": "de", "prompt": "Hi.", "echo": True, "logprobs": 1})
        assert refused.status_code == 400 and "echo with logprobs" in refused.json()["error"]["message"]
        response = client.post("/v1/completions", json={"model": "de", "prompt": "Hi.", "echo": True})
        assert response.status_code == 200
        assert response.headers["x-softtool-not-applied"] == "no_repeat_ngram_size=3"
        assert "vllm_xargs" not in fake.bodies[-1][1]


def test_vllm_engine_refuses_classify_tasks(tmp_path, tiny_model_dir):
    from softtool.adapter import Adapter, AdapterMeta, save_adapter
    from softtool.serve.registry import load

    meta = AdapterMeta(
        base_model=str(tiny_model_dir),
        num_virtual_tokens=4,
        token_dim=32,
        vocab_size=49152,
        template="[P:4]Review: {text}\nSentiment:",
        task="classify",
        task_options={"labels": ["positive", "negative"]},
    )
    folder = save_adapter(tmp_path / "sentiment", Adapter(torch.randn(4, 32), meta))
    client, _ = _client(load([str(folder)], None, None), FakeVllm())
    with client:
        response = client.post("/v1/completions", json={"model": "sentiment", "prompt": "Great film."})
        assert response.status_code == 400
        assert "classify task" in response.json()["error"]["message"]


def test_serve_options_tie_vllm_url_to_the_vllm_engine():
    with pytest.raises(ValueError, match="needs --vllm-url"):
        ServeOptions(engine="vllm")
    with pytest.raises(ValueError, match="is for --engine vllm"):
        ServeOptions(vllm_url=A)
