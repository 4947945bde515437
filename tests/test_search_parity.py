"""The C++ search reproduces transformers' generate(): greedy tokens, and beam search hypotheses in the
same order with sequences_scores equal to 1e-5, on a small random Llama driven step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import PARITY_PAD, PARITY_VOCAB, parity_llama
from softtool import search


@torch.no_grad()
def core_generate(model, prompts: list[list[int]], opts: search.SearchOptions, pad_id: int):
    vocab = model.config.vocab_size
    batch = search.build_batch(
        [[np.array(p)] for p in prompts], 0, [("text", 0)], search.BatchOptions(vocab, 0, pad_id=pad_id)
    )
    s = search.make_search(opts)
    width = batch.input_ids.shape[1]
    s.start(prompts, left_padding=[width - len(p) for p in prompts])
    copies = s.num_rows // len(prompts)
    ids = torch.from_numpy(batch.input_ids).repeat_interleave(copies, 0)
    mask = torch.from_numpy(batch.attention_mask).repeat_interleave(copies, 0)
    pos = torch.from_numpy(batch.position_ids).repeat_interleave(copies, 0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache = out.cache
    while not s.is_done():
        r = s.step(out.logits[:, -1].float().numpy())
        if s.is_done():
            break
        cache.reorder_cache(torch.from_numpy(r.beam_indices))
        mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=mask.dtype)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(
            input_ids=torch.from_numpy(r.next_tokens)[:, None],
            attention_mask=mask,
            position_ids=pos,
            cache=cache,
            use_cache=True,
        )
        cache = out.cache
    return [[(h.tokens.tolist(), h.score) for h in item] for item in s.finalize()]


def _strip(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], opts: search.SearchOptions, pad_id: int):
    """transformers' generate on the same left-padded batch -> [batch][num_return] (tokens, score)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=opts.max_new_tokens,
        min_new_tokens=opts.min_new_tokens or None,
        do_sample=False,
        num_beams=opts.num_beams,
        num_return_sequences=opts.num_return_sequences,
        length_penalty=opts.length_penalty,
        early_stopping=opts.early_stopping,
        no_repeat_ngram_size=opts.no_repeat_ngram_size or None,
        repetition_penalty=opts.repetition_penalty,
        eos_token_id=opts.eos_token_ids or None,
        pad_token_id=pad_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    eos = set(opts.eos_token_ids)
    new = out.sequences[:, width:].tolist()
    if opts.num_beams > 1:
        scores = out.sequences_scores.tolist()
    else:
        # Greedy has no sequences_scores: the sum of the chosen tokens' log-probs (after processors).
        logp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
        scores = []
        for i, row in enumerate(new):
            n = len(_strip(row, eos))
            n = min(n + 1, len(out.scores)) if n < len(row) else n
            scores.append(float(sum(logp[i, t, row[t]] for t in range(n))))
    k = opts.num_return_sequences
    return [[(_strip(new[i * k + j], eos), scores[i * k + j]) for j in range(k)] for i in range(len(prompts))]


VOCAB = PARITY_VOCAB
PAD = PARITY_PAD


@pytest.fixture(scope="module")
def model():
    return parity_llama()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    lengths = [5, 2, 8, 3]  # ragged: left padding
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def emitted_eos(model, prompts):
    """A token the model really emits early in one row (but not first everywhere): EOS mid-batch."""
    free = hf_generate(model, prompts, search.SearchOptions(max_new_tokens=6, pad_token_id=PAD), PAD)
    return free[0][0][0][2]


def _assert_same(core, ref, check_scores=True):
    assert len(core) == len(ref)
    for item_core, item_ref in zip(core, ref, strict=True):
        assert [t for t, _ in item_core] == [t for t, _ in item_ref]
        if check_scores:
            for (_, a), (_, b) in zip(item_core, item_ref, strict=True):
                assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("with_eos", [False, True])
def test_greedy_tokens_equal_transformers_on_ragged_batch(model, prompts, emitted_eos, with_eos):
    opts = search.SearchOptions(max_new_tokens=10, eos_token_ids=[emitted_eos] if with_eos else [], pad_token_id=PAD)
    core = core_generate(model, prompts, opts, PAD)
    ref = hf_generate(model, prompts, opts, PAD)
    _assert_same(core, ref)
    if with_eos:  # the EOS really ended a row early while others ran on
        lengths = [len(item[0][0]) for item in core]
        assert min(lengths) < 10


def test_greedy_with_processors_equals_transformers(model, prompts, emitted_eos):
    opts = search.SearchOptions(
        max_new_tokens=12,
        min_new_tokens=4,
        eos_token_ids=[emitted_eos],
        pad_token_id=PAD,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
    )
    _assert_same(core_generate(model, prompts, opts, PAD), hf_generate(model, prompts, opts, PAD))


BEAM_SETTINGS = [
    dict(length_penalty=1.0, early_stopping=False),
    dict(length_penalty=0.6, early_stopping=True, no_repeat_ngram_size=2),
    dict(length_penalty=1.5, early_stopping="never", repetition_penalty=1.2),
    dict(length_penalty=-0.5, early_stopping=False, min_new_tokens=3),
]


@pytest.mark.parametrize("num_beams", [1, 2, 4])
@pytest.mark.parametrize("settings", BEAM_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_beam_hypotheses_and_scores_equal_transformers(model, prompts, emitted_eos, num_beams, settings):
    opts = search.SearchOptions(
        max_new_tokens=8,
        eos_token_ids=[emitted_eos],
        pad_token_id=PAD,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        **settings,
    )
    core = core_generate(model, prompts, opts, PAD)
    ref = hf_generate(model, prompts, opts, PAD)
    _assert_same(core, ref)


def test_beam_with_two_eos_ids_and_fewer_returns_equals_transformers(model, prompts, emitted_eos):
    free = hf_generate(model, prompts, search.SearchOptions(max_new_tokens=6, pad_token_id=PAD), PAD)
    second = free[1][0][0][1]
    opts = search.SearchOptions(
        max_new_tokens=8, eos_token_ids=[emitted_eos, second], pad_token_id=PAD, num_beams=3, num_return_sequences=2
    )
    _assert_same(core_generate(model, prompts, opts, PAD), hf_generate(model, prompts, opts, PAD))
