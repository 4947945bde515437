"""`softtool serve` over HTTP, driven by the official `openai` client: tasks listed, greedy completions equal to
`softtool generate --raw` for every task whatever else shares the batch, streaming equal to non-streaming,
each bad request answered with its status while the server stays up, the API key, disconnects freeing their
slots, adapters added to --adapters-dir served without a restart, metrics, and a graceful SIGTERM.

Two servers run as child processes on free localhost ports over the tiny 'lively' model (its greedy outputs
differ from input to input): `server` with three adapter folders, and `keyed` with --api-key, an adapters
folder and a large token budget (long generations to disconnect from and to shut down under).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import shutil
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from helpers import Server, run_cli
from softtool.adapter import Adapter, AdapterMeta, save_adapter

TEMPLATES = {
    "de": "[P:4]English: {source}\nGerman:",
    "fr": "[P:4]Say it in French: {text}\n",
    "qa": "[P:4]Context: {context}\nQuestion: {question}\nAnswer:",
    "w1": "[P:4]Summary of {text}:",
    "w2": "[P:4]{text} means",
}
TEXTS = [
    "A dog runs on the beach.",
    "Two children are playing football in a park near the river.",
    "Hello.",
    "A man in a red jacket rides a bicycle down a busy street.",
    "Five people.",
    "The sun sets over the old town.",
    "A woman reads a book on a bench.",
    "Rain.",
]
BUDGET = 24  # max_tokens of the comparisons
KEY = "test-key-123"


def _make_adapter(folder: Path, model_dir: Path, embed: torch.Tensor, name: str, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    table = embed[torch.randint(0, 5000, (4,), generator=generator)] * 3
    meta = AdapterMeta(
        base_model=str(model_dir),
        num_virtual_tokens=4,
        token_dim=table.shape[1],
        vocab_size=embed.shape[0],
        template=TEMPLATES[name],
    )
    return save_adapter(folder / name, Adapter(table.clone(), meta))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, lively_model_dir) -> dict[str, Path]:
    from softtool.models import load_model

    root = tmp_path_factory.mktemp("serve-adapters")
    embed = load_model(str(lively_model_dir)).get_input_embeddings().weight.detach()
    return {name: _make_adapter(root, lively_model_dir, embed, name, seed) for seed, name in enumerate(TEMPLATES)}


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    paths = [adapters["de"], adapters["fr"], adapters["qa"]]
    s = Server([*paths, "--slots", "4", "--max-length", "160", "--max-tokens", "64", "--max-queue", "40"], log)
    yield s
    assert s.stop() == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def keyed(adapters, tmp_path_factory):
    """--api-key, --adapters-dir holding w1 (w2 is copied in by a test), a large budget for long rows."""
    root = tmp_path_factory.mktemp("serve-keyed")
    watched = root / "adapters"
    watched.mkdir()
    shutil.copytree(adapters["w1"], watched / "w1")
    args = ["--adapters-dir", watched, "--api-key", KEY, "--watch-interval", "0.2", "--slots", "2"]
    args += ["--max-length", "20100", "--max-tokens", "20000", "--shutdown-timeout", "30"]
    s = Server(args, root / "server.log")
    s.watched = watched
    yield s
    s.stop()


def _generate(adapter: Path, texts: list[str], *extra: str) -> list[str]:
    """`softtool generate ADAPTER TEXT... --raw` with the comparisons' budget, one output per text."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code, _, _ = run_cli(["generate", adapter, *texts, "--raw", "-o", "-", "--max-new-tokens", BUDGET, *extra])
    assert code == 0
    return [json.loads(line)["output"] for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def expected(adapters) -> dict[str, list[str]]:
    return {name: _generate(adapters[name], TEXTS) for name in ("de", "fr")}


# -- the API ---------------------------------------------------------------------------------------------
def test_models_lists_every_task_by_its_folder_name(server):
    models = server.client().models.list()
    assert sorted(m.id for m in models.data) == ["de", "fr", "qa"]
    assert server.client().models.retrieve("fr").id == "fr"


@pytest.mark.parametrize("task", ["de", "fr"])
def test_greedy_completions_equal_softtool_generate_raw(server, expected, task):
    client = server.client()
    for text, want in zip(TEXTS, expected[task], strict=True):
        out = client.completions.create(model=task, prompt=text, max_tokens=BUDGET, temperature=0)
        choice = out.choices[0]
        assert choice.text.strip() == want, text
        assert choice.finish_reason in ("stop", "length")
        assert out.model == task and out.object == "text_completion"
        assert out.usage.completion_tokens <= BUDGET
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        if choice.finish_reason == "length":
            assert out.usage.completion_tokens == BUDGET


def test_a_list_of_prompts_and_n_give_prompt_major_choices(server, expected):
    out = server.client().completions.create(model="de", prompt=TEXTS[:3], n=2, max_tokens=BUDGET)
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.text.strip() for c in out.choices] == [t for t in expected["de"][:3] for _ in range(2)]


