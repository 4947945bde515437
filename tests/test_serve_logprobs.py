"""lm-evaluation-harness and the official `openai` client against `softtool serve`: log-probs, echo, token-id prompts
and prefix mode, on both backends (adapter folders through PyTorch, their export through ONNX Runtime).

Two servers run as child processes on free localhost ports over the tiny 'lively' model, each with the tasks `de`
(every virtual token in front) and `pt` (virtual tokens around the text). Every log-prob is held to plain
transformers' log-softmax over the same row (float32, CPU) within 1e-4, and the two backends to each other.

lm-eval runs as a user runs it: `lm_eval --model local-completions` against the server, offline
(HF_HUB_OFFLINE=1), with the model folder's own tokenizer, on two tasks written here from inline examples: a
translation task the harness scores (BLEU, chrF) and a multiple-choice task (log-likelihoods). The generation
scores must equal `softtool eval`'s on the same examples and prompt (prefix mode with the template's text is the
template's row), and every log-likelihood a direct computation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch

from helpers import Server, format_2_copy, reference_logprobs, run_cli, save_tiny_adapter, write_translation_data

# Servers over two backends and lm-eval through one (90 s on one core): make test, not make test-fast.
pytestmark = pytest.mark.slow

BACKENDS = ("torch", "onnx")
TEMPLATES = {"de": "[P:4]English: {source}\nGerman:", "pt": "[P:2]English: {source}[P:2]\nGerman:"}
TEXTS = ["A dog runs on the beach.", "Two children are playing football in a park.", "Rain."]
N = 4  # virtual tokens of every task


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, lively_model_dir) -> dict[str, Path]:
    from softtool.models import load_model

    root = tmp_path_factory.mktemp("logprob-serve")
    embed = load_model(str(lively_model_dir)).get_input_embeddings().weight.detach()
    out = {}
    for seed, (name, template) in enumerate(TEMPLATES.items()):
        rows = torch.randint(0, 5000, (N,), generator=torch.Generator().manual_seed(seed))
        out[name] = save_tiny_adapter(root / name, lively_model_dir, embed[rows] * 3, template=template)
    return out


@pytest.fixture(scope="module")
def export(adapters, tmp_path_factory) -> Path:
    from softtool.export.onnx import ExportOptions, export_adapters

    folder = tmp_path_factory.mktemp("logprob-export") / "onnx"
    export_adapters([adapters["de"], adapters["pt"]], folder, ExportOptions(verify_steps=2))
    return folder


@pytest.fixture(scope="module")
def servers(adapters, export, tmp_path_factory):
    root = tmp_path_factory.mktemp("logprob-logs")
    limits = ["--slots", "4", "--max-length", "256", "--max-tokens", "32"]
    running = {
        "torch": Server([adapters["de"], adapters["pt"], *limits], root / "torch.log"),
        "onnx": Server([export, *limits], root / "onnx.log"),
    }
    yield running
    for name, server in running.items():
        assert server.stop() == 0, (name, server.log.read_text()[-3000:])


@pytest.fixture(scope="module")
def reference(adapters, lively_model_dir):
    """Plain transformers over a row of the `de` task: log-probs [len(row), V] (row p scores the token after p)."""
    from softtool.adapter import load_adapter
    from softtool.models import load_model

    model = load_model(str(lively_model_dir))
    table = load_adapter(adapters["de"]).prompt_table
    return lambda row: reference_logprobs(model, table, model.config.vocab_size, row)


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


def _virtual() -> list[int]:
    return [49152 + j for j in range(N)]  # task 0 (`de`) of the tiny model's 49,152-token vocabulary


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _greedy(reference, row: list[int], budget: int, eos: int) -> list[int]:
    tokens: list[int] = []
    while len(tokens) < budget:
        tokens.append(int(reference(row + tokens)[-1].argmax()))
        if tokens[-1] == eos:
            break
    return tokens


# -- log-probs and echo through the openai client ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_completion_token_has_the_model_s_log_prob_and_its_top_candidates(servers, reference, tok, backend):
    client = servers[backend].client()
    for text in TEXTS:
        out = client.completions.create(model="de", prompt=text, max_tokens=8, logprobs=3)
        choice, logprobs = out.choices[0], out.choices[0].logprobs
        row = _virtual() + _encode(tok, f"English: {text}\nGerman:")
        tokens = _greedy(reference, row, 8, tok.eos_token_id)
        assert logprobs.tokens == [tok.decode([t]) for t in tokens]
        assert len(tokens) == out.usage.completion_tokens
        want = reference(row + tokens)
        for j, token in enumerate(tokens):
            dist = want[len(row) - 1 + j]
            assert abs(logprobs.token_logprobs[j] - dist[token].item()) < 1e-4
            top = logprobs.top_logprobs[j]
            assert list(top) == [tok.decode([i]) for i in torch.topk(dist, 3).indices.tolist()]
            assert max(top.values()) == logprobs.token_logprobs[j]  # greedy: exactly the best (lm-eval's is_greedy)
        text_tokens = [t for t in tokens if t != tok.eos_token_id]  # the EOS is listed but adds no text
        assert "".join(tok.decode([t]) for t in text_tokens) == choice.text
        assert logprobs.text_offset == [
            len(tok.decode(tokens[:j], skip_special_tokens=True)) for j in range(len(tokens))
        ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_echo_scores_a_token_id_prompt_in_prefix_mode_its_first_token_null(servers, reference, tok, backend):
    ids = _encode(tok, "English: A dog runs.\nGerman: Ein Hund läuft.")
    out = (
        servers[backend].client().completions.create(model="de:prefix", prompt=ids, max_tokens=1, logprobs=2, echo=True)
    )
    choice, logprobs = out.choices[0], out.choices[0].logprobs
    assert choice.text.startswith(tok.decode(ids)) and len(logprobs.tokens) == len(ids) + 1
    assert logprobs.tokens[: len(ids)] == [tok.decode([i]) for i in ids]
    assert logprobs.text_offset[: len(ids)] == [len(tok.decode(ids[:p])) for p in range(len(ids))]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    want = reference(_virtual() + ids)
    for p in range(1, len(ids)):
        assert abs(logprobs.token_logprobs[p] - want[N + p - 1, ids[p]].item()) < 1e-4
        assert list(logprobs.top_logprobs[p]) == [tok.decode([i]) for i in torch.topk(want[N + p - 1], 2).indices]
    assert out.usage.prompt_tokens == N + len(ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stream_carries_the_same_text_and_logprobs(servers, backend):
    client = servers[backend].client()
    for prompt in TEXTS[:2]:
        args = {"model": "de", "prompt": prompt, "max_tokens": 12, "logprobs": 2, "echo": True}
        whole = client.completions.create(**args).choices[0]
        chunks = [c.choices[0] for c in client.completions.create(**args, stream=True) if c.choices]
        assert "".join(c.text for c in chunks) == whole.text
        joined = {key: [] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        for chunk in chunks:
            for key, values in joined.items():
                values += getattr(chunk.logprobs, key)
        assert joined == whole.logprobs.model_dump()


def test_prefix_mode_with_the_template_s_text_gives_the_template_s_completion(servers):
    client = servers["torch"].client()
    for text in TEXTS:
        plain = client.completions.create(model="de", prompt=text, max_tokens=16)
        prefixed = client.completions.create(model="de:prefix", prompt=f"English: {text}\nGerman:", max_tokens=16)
        assert prefixed.choices[0].text == plain.choices[0].text and prefixed.model == "de:prefix"
        assert prefixed.usage.prompt_tokens == plain.usage.prompt_tokens


def test_both_backends_give_the_same_log_probs(servers, tok):
    ids = [_encode(tok, f"English: {t}\nGerman:") for t in TEXTS]
    got = {
        backend: servers[backend]
        .client()
        .completions.create(model="de:prefix", prompt=ids, max_tokens=6, logprobs=5, echo=True)
        for backend in BACKENDS
    }
    for a, b in zip(got["torch"].choices, got["onnx"].choices, strict=True):
        assert a.text == b.text and a.logprobs.tokens == b.logprobs.tokens
        for x, y in zip(a.logprobs.token_logprobs, b.logprobs.token_logprobs, strict=True):
            assert (x is None and y is None) or abs(x - y) < 1e-4
        for x, y in zip(a.logprobs.top_logprobs[1:], b.logprobs.top_logprobs[1:], strict=True):
            assert list(x) == list(y) and all(abs(x[k] - y[k]) < 1e-4 for k in x)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": "de", "prompt": "Hi.", "logprobs": 6}, 400, "logprobs"),
        ({"model": "pt:prefix", "prompt": "Hi."}, 400, "prefix mode needs all of them in front"),
        ({"model": "de:prefix", "prompt": [1, 49152]}, 400, "token id 49152 is outside the vocabulary [0, 49152)"),
        ({"model": "de:prefix", "prompt": [[5, 6], [-1]]}, 400, "prompt"),
        ({"model": "de", "prompt": [5, 6]}, 400, "only where it stands alone"),
        ({"model": "de:prefix", "prompt": "Hi.", "fields": {"source": "x"}}, 400, "takes no template fields"),
        ({"model": "xx:prefix", "prompt": "Hi."}, 404, "does not exist"),
    ],
)
def test_a_bad_logprobs_or_prompt_request_is_answered_with_its_status(servers, body, status, says):
    response = httpx.post(f"{servers['torch'].url}/v1/completions", json=body)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]


def test_an_export_made_before_format_3_answers_echo_with_400_saying_re_export(export, tmp_path):
    """Such an export still serves (log-probs of generated tokens need nothing new); echo needs a re-export."""
    from softtool.serve.app import ServerState
    from softtool.serve.completions import ApiError
    from softtool.serve.options import ServeOptions
    from softtool.serve.protocol import CompletionRequest
    from softtool.serve.registry import load

    old = format_2_copy(export, tmp_path / "old")
    state = ServerState(ServeOptions(slots=2, max_length=64, max_tokens=8), load([str(old)], None, None, threads=1))
    with pytest.raises(ApiError) as refused:
        state.service.prepare(CompletionRequest(model="de", prompt="A dog.", echo=True, logprobs=1), time.time())
    assert refused.value.status == 400 and "re-run softtool export" in refused.value.message
    prepared = state.service.prepare(CompletionRequest(model="de", prompt="A dog.", logprobs=1), time.time())
    assert prepared.rows[0].logprobs == 1


# -- lm-evaluation-harness -------------------------------------------------------------------------------------
SOURCES = ["A dog runs.", "Two cats sleep.", "A man reads a book.", "The sun sets.", "Children play outside.", "Rain."]
TARGETS = [
    "Ein Hund rennt.",
    "Zwei Katzen schlafen.",
    "Ein Mann liest ein Buch.",
    "Die Sonne geht unter.",
    "Kinder spielen draußen.",
    "Regen.",
]
CHOICES = [["Ein Hund rennt.", "Eine Katze.", "Regen."], ["Zwei Katzen schlafen.", "Ein Buch.", "Die Sonne."]]
BUDGET = 16


def _write_tasks(folder: Path) -> Path:
    """Two lm-eval tasks over inline examples, in prefix mode's text: `English: {source}\nGerman:`."""
    folder.mkdir()
    rows = [{"source": s, "target": t} for s, t in zip(SOURCES, TARGETS, strict=True)]
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mc = [{"source": SOURCES[i], "choices": CHOICES[i], "answer": 0} for i in range(len(CHOICES))]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    # The harness's generations get softtool eval's own post-processing (first line, stripped).
    (folder / "utils.py").write_text(
        textwrap.dedent(
            """
            from softtool.data.tasks import get_task

            _TASK = get_task("translation", src="en", tgt="de")


            def first_line(resps, docs):  # one prediction per example, as lm-eval's take_first leaves it
                return [_TASK.postprocess(rs[0]) for rs in resps]
            """
        )
    )
    common = 'dataset_path: json\ntest_split: test\ndoc_to_text: "English: {{source}}\\nGerman:"\n'
    (folder / "gen.yaml").write_text(
        "task: softtool_gen\n"
        + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        + 'output_type: generate_until\ndoc_to_target: "{{target}}"\n'
        + f"generation_kwargs:\n  until: []\n  max_gen_toks: {BUDGET}\n  do_sample: false\n"
        + "filter_list:\n  - name: first_line\n    filter:\n      - function: custom\n"
        + "        filter_fn: !function utils.first_line\n"
        + "metric_list:\n  - metric: bleu\n  - metric: chrf\n"
    )
    (folder / "mc.yaml").write_text(
        "task: softtool_mc\n"
        + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        + "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        + "metric_list:\n  - metric: acc\n"
    )
    return folder


