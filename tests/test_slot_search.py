"""SlotSearch (continuous batching) against GreedySearch: with logits that depend only on an item's own
history, N items decoded through K < N slots, admitted as slots free up and stepped in any order, give
exactly the tokens and scores GreedySearch gives on all N at once: greedy, with processors, sampling
(seeded per item, so item i samples like static row i), and step_topk."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from softtool import search

VOCAB = 23
EOS = 3


def logits_for(history: list[int]) -> np.ndarray:
    """Deterministic logits of an item's next token: a function of its history only, EOS made likely."""
    rng = np.random.default_rng(zlib.crc32(np.asarray(history, dtype=np.int64).tobytes()))
    x = (rng.standard_normal(VOCAB) * 2.0).astype(np.float32)
    x[EOS] += 1.5
    return x


def topk_of(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = (logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))).astype(np.float32)
    idx = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(logp, idx, axis=1), idx


def run_static(opts: search.SearchOptions, prompts: list[list[int]], topk: int = 0):
    """GreedySearch on all prompts at once -> per row (tokens, score); rows are item-major copies."""
    s = search.make_search(opts)
    s.start(prompts)
    copies = s.num_rows // len(prompts)
    history = [list(p) for p in prompts for _ in range(copies)]
    while not s.is_done():
        logits = np.stack([logits_for(h) for h in history])
        r = s.step_topk(*topk_of(logits, topk)) if topk else s.step(logits)
        for h, t in zip(history, r.next_tokens.tolist(), strict=True):
            h.append(t)  # finished rows get the pad token; their logits are ignored
    return [(h.tokens.tolist(), h.score) for item in s.finalize() for h in item]


def run_slots(opts, prompts, num_slots, seed=0, topk=0, item_options=None, submit_early=2):
    """Decode `prompts` through a SlotSearch the way a serving loop would: a few items submitted up front,
    the rest one per iteration while others decode; each iteration admits newcomers and steps them (their
    prefill logits), then steps the slots that were already decoding, each time in a shuffled order."""
    rng = np.random.default_rng(seed)
    s = search.make_slot_search(opts, num_slots)
    history: dict[int, list[int]] = {}
    item_of_slot: dict[int, int] = {}
    admissions: list[tuple[int, int]] = []
    results: dict[int, tuple[list[int], float]] = {}
    queue = list(range(len(prompts)))

    def submit_next():
        i = queue.pop(0)
        item_id = s.submit(np.array(prompts[i]), None if item_options is None else item_options[i])
        assert item_id == i
        history[item_id] = list(prompts[i])

    def step(slots: list[int]):
        if not slots:
            return
        slots = [int(x) for x in rng.permutation(slots)]
        logits = np.stack([logits_for(history[item_of_slot[x]]) for x in slots])
        r = s.step_topk(*topk_of(logits, topk), np.array(slots)) if topk else s.step(logits, np.array(slots))
        for x, t, done in zip(slots, r.next_tokens.tolist(), r.finished.tolist(), strict=True):
            history[item_of_slot[x]].append(t)
            assert s.slot_item(x) == (-1 if done else item_of_slot[x])

    for _ in range(min(submit_early, len(queue))):
        submit_next()
    while queue or not s.is_done():
        if queue:
            submit_next()
        decoding = s.active_slots().tolist()
        new = s.admit()
        admissions += new
        for slot, item_id in new:
            item_of_slot[slot] = item_id
        assert s.num_active() <= num_slots
        step([slot for slot, _ in new])
        step(decoding)
        for item_id, hyp in s.take_finished():
            assert item_id not in results
            results[item_id] = (hyp.tokens.tolist(), hyp.score)
    assert s.take_finished() == []
    return [results[i] for i in range(len(prompts))], admissions


def make_prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=int(rng.integers(1, 6))).tolist() for _ in range(n)]


SETTINGS = {
    "greedy": dict(),
    "processors": dict(repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=3),
    "sampling": dict(do_sample=True, seed=7),
    "sampling-warped": dict(do_sample=True, seed=3, temperature=0.7, top_k=8, top_p=0.9, repetition_penalty=1.2),
}


@pytest.mark.parametrize("num_slots", [1, 3, 5])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_slots_equal_static_greedy_search(name, num_slots):
    prompts = make_prompts(9)
    opts = search.SearchOptions(max_new_tokens=12, eos_token_ids=[EOS], pad_token_id=0, **SETTINGS[name])
    want = run_static(opts, prompts)
    got, admissions = run_slots(opts, prompts, num_slots, seed=num_slots)
    assert got == want  # tokens and float scores, exactly
    lengths = {len(tokens) for tokens, _ in want}
    assert len(lengths) > 1, "items should end at different steps (EOS mid-batch)"
    # Every item was admitted once, into a slot that other items used before or after it.
    assert sorted(item for _, item in admissions) == list(range(len(prompts)))
    assert {slot for slot, _ in admissions} <= set(range(num_slots))
    assert len(admissions) > num_slots