def test_streaming_equals_non_streaming(server):
    client = server.client()
    for text in TEXTS[:4]:
        whole = client.completions.create(model="fr", prompt=text, max_tokens=BUDGET)
        chunks = list(
            client.completions.create(
                model="fr", prompt=text, max_tokens=BUDGET, stream=True, stream_options={"include_usage": True}
            )
        )
        pieces = [c for c in chunks if c.choices]
        assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
        assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in pieces[:-1])
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert len({c.id for c in chunks}) == 1


def test_the_stream_is_server_sent_events_ending_with_done(server):
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={"model": "de", "prompt": "Hi.", "max_tokens": 4, "stream": True}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_32_concurrent_requests_for_mixed_tasks_are_all_correct(server, expected):
    jobs = [(("de", "fr")[i % 2], i % len(TEXTS), i % 3 == 0) for i in range(32)]

    async def one(client, task, index, stream):
        if not stream:
            out = await client.completions.create(model=task, prompt=TEXTS[index], max_tokens=BUDGET)
            return out.choices[0].text
        chunks = await client.completions.create(model=task, prompt=TEXTS[index], max_tokens=BUDGET, stream=True)
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        async with client:
            return await asyncio.gather(*(one(client, *job) for job in jobs))

    texts = asyncio.run(run())
    wrong = [(job, text) for job, text in zip(jobs, texts, strict=True) if text.strip() != expected[job[0]][job[1]]]
    assert not wrong
    assert "softtool_slots_busy 0.0" in server.metrics()


def test_a_template_with_several_fields_takes_the_others_from_fields(server, adapters):
    context = "The Rhine flows through Basel and Cologne."
    want = _generate(adapters["qa"], ["Where does it flow?"], "--field", f"context={context}")
    out = server.client().completions.create(
        model="qa", prompt="Where does it flow?", max_tokens=BUDGET, extra_body={"fields": {"context": context}}
    )
    assert out.choices[0].text.strip() == want[0]
    with pytest.raises(openai.BadRequestError, match="fields"):
        server.client().completions.create(model="qa", prompt="Where?", max_tokens=4)


def test_stop_strings_end_the_text_before_them(server):
    client = server.client()
    full = client.completions.create(model="de", prompt=TEXTS[1], max_tokens=BUDGET).choices[0].text
    stop = full.strip()[3:6]
    assert stop, full
    cut = client.completions.create(model="de", prompt=TEXTS[1], max_tokens=BUDGET, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="de", prompt=TEXTS[1], max_tokens=BUDGET, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_sampling_with_a_seed_gives_text(server):
    out = server.client().completions.create(
        model="fr", prompt=TEXTS[0], max_tokens=8, temperature=0.8, top_p=0.9, seed=3, n=3
    )
    assert len(out.choices) == 3 and all(c.finish_reason in ("stop", "length") for c in out.choices)


# -- bad requests ----------------------------------------------------------------------------------------
def _post(server, body, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", **({"json": body} if body is not None else {}), **kw)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": "xx", "prompt": "Hi."}, 404, "does not exist"),
        ({"model": "de"}, 400, "prompt"),
        ({"model": "de", "prompt": "Hi.", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "de", "prompt": "Hi.", "max_tokens": 65}, 400, "at most 64"),
        ({"model": "de", "prompt": "word " * 400, "max_tokens": 8}, 400, "maximum context length"),
        ({"model": "de", "prompt": "Hi.", "temperature": "hot"}, 400, "temperature"),
        ({"model": "de", "prompt": 7}, 400, "prompt"),
        ({"model": "de", "prompt": "Hi.", "max_token": 5}, 400, "max_token"),
        ({"model": "de", "prompt": "Hi.", "logprobs": 6}, 400, "logprobs"),
        ({"model": "de", "prompt": "Hi.", "suffix": "!"}, 400, "suffix"),
        ({"model": "de", "prompt": "Hi.", "n": 9}, 400, "n is 9"),
        ({"model": "fr", "prompt": "", "fields": {"nope": "x"}}, 400, "fields"),
        ({"model": "de", "prompt": ["Hi."] * 45}, 429, "busy"),
    ],
)
def test_a_bad_request_gets_its_status_and_an_openai_error_body(server, body, status, says):
    response = _post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["type"]
    if status == 429:
        assert response.headers["retry-after"] == "1"


