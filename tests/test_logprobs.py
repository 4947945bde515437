"""Token log-probs from the decode loop: prompt tokens scored at prefill (echo) and generated tokens scored from the
engine's own rows (logprobs), equal to plain transformers' log-softmax, in PyTorch and in an export, and a
format-2 export (no target scoring) that still runs but refuses to score prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import format_2_copy, reference_logprobs, save_tiny_adapter
from softtool.runtime.decode import Engine
from softtool.runtime.logprobs import MAX_LOGPROBS
from softtool.search import SearchOptions

PREFIX = "[P:4]English: {source}\nGerman:"
SPLIT = "[P:2]English: {source}[P:2]\nGerman:"
TEXTS = ["A dog runs.", "Hi there, two cats sleep on a warm mat.", "Rain."]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, lively_model_dir):
    from softtool.models import load_model

    root = tmp_path_factory.mktemp("logprob-adapters")
    embed = load_model(str(lively_model_dir)).get_input_embeddings().weight.detach()
    table = embed[torch.randint(0, 5000, (4,), generator=torch.Generator().manual_seed(1))] * 3
    return {
        "prefix": save_tiny_adapter(root / "prefix", lively_model_dir, table.clone(), template=PREFIX),
        "split": save_tiny_adapter(root / "split", lively_model_dir, table.clone(), template=SPLIT),
    }


@pytest.fixture(scope="module")
def exports(adapters, tmp_path_factory):
    from softtool.export.onnx import ExportOptions, export_adapters

    root = tmp_path_factory.mktemp("logprob-exports")
    export_adapters([adapters["prefix"]], root / "full", ExportOptions(verify_steps=2))
    export_adapters([adapters["prefix"]], root / "top8", ExportOptions(verify_steps=2, top_k=8))
    return {"full": root / "full", "top8": root / "top8"}


def _torch(adapter):
    from softtool.runtime.torch_backend import TorchGenerator

    return TorchGenerator.from_adapter(adapter)


def _onnx(folder):
    from softtool.runtime.onnx_backend import OnnxGenerator

    return OnnxGenerator.from_export_dir(folder, threads=1)


def _rows(generator):
    return generator.row_ids([generator.encode({"source": t}) for t in TEXTS], [0] * len(TEXTS))


@pytest.mark.parametrize("template", ["prefix", "split"])
def test_prefill_scores_each_prompt_token_as_transformers_log_softmax(adapters, template):
    generator = _torch(adapters[template])
    rows = _rows(generator)
    generator.reserve(len(rows), 64)
    head, scores = generator.prefill_scored(list(range(len(rows))), rows, [0] * len(rows))
    np.testing.assert_array_equal(head[0], generator.prefill(list(range(len(rows))), rows, [0] * len(rows))[0])
    v = generator.vocab_size
    for row, row_scores in zip(rows, scores, strict=True):
        assert len(row_scores) == len(row)
        want = reference_logprobs(generator.model, generator.table, v, row)
        for p, score in enumerate(row_scores):
            # Nothing is scored for virtual tokens, for the row's first token, nor with a shared prefix (every
            # virtual token first) for the first text token, whose logits the prefill never computes.
            unscored = row[p] >= v or p == 0 or (template == "prefix" and p == 4)
            assert (score is None) == unscored, (p, row[p])
            if score is None:
                continue
            assert score.token == row[p]
            assert abs(score.logprob - want[p - 1, row[p]].item()) < 1e-4
            best = torch.topk(want[p - 1], MAX_LOGPROBS)
            assert [i for i, _ in score.top] == best.indices.tolist()
            np.testing.assert_allclose([lp for _, lp in score.top], best.values.numpy(), atol=1e-4)


def test_the_export_scores_prompts_as_the_torch_backend(adapters, exports):
    torch_gen, onnx_gen = _torch(adapters["prefix"]), _onnx(exports["full"])
    assert onnx_gen.can_score_prompt and onnx_gen.export_meta.target_top_k == MAX_LOGPROBS
    rows = _rows(onnx_gen)
    results = []
    for generator in (torch_gen, onnx_gen):
        generator.reserve(len(rows), 64)
        results.append(generator.prefill_scored(list(range(len(rows))), rows, [0] * len(rows))[1])
    scored = 0
    for want_row, got_row in zip(*results, strict=True):
        for want, got in zip(want_row, got_row, strict=True):
            assert (want is None) == (got is None)
            if want is not None:
                scored += 1
                assert got.token == want.token and abs(got.logprob - want.logprob) < 1e-4
                assert [i for i, _ in got.top] == [i for i, _ in want.top]
    assert scored == sum(len(r) - 5 for r in rows)


def _decode_scored(generator, rows, options, k=3):
    """Greedy through the engine with logprobs=k: per row, its tokens and their TokenLogprobs."""
    engine = Engine(generator, options, 2, 64)
    items = [engine.submit(row, 0, logprobs=k) for row in rows]
    tokens = {item: [] for item in items}
    scores = {item: [] for item in items}
    while not engine.done:
        emitted, _ = engine.step()
        for item, token in emitted:
            tokens[item].append(token)
        for item, entries in engine.logprobs.items():
            scores[item] += entries
    return [tokens[i] for i in items], [scores[i] for i in items]


def test_each_generated_token_gets_the_model_s_raw_log_prob_before_any_penalty(adapters):
    """With a repetition penalty and n-gram blocking the search picks other tokens than the model's argmax; the
    reported values are still the model's own distribution at each step."""
    generator = _torch(adapters["prefix"])
    rows = _rows(generator)
    options = SearchOptions(
        max_new_tokens=12, eos_token_ids=[2], pad_token_id=2, repetition_penalty=1.8, no_repeat_ngram_size=2
    )
    all_tokens, all_scores = _decode_scored(generator, rows, options)
    penalised = 0
    for row, tokens, scores in zip(rows, all_tokens, all_scores, strict=True):
        assert [s.token for s in scores] == tokens
        want = reference_logprobs(generator.model, generator.table, generator.vocab_size, row + tokens[:-1])
        for j, (token, score) in enumerate(zip(tokens, scores, strict=True)):
            dist = want[len(row) - 1 + j]
            assert abs(score.logprob - dist[token].item()) < 1e-4
            assert [i for i, _ in score.top] == torch.topk(dist, 3).indices.tolist()
            penalised += token != int(dist.argmax())
    assert penalised > 0, "the penalties never changed a choice: the test shows nothing"


