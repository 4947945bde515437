"""`softtool serve --engine vllm` in front of a real vLLM (`make test-vllm`; skipped without one): on the default
model (SmolLM2-135M-Instruct, the folder softtool converts, float32) and a translation adapter with 3-gram blocking,
greedy token ids through the front equal `softtool generate`'s on 32 sentences; streaming adds up to the whole
answer; a stop string cuts the text; log-probs are the model's own; prefix mode reads the same ids.

Token ids are compared, not text: softtool and vLLM's venv run different transformers versions, which detokenize
differently. The vLLM server comes from $SOFTTOOL_VLLM_URL when set (one already running, started as
scripts/vllm_server.sh starts it), else it is started from the venv $SOFTTOOL_VLLM_VENV (scripts/vllm_env.sh) on
its cores $SOFTTOOL_VLLM_CORES (default: vLLM's choice) and stopped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from helpers import Server, load_benchmark, reference_logprobs, save_tiny_adapter

REPO = Path(__file__).resolve().parents[1]
VENV = os.environ.get("SOFTTOOL_VLLM_VENV")
URL = os.environ.get("SOFTTOOL_VLLM_URL")
pytestmark = [
    pytest.mark.skipif(
        not (VENV or URL), reason="needs vLLM: make test-vllm (or SOFTTOOL_VLLM_VENV / SOFTTOOL_VLLM_URL)"
    ),
    pytest.mark.slow,  # the real model, a vLLM server and softtool servers in processes of their own
]

BUDGET = 48  # max_tokens of every comparison
STARTUP = 1200  # seconds vLLM may take to load and compile on a busy 2-core machine
SENTENCES = [
    "A dog runs on the beach.",
    "Two young girls are playing in the sand.",
    "A man in a blue shirt is standing on a ladder.",
    "A woman is cutting vegetables in a kitchen.",
    "Three people are sitting on a bench in the park.",
    "A boy jumps into a swimming pool.",
    "An old man is reading a newspaper.",
    "A group of friends eat dinner together.",
    "The cat sleeps on the windowsill.",
    "A child rides a red bicycle down the street.",
    "Two men are playing chess outside.",
    "A woman in a hat sells flowers at a market.",
    "A brown horse runs across a field.",
    "People are walking in the rain with umbrellas.",
    "A musician plays the guitar on a stage.",
    "A little girl smiles at the camera.",
    "Workers are building a new house.",
    "A man climbs a steep rock wall.",
    "The children are singing in a choir.",
    "A dog catches a frisbee in the air.",
    "A woman drinks coffee at a small table.",
    "Two boys are fishing from a wooden dock.",
    "A crowd watches a football game.",
    "A chef prepares food in a restaurant.",
    "A man sleeps on a train.",
    "The sun sets behind the mountains.",
    "A girl in a yellow dress dances.",
    "Snow covers the trees in the forest.",
    "A police officer directs traffic.",
    "Two women are talking on the sidewalk.",
    "A baby laughs in her mother's arms.",
    "A skier goes down a snowy hill.",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(smollm2) -> Path:
    """The default model as softtool converts it (the `smollm2` fixture loads it, which converts it once)."""
    from softtool.models import DEFAULT_MODEL, embedded_model_dir

    folder = embedded_model_dir(DEFAULT_MODEL)
    assert (folder / "config.json").is_file(), f"{folder} holds no converted model"
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, smollm2) -> Path:
    """A translation prompt with the task's 3-gram blocking: its table is the embedding of an instruction (what
    training starts from with text initialisation), so the model answers in sentences, repetitions included."""
    from softtool.models import DEFAULT_MODEL, load_tokenizer

    ids = load_tokenizer(DEFAULT_MODEL)("Translate this English sentence into German.", add_special_tokens=False)
    table = smollm2.get_input_embeddings().weight[ids["input_ids"]].detach().clone()
    folder = tmp_path_factory.mktemp("vllm-live") / "de"
    return save_tiny_adapter(folder, DEFAULT_MODEL, table, decoding={"no_repeat_ngram_size": 3})


@pytest.fixture(scope="module")
def vllm_url(model_dir, tmp_path_factory):
    if URL:
        yield URL.rstrip("/")
        return
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
    env = {**os.environ, "VLLM_VENV": VENV, "OMP_NUM_THREADS": "1"}
    if os.environ.get("SOFTTOOL_VLLM_CORES"):
        env["VLLM_CPU_CORES"] = os.environ["SOFTTOOL_VLLM_CORES"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(REPO / "scripts" / "vllm_server.sh"), str(model_dir), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its engine and worker processes stop with it (killpg)
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            with_health = False
            with contextlib.suppress(httpx.HTTPError):
                with_health = httpx.get(f"{url}/health", timeout=5).status_code == 200
            if with_health:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM did not start in {STARTUP} s:\n{log.read_text()[-4000:]}")
            time.sleep(5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def front(adapter, vllm_url, tmp_path_factory):
    server = Server([adapter, "--engine", "vllm", "--vllm-url", vllm_url], tmp_path_factory.mktemp("front") / "log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(adapter, tmp_path_factory) -> list[list[int]]:
    """`softtool generate`'s greedy token ids (the task's 3-gram blocking applies) for each sentence."""
    folder = tmp_path_factory.mktemp("generate")
    (folder / "in.txt").write_text("\n".join(SENTENCES) + "\n")
    out = folder / "out.jsonl"
    args = ["generate", adapter, "-i", folder / "in.txt", "-o", out, "--max-new-tokens", BUDGET, "--raw", "-q"]
    subprocess.run([sys.executable, "-m", "softtool", *map(str, args), "--threads", "1"], check=True)
    return [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]


def _complete(front, **body) -> dict:
    request = {"model": "de", "max_tokens": BUDGET, "return_token_ids": True, **body}
    response = httpx.post(f"{front.url}/v1/completions", json=request, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def _without_eos(ids: list[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] == 2 else ids  # SmolLM2's EOS, <|im_end|>: generate leaves it out


def test_greedy_token_ids_through_vllm_equal_softtool_generate_on_32_sentences(front, reference):
    async def all_at_once():
        async with httpx.AsyncClient(timeout=1200) as client:
            requests = [
                client.post(
                    f"{front.url}/v1/completions",
                    json={"model": "de", "prompt": s, "max_tokens": BUDGET, "return_token_ids": True},
                )
                for s in SENTENCES
            ]
            return [r.json() for r in await asyncio.gather(*requests)]

    answers = asyncio.run(all_at_once())  # 32 rows in flight: vLLM batches them
    served = [_without_eos(a["choices"][0]["token_ids"]) for a in answers]
    differing = [i for i, (a, b) in enumerate(zip(served, reference, strict=True)) if a != b]
    assert not differing, f"sentences {differing} differ, first: {served[differing[0]]} vs {reference[differing[0]]}"


def test_served_outputs_never_repeat_a_3gram_of_their_row(front):
    """The 3-gram blocking ran inside vLLM: no generated token completes a 3-gram already in its row."""
    from softtool.models import DEFAULT_MODEL, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    for sentence in SENTENCES[:4]:
        ids = _complete(front, prompt=sentence)["choices"][0]["token_ids"]
        prompt = tokenizer(f"English: {sentence}\nGerman:", add_special_tokens=False)["input_ids"]
        row = [49152 + j for j in range(8)] + prompt + ids  # the virtual tokens, as the processor sees them
        grams = [tuple(row[i : i + 3]) for i in range(len(row) - 2)]
        assert len(grams) == len(set(grams)), sentence


def test_streamed_chunks_add_up_to_the_whole_answer(front):
    for sentence in SENTENCES[:3]:
        whole = _complete(front, prompt=sentence)["choices"][0]
        request = {"model": "de", "prompt": sentence, "max_tokens": BUDGET, "return_token_ids": True, "stream": True}
        text, ids, finish = "", [], None
        with httpx.stream("POST", f"{front.url}/v1/completions", json=request, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    ids += choice["token_ids"] or []
                    finish = choice["finish_reason"] or finish
        assert (text, ids, finish) == (whole["text"], whole["token_ids"], whole["finish_reason"])


def test_stop_string_cuts_the_vllm_answer(front):
    whole = _complete(front, prompt=SENTENCES[0])["choices"][0]["text"]
    words = whole.split()
    stop = words[len(words) // 2]
    cut = _complete(front, prompt=SENTENCES[0], stop=stop)["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == whole[: whole.index(stop)]


def test_logprobs_through_vllm_are_the_models_own(front, adapter, smollm2):
    from softtool.adapter import load_adapter
    from softtool.models import DEFAULT_MODEL, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    table = load_adapter(adapter).prompt_table
    vocab = smollm2.get_input_embeddings().weight.shape[0]
    for sentence in SENTENCES[:2]:
        choice = _complete(front, prompt=sentence, logprobs=3, max_tokens=16)["choices"][0]
        entries = choice["logprobs"]
        ids = choice["token_ids"]
        assert len(entries["token_logprobs"]) == len(ids) and all(len(t) <= 3 for t in entries["top_logprobs"])
        prompt = tokenizer(f"English: {sentence}\nGerman:", add_special_tokens=False)["input_ids"]
        row = [vocab + j for j in range(table.shape[0])] + prompt + ids
        expected = reference_logprobs(smollm2, table, vocab, row)
        start = table.shape[0] + len(prompt) - 1  # the position that predicts the first generated token
        want = torch.tensor([expected[start + i, t].item() for i, t in enumerate(ids)])
        got = torch.tensor(entries["token_logprobs"])
        assert torch.allclose(got, want, atol=2e-3), (got, want)


def test_prefix_mode_through_vllm_reads_the_same_ids_as_the_template(front):
    sentence = SENTENCES[5]
    template = _complete(front, prompt=sentence)["choices"][0]["token_ids"]
    prefix = _complete(front, model="de:prefix", prompt=f"English: {sentence}\nGerman:")["choices"][0]["token_ids"]
    assert prefix == template


def test_health_lists_the_vllm_backend(front, vllm_url):
    body = httpx.get(f"{front.url}/health").json()
    assert body["status"] == "ok"
    assert body["backends"] == [{"url": vllm_url, "healthy": True, "outstanding": 0, "error": None}]


def test_serve_load_engine_rows_run_every_engine_on_the_same_requests(vllm_url, tmp_path):
    """`serve_load.py --engines` at a smoke budget: each engine's row, every request exactly --max-tokens long."""
    data = tmp_path / "m30k"
    data.mkdir()
    with gzip.open(data / "val.en.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(SENTENCES[:4]) + "\n")
    out = tmp_path / "engines.json"
    args = ["--engines", "--vllm-url", vllm_url, "--data", str(data), "--requests", "4", "--max-tokens", "4",
            "--engine-clients", "2", "--repeats", "1", "--threads", "1", "--output", str(out)]  # fmt: skip
    assert load_benchmark("serve_load").main(args) == 0
    rows = json.loads(out.read_text())["engines"]["rows"]
    names = ["softtool-torch@2", "softtool-onnx@2", "softtool-vllm@2", "vllm-direct@2"]
    assert [r["name"] for r in rows] == names
    assert all(r["errors"] == 0 and r["exact_tokens"] for r in rows)