@pytest.mark.parametrize("name", ["greedy", "processors", "sampling-warped"])
def test_slots_step_topk_equal_static_step_topk(name):
    prompts = make_prompts(7, seed=2)
    opts = search.SearchOptions(max_new_tokens=10, eos_token_ids=[EOS], pad_token_id=0, **SETTINGS[name])
    want = run_static(opts, prompts, topk=6)
    got, _ = run_slots(opts, prompts, 3, topk=6)
    assert got == want


def test_sampled_copies_equal_static_num_return_sequences():
    """num_return_sequences=n in GreedySearch is n item-major rows; submitting each prompt n times gives
    the same samples, because item id i draws like static row i."""
    prompts = make_prompts(3, seed=3)
    static = search.SearchOptions(max_new_tokens=8, eos_token_ids=[EOS], do_sample=True, seed=5, num_return_sequences=3)
    want = run_static(static, prompts)
    per_item = search.SearchOptions(max_new_tokens=8, eos_token_ids=[EOS], do_sample=True, seed=5)
    got, _ = run_slots(per_item, [p for p in prompts for _ in range(3)], 2)
    assert got == want


def test_per_item_options_equal_a_search_with_those_options():
    prompts = make_prompts(6, seed=4)
    base = search.SearchOptions(max_new_tokens=10, eos_token_ids=[EOS])
    variants = [
        None,
        search.SearchOptions(max_new_tokens=2, eos_token_ids=[EOS]),
        search.SearchOptions(max_new_tokens=10, eos_token_ids=[], repetition_penalty=1.5),
        search.SearchOptions(max_new_tokens=6, eos_token_ids=[EOS], min_new_tokens=5, no_repeat_ngram_size=1),
        search.SearchOptions(max_new_tokens=0),
        search.SearchOptions(max_new_tokens=7, eos_token_ids=[EOS]).to_core(),  # the core struct works too
    ]
    got, _ = run_slots(base, prompts, 2, item_options=variants)
    for i, (prompt, opts) in enumerate(zip(prompts, variants, strict=True)):
        alone = run_static(base if opts is None else opts, [prompt])
        assert got[i] == alone[0], i
    assert got[1][0] == run_static(base, [prompts[1]])[0][0][:2]
    assert got[4] == ([], 0.0)


def test_sampling_does_not_depend_on_slot_count_or_order_with_per_item_seeds():
    prompts = make_prompts(8, seed=5)
    opts = search.SearchOptions(max_new_tokens=9, eos_token_ids=[EOS], do_sample=True, top_p=0.8)
    seeds = [search.SearchOptions(max_new_tokens=9, eos_token_ids=[EOS], do_sample=True, seed=s) for s in range(8)]
    runs = [run_slots(opts, prompts, k, seed=k, item_options=seeds)[0] for k in (1, 4, 8)]
    assert runs[0] == runs[1] == runs[2]


def test_cancel_keeps_tokens_so_far_and_frees_the_slot():
    prompts = make_prompts(3, seed=6)
    opts = search.SearchOptions(max_new_tokens=10, eos_token_ids=[], pad_token_id=0)
    s = search.make_slot_search(opts, 1)
    for p in prompts:
        s.submit(p)
    assert s.admit() == [(0, 0)]
    history = list(prompts[0])
    for _ in range(4):
        history.append(int(s.step(logits_for(history)[None], np.array([0])).next_tokens[0]))
    assert s.cancel(0) is True
    assert s.slot_item(0) == -1 and s.num_active() == 0
    assert s.cancel(2) is True  # still queued
    assert s.cancel(0) is False  # already ended
    (item0, hyp0), (item2, hyp2) = s.take_finished()
    assert (item0, item2) == (0, 2)
    assert hyp0.tokens.tolist() == history[len(prompts[0]) :]
    assert hyp0.tokens.tolist() == run_static(opts, [prompts[0]])[0][0][:4]
    assert hyp2.tokens.tolist() == []
    assert s.admit() == [(0, 1)]  # the queue moved on, skipping the cancelled item
    assert s.num_pending() == 0 and not s.is_done()


def test_bad_options_and_calls_raise():
    with pytest.raises(ValueError, match="num_beams"):
        search.make_slot_search(search.SearchOptions(num_beams=2), 2)
    with pytest.raises(ValueError, match="num_slots"):
        search.make_slot_search(search.SearchOptions(), 0)
    s = search.make_slot_search(search.SearchOptions(max_new_tokens=3), 2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        s.submit([1], search.SearchOptions(do_sample=True, num_return_sequences=2))
    with pytest.raises(TypeError, match="options"):
        s.submit([1], {"max_new_tokens": 3})
    with pytest.raises(ValueError, match="prompt_ids"):
        s.submit([[1, 2]])
    assert s.submit([1, 2]) == 0
    assert s.admit() == [(0, 0)]
    assert s.num_slots() == 2 and s.active_slots().tolist() == [0]
    logits = np.zeros((1, VOCAB), np.float32)
    with pytest.raises(ValueError, match="holds no item"):
        s.step(logits, np.array([1]))
    with pytest.raises(ValueError, match="len\\(slots\\)"):
        s.step(np.zeros((2, VOCAB), np.float32), np.array([0]))
    with pytest.raises(ValueError, match="no item 5"):
        s.cancel(5)
    assert s.step(np.zeros((0, VOCAB), np.float32), np.zeros(0, np.int64)).next_tokens.shape == (0,)
