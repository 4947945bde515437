"""Property tests of the search core over random shapes, options and logits (NaN, inf, ties, vocab
smaller than the beam, zero length): it never crashes, never leaves the vocabulary, and greedy search is
numpy's arg-max."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from softtool import search

SETTINGS = settings(max_examples=150, deadline=None)

nasty_floats = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, -1.0]),  # ties
)


@st.composite
def search_case(draw):
    vocab = draw(st.integers(1, 12))
    batch = draw(st.integers(1, 3))
    beams = draw(st.integers(1, 4))
    opts = search.SearchOptions(
        max_new_tokens=draw(st.integers(0, 4)),
        min_new_tokens=draw(st.integers(0, 2)),
        eos_token_ids=draw(st.lists(st.integers(0, vocab - 1), max_size=2, unique=True)),
        pad_token_id=0,
        num_beams=beams,
        num_return_sequences=draw(st.integers(1, beams)),
        length_penalty=draw(st.sampled_from([-1.0, 0.0, 1.0, 2.0])),
        early_stopping=draw(st.sampled_from([False, True, "never"])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.5])),
        no_repeat_ngram_size=draw(st.integers(0, 2)),
    )
    prompts = [draw(st.lists(st.integers(0, vocab + 3), max_size=4)) for _ in range(batch)]
    seed = draw(st.integers(0, 2**16))
    nasty = draw(st.booleans())
    return vocab, opts, prompts, seed, nasty


def _logits(rng, rows, vocab, nasty):
    x = rng.standard_normal((rows, vocab)).astype(np.float32)
    if nasty:
        specials = np.array([np.nan, np.inf, -np.inf, 0.0], dtype=np.float32)
        mask = rng.random((rows, vocab)) < 0.3
        x[mask] = rng.choice(specials, size=mask.sum())
    return x


@SETTINGS
@given(search_case())
def test_search_never_crashes_and_stays_in_vocabulary(case):
    vocab, opts, prompts, seed, nasty = case
    rng = np.random.default_rng(seed)
    s = search.make_search(opts)
    s.start(prompts)
    assert s.num_rows == len(prompts) * opts.num_beams
    steps = 0
    while not s.is_done():
        r = s.step(_logits(rng, s.num_rows, vocab, nasty))
        steps += 1
        assert steps <= opts.max_new_tokens
        assert ((r.next_tokens >= 0) & (r.next_tokens < vocab)).all()
        # A beam continues a row of its own batch item.
        assert (r.beam_indices // opts.num_beams == np.arange(s.num_rows) // opts.num_beams).all()
    out = s.finalize()
    assert len(out) == len(prompts)
    for item in out:
        assert len(item) == opts.num_return_sequences
        for hyp in item:
            assert len(hyp.tokens) <= opts.max_new_tokens
            assert ((hyp.tokens >= 0) & (hyp.tokens < vocab)).all()


@SETTINGS
@given(
    arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 30)), elements=nasty_floats),
    st.integers(1, 3),
)
def test_greedy_is_numpy_argmax(logits, steps):
    opts = search.SearchOptions(max_new_tokens=steps, pad_token_id=0)
    s = search.make_search(opts)
    s.start([[1]] * logits.shape[0])
    for _ in range(steps):
        r = s.step(logits)
        np.testing.assert_array_equal(r.next_tokens, np.argmax(logits, axis=1))
    assert s.is_done()


@SETTINGS
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 30)), elements=st.floats(-50, 50, width=32)))
def test_greedy_on_topk_candidates_equals_full_row(logits):
    k = min(5, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(logits, order, axis=1)
    full = search.make_search(search.SearchOptions(max_new_tokens=1))
    full.start([[]] * logits.shape[0])
    reduced = search.make_search(search.SearchOptions(max_new_tokens=1))
    reduced.start([[]] * logits.shape[0])
    np.testing.assert_array_equal(full.step(logits).next_tokens, reduced.step_topk(values, order).next_tokens)


@SETTINGS
@given(st.integers(0, 2**32), st.integers(1, 5), st.floats(0.05, 1.0))
def test_sampling_is_seeded_and_respects_top_k(seed, top_k, top_p):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((3, 20)).astype(np.float32)
    opts = search.SearchOptions(max_new_tokens=1, do_sample=True, top_k=top_k, top_p=top_p, seed=seed)
    draws = []
    for _ in range(2):
        s = search.make_search(opts)
        s.start([[1]] * 3)
        draws.append(s.step(logits).next_tokens)
    np.testing.assert_array_equal(draws[0], draws[1])
    allowed = np.argsort(-logits, axis=1)[:, :top_k]
    assert all(t in allowed[i] for i, t in enumerate(draws[0]))


def test_invalid_options_raise_value_error_with_reason():
    for kwargs, reason in [
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(do_sample=True, num_beams=2), "beam sampling"),
        (dict(temperature=0.0), "temperature"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ]:
        with pytest.raises(ValueError, match=reason):
            search.SearchOptions(**kwargs)