def test_malformed_json_and_a_non_object_body_are_400(server):
    for content in (b"{not json", b"[1, 2]", b""):
        response = httpx.post(
            f"{server.url}/v1/completions", content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_openai_client_raises_its_own_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hi.")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="de", prompt="Hi.", max_tokens=0)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="de", prompt=["Hi."] * 45)


def test_the_server_stays_up_and_counts_every_answer(server, expected):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    out = server.client().completions.create(model="de", prompt=TEXTS[0], max_tokens=BUDGET)
    assert out.choices[0].text.strip() == expected["de"][0]
    metrics = server.metrics()
    for line in (
        'softtool_requests_total{status="200",task="de"}',
        'softtool_requests_total{status="404",task="_unknown"}',
        'softtool_requests_total{status="429",task="de"}',
        'softtool_generated_tokens_total{task="fr"}',
        "softtool_queue_depth",
        "softtool_slot_occupancy",
        'softtool_time_to_first_token_seconds_bucket{le="0.1",task="de"}',
        'softtool_request_latency_seconds_count{task="fr"}',
    ):
        assert line in metrics, line


def test_a_request_never_sees_another_requests_text(server, expected):
    """Rows of both tasks run together; each answer is its own prompt's, never a neighbour's."""

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        async with client:
            calls = [client.completions.create(model="de", prompt=t, max_tokens=BUDGET) for t in TEXTS]
            return await asyncio.gather(*calls)

    answers = [out.choices[0].text.strip() for out in asyncio.run(run())]
    assert answers == expected["de"]


# -- the key, disconnects, new adapters, shutdown ------------------------------------------------------------
@pytest.mark.slow
def test_the_api_key_is_required_on_v1_only(keyed):
    with pytest.raises(openai.AuthenticationError):
        keyed.client(api_key="wrong").models.list()
    assert httpx.get(f"{keyed.url}/v1/models").status_code == 401
    assert [m.id for m in keyed.client(api_key=KEY).models.list().data] == ["w1"]
    assert httpx.get(f"{keyed.url}/health").status_code == 200


def _wait_for(predicate, timeout=20.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _busy(server) -> float:
    return float(re.search(r"^softtool_slots_busy (\S+)$", server.metrics(), re.M).group(1))


LONG = {"model": "w1", "prompt": "A dog.", "max_tokens": 20000, "min_tokens": 20000}  # EOS blocked: 20000 steps


@pytest.mark.slow
def test_a_client_that_disconnects_frees_its_slot(keyed):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{keyed.url}/v1/completions", json={**LONG, "stream": True}, headers=headers) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped generator closes the response, a disconnect too early
        next(lines)
        assert _busy(keyed) == 1
    _wait_for(lambda: _busy(keyed) == 0, what="the streamed row to be cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{keyed.url}/v1/completions", json=LONG, headers=headers, timeout=1.0)
    _wait_for(lambda: _busy(keyed) == 0, what="the non-streamed row to be cancelled")
    assert 'softtool_requests_total{status="499",task="w1"} 2.0' in keyed.metrics()


@pytest.mark.slow
def test_an_adapter_added_to_the_folder_is_served_without_a_restart(keyed, adapters):
    client = keyed.client(api_key=KEY)
    shutil.copytree(adapters["w2"], keyed.watched / "w2")
    _wait_for(lambda: "w2" in {m.id for m in client.models.list().data}, what="w2 to be served")
    want = _generate(adapters["w2"], TEXTS[:2])
    for text, expect in zip(TEXTS[:2], want, strict=True):
        assert client.completions.create(model="w2", prompt=text, max_tokens=BUDGET).choices[0].text.strip() == expect


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish_then_exits(keyed):
    body = {"model": "w1", "prompt": "A dog.", "max_tokens": 400, "extra_body": {"min_tokens": 400}}
    client = keyed.client(api_key=KEY)

    async def run():
        async_client = openai.AsyncOpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0)
        async with async_client:
            call = asyncio.ensure_future(async_client.completions.create(**body))
            await asyncio.to_thread(_wait_for, lambda: _busy(keyed) == 1, 20.0, "the row to start")
            keyed.proc.send_signal(signal.SIGTERM)
            return await call

    client.models.list()
    out = asyncio.run(run())
    assert out.usage.completion_tokens == 400 and out.choices[0].finish_reason == "length"
    assert keyed.proc.wait(timeout=60) == 0
    assert "Shutting down" in keyed.log.read_text()


# -- what the command refuses before it binds -----------------------------------------------------------------
def _fake_export(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "softtool_export.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "nothing to serve"),
        (["{missing}"], "not found"),
        (["{de}", "--backend", "onnx"], "--backend onnx needs an export folder"),
        (["{x1}", "{x2}"], "one export folder at a time"),
        (["{x1}", "--backend", "torch"], "--backend onnx"),
        (["{de}", "--max-tokens", "600"], "below max_length"),
        (["{de}", "--port", "70000"], "70000"),
        (["{plain}"], "neither an adapter folder"),
    ],
)
def test_serve_refuses_what_cannot_work_in_one_line(adapters, tmp_path, capsys, args, says):
    from helpers import user_error

    paths = {"de": adapters["de"], "missing": tmp_path / "nope", "plain": tmp_path / "plain"}
    paths["plain"].mkdir()
    paths["x1"], paths["x2"] = _fake_export(tmp_path / "x1"), _fake_export(tmp_path / "x2")
    code, _, err = run_cli(["serve", *(a.format(**paths) for a in args)], capsys)
    assert says in user_error(code, err)