def _lm_eval(server: Server, tasks: Path, tokenizer: Path, output: Path) -> dict:
    """`lm_eval` against `server` (the `de` task in prefix mode); its results and logged samples by task."""
    model_args = (
        f"model=de:prefix,base_url={server.url}/v1/completions,tokenizer={tokenizer},"
        "tokenizer_backend=huggingface,tokenized_requests=True,max_length=256,max_retries=1"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(output / "hf")}
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args]
    command += ["--tasks", "softtool_gen", "softtool_mc", "--include_path", str(tasks), "--batch_size", "4"]
    command += ["--output_path", str(output), "--log_samples"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    results = json.loads(next(output.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for task in ("softtool_gen", "softtool_mc"):
        path = next(output.rglob(f"samples_{task}_*.jsonl"))
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return {"results": results, "samples": samples}


def _direct_loglikelihood(reference, tok, context: str, continuation: str) -> tuple[float, bool]:
    """The log-likelihood of `continuation` after the prompt and `context`, split as lm-eval splits a pair (the
    context's trailing spaces move to the continuation; the whole text is tokenized once), and whether it is the
    greedy continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = _encode(tok, context + continuation), _encode(tok, context)
    row = _virtual() + whole
    logprobs = reference(row)
    start = N + len(head)
    targets = row[start:]
    scores = logprobs[start - 1 : len(row) - 1]
    total = sum(scores[j, t].item() for j, t in enumerate(targets))
    return total, all(int(scores[j].argmax()) == t for j, t in enumerate(targets))


def test_lm_eval_scores_the_soft_prompt_through_the_server(
    servers, adapters, reference, tok, lively_model_dir, tmp_path
):
    tasks = _write_tasks(tmp_path / "tasks")
    data = write_translation_data(tmp_path / "data", SOURCES, TARGETS, splits=("test",))
    evaluated = tmp_path / "eval"
    code, _, _ = run_cli(
        ["eval", adapters["de"], "--data", data, "--split", "test", "--max-new-tokens", BUDGET, "--output", evaluated]
    )
    assert code == 0
    eval_metrics = json.loads((evaluated / "metrics.json").read_text())
    eval_predictions = [
        json.loads(line)["prediction"] for line in (evaluated / "predictions.jsonl").read_text().splitlines()
    ]

    runs = {backend: _lm_eval(servers[backend], tasks, lively_model_dir, tmp_path / backend) for backend in BACKENDS}
    for backend, run in runs.items():
        generated = [s["filtered_resps"][0] for s in run["samples"]["softtool_gen"]]
        assert generated == eval_predictions, backend
        scores = run["results"]["softtool_gen"]
        assert scores["bleu,first_line"] == pytest.approx(eval_metrics["metrics"]["bleu"], abs=1e-9), backend
        assert scores["chrf,first_line"] == pytest.approx(eval_metrics["metrics"]["chrf"], abs=1e-9), backend
        assert scores["chrf,first_line"] > 0  # random text still shares characters with the references

        for sample in run["samples"]["softtool_mc"]:
            # One request per choice: arguments {"gen_args_i": {"arg_0": context, "arg_1": continuation}} and
            # resps [[[log-likelihood, is_greedy]], ...], logged as strings.
            requests = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
            for (context, continuation), [[loglikelihood, greedy]] in zip(requests, sample["resps"], strict=True):
                want, want_greedy = _direct_loglikelihood(reference, tok, context, continuation)
                assert abs(float(loglikelihood) - want) < 1e-4, (backend, context, continuation)
                assert greedy == str(want_greedy)

    torch_mc, onnx_mc = (runs[b]["samples"]["softtool_mc"] for b in BACKENDS)
    compared = 0
    for a, b in zip(torch_mc, onnx_mc, strict=True):
        for x, y in zip(a["resps"], b["resps"], strict=True):
            assert abs(float(x[0][0]) - float(y[0][0])) < 1e-4
            compared += 1
    assert compared == sum(len(c) for c in CHOICES)
    assert runs["torch"]["results"]["softtool_mc"]["acc,none"] == runs["onnx"]["results"]["softtool_mc"]["acc,none"]