def test_a_top_k_export_scores_generated_tokens_from_its_candidates(exports):
    options = SearchOptions(max_new_tokens=8, eos_token_ids=[2], pad_token_id=2)
    full, top8 = _onnx(exports["full"]), _onnx(exports["top8"])
    rows = _rows(full)
    want_tokens, want = _decode_scored(full, rows, options)
    got_tokens, got = _decode_scored(top8, rows, options)
    assert got_tokens == want_tokens
    for want_row, got_row in zip(want, got, strict=True):
        for w, g in zip(want_row, got_row, strict=True):
            assert abs(w.logprob - g.logprob) < 1e-4 and [i for i, _ in w.top] == [i for i, _ in g.top]


def test_a_format_2_export_still_generates_but_cannot_score_prompts(exports, tmp_path):
    old, new = _onnx(format_2_copy(exports["full"], tmp_path / "old")), _onnx(exports["full"])
    assert not old.can_score_prompt and old.export_meta.format == 2
    options = SearchOptions(max_new_tokens=8, eos_token_ids=[2], pad_token_id=2)
    rows = _rows(old)
    assert _decode_scored(old, rows, options) == _decode_scored(new, rows, options)  # logprobs need no re-export
    engine = Engine(old, options, 2, 64)
    with pytest.raises(ValueError, match="cannot score prompt tokens; re-export"):
        engine.submit(rows[0], 0, logprobs=1, prompt_logprobs=True)