def test_two_tasks_of_one_name_and_another_base_model_are_refused(adapters, tmp_path, capsys):
    from helpers import error_line

    code, _, err = run_cli(["serve", f"de={adapters['de']}", f"de={adapters['fr']}"], capsys)
    assert "two tasks are named 'de'" in error_line(code, err)
    other = tmp_path / "other"
    shutil.copytree(adapters["fr"], other)
    meta = json.loads((other / "softtool.json").read_text())
    meta.update(base_model="some/other-model", base_model_id=None, base_model_path=None)
    (other / "softtool.json").write_text(json.dumps(meta))
    code, _, err = run_cli(["serve", adapters["de"], other], capsys)
    assert "every task shares one base model" in error_line(code, err)


@pytest.mark.slow
def test_an_export_serves_its_tasks_and_takes_adapters_with_prompt_table_input(adapters, tmp_path, capsys):
    """The ONNX backend: an export of de and fr (--prompt-table-input) plus the adapter w1 as a third task, all
    through the server's own engine thread and completion service (no HTTP); each task's greedy text equals
    `softtool generate --raw` on its own folder."""
    from softtool.serve.app import ServerState
    from softtool.serve.options import ServeOptions
    from softtool.serve.protocol import CompletionRequest
    from softtool.serve.registry import load

    export = tmp_path / "multi"
    code, _, err = run_cli(
        ["export", adapters["de"], adapters["fr"], "-o", export, "--prompt-table-input", "--verify-steps", "2"], capsys
    )
    assert code == 0, err
    baked = tmp_path / "baked"
    assert run_cli(["export", adapters["de"], "-o", baked, "--verify-steps", "2"], capsys).code == 0
    code, _, err = run_cli(["serve", baked, adapters["w1"]], capsys)
    assert "--prompt-table-input" in err

    loaded = load([str(export), str(adapters["w1"])], None, None, threads=1)
    assert loaded.backend == "onnx" and list(loaded.registry.tasks) == ["de", "fr", "w1"]
    state = ServerState(ServeOptions(slots=4, max_length=160, max_tokens=64), loaded)

    async def run():
        state.engine.start()
        try:
            calls = []
            for task in ("de", "fr", "w1"):
                request = CompletionRequest(model=task, prompt=TEXTS[:4], max_tokens=BUDGET)
                prepared = state.service.prepare(request, time.perf_counter())
                state.service.admit(prepared)
                calls.append(state.service.complete(prepared))
            return await asyncio.gather(*calls)
        finally:
            await state.engine.stop()

    outputs = asyncio.run(run())
    want = {
        "de": _generate(export, TEXTS[:4]),  # task 0 of the export
        "fr": _generate(adapters["fr"], TEXTS[:4]),
        "w1": _generate(adapters["w1"], TEXTS[:4]),
    }
    for task, out in zip(("de", "fr", "w1"), outputs, strict=True):
        assert [c.text.strip() for c in out.choices] == want[task], task


def test_a_request_decodes_with_its_tasks_recorded_defaults_unless_it_sets_them(tmp_path, tiny_model_dir):
    from helpers import save_tiny_adapter
    from softtool.serve.app import ServerState
    from softtool.serve.options import ServeOptions
    from softtool.serve.protocol import CompletionRequest
    from softtool.serve.registry import load

    decoding = {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2}
    save_tiny_adapter(tmp_path / "de", tiny_model_dir, torch.zeros(3, 32), decoding=decoding)
    save_tiny_adapter(tmp_path / "fr", tiny_model_dir, torch.zeros(3, 32))
    state = ServerState(
        ServeOptions(slots=2, max_length=64, max_tokens=8),
        load([str(tmp_path / "de"), str(tmp_path / "fr")], None, None, threads=1),
    )

    def options(**request):
        prepared = state.service.prepare(
            CompletionRequest(prompt="A dog.", max_tokens=4, **request), time.perf_counter()
        )
        return prepared.rows[0].options.no_repeat_ngram_size, prepared.rows[0].options.repetition_penalty

    assert options(model="de") == (3, 1.2)
    assert options(model="de", repetition_penalty=1.5) == (3, 1.5)
    assert options(model="fr") == (0, 1.0)
