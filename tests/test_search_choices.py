"""SearchOptions.choices from Python: every output is one of the choices followed by an EOS, labels that share
a prefix are all reachable, EOS comes only after a whole choice, the sparse path refuses to guess, SlotSearch
items keep their own choices, and greedy decoding with choices on a random Llama equals transformers'
generate(prefix_allowed_tokens_fn=...) token for token and score for score."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers import PARITY_PAD, PARITY_VOCAB, parity_llama
from softtool import search
from test_search_parity import core_generate

VOCAB = 10
EOS = 0
FAVOURITE = 9  # the hand-made logits' top token, in no choice: an unconstrained search emits it
LABELS = [[4], [4, 5], [7, 8], [7, 2, 6], [6]]  # [4] is a prefix of [4, 5]; [7, 8] and [7, 2, 6] share 7


def options(choices, **kw) -> search.SearchOptions:
    kw.setdefault("max_new_tokens", 6)
    return search.SearchOptions(eos_token_ids=[EOS], choices=choices, **kw)


def ranking(order) -> np.ndarray:
    """A row of logits that ranks the tokens in `order` first (best first), the others below them."""
    row = np.full(VOCAB, -5.0, dtype=np.float32)
    row[list(order)] = 10.0 - np.arange(len(order), dtype=np.float32)
    return row


def decode(opts, logits_at, prompts=([1],)):
    """Greedy search or sampling on `prompts`; logits_at(step, row) is that row's logits. -> per row, tokens."""
    s = search.make_search(opts)
    s.start([np.array(p) for p in prompts])
    step = 0
    while not s.is_done():
        s.step(np.stack([logits_at(step, r) for r in range(s.num_rows)]))
        step += 1
    return [h.tokens.tolist() for item in s.finalize() for h in item]


def test_unconstrained_greedy_is_not_a_choice_but_constrained_is():
    prefer = ranking([FAVOURITE, 3, 5, 4])
    assert decode(options([]), lambda *_: prefer) == [[FAVOURITE] * 6]
    assert decode(options(LABELS), lambda *_: prefer) == [[4, 5]]


def steer_to(label):
    """Logits that rank the forbidden favourite first, then the label's next token (EOS after it), then every
    other token, so at each step every other allowed token (EOS included) is on offer but ranked lower."""

    def logits_at(step, _row):
        want = label[step] if step < len(label) else EOS
        rest = [t for t in [EOS, 1, 2, 3, 4, 5, 6, 7, 8] if t != want]
        return ranking([FAVOURITE, want, *rest])

    return logits_at


@pytest.mark.parametrize("label", LABELS, ids=str)
def test_every_label_is_reachable_including_prefixes_of_others(label):
    assert decode(options(LABELS), steer_to(label)) == [label]


def test_eos_is_allowed_only_after_a_whole_choice():
    # EOS is the top token at every step: the search still runs to the end of a choice.
    eos_first = ranking([EOS, 7, 9, 6, 8])
    s = search.make_search(options([[7, 9, 6], [8]]))
    s.start([np.array([1])])
    emitted = []
    while not s.is_done():
        r = s.step(eos_first[None])
        emitted.append(int(r.next_tokens[0]))
        assert bool(r.finished[0]) == (emitted[-1] == EOS)
    assert emitted == [7, 9, 6, EOS]
    # Where one label ends inside another ([4] in [4, 5]), EOS is allowed right there.
    assert decode(options(LABELS), lambda *_: ranking([EOS, 4])) == [[4]]


def test_scores_are_log_probabilities_among_the_allowed_tokens():
    row = np.full(VOCAB, 3.0, dtype=np.float32)
    row[[4, 6, EOS]] = [1.0, 0.5, 2.0]
    s = search.make_search(options([[4], [6]]))
    s.start([np.array([1])])
    while not s.is_done():
        s.step(row[None])
    hyp = s.finalize()[0][0]
    assert hyp.tokens.tolist() == [4]
    assert hyp.score == pytest.approx(1.0 - np.log(np.exp(1.0) + np.exp(0.5)), abs=1e-6)


def test_greedy_equals_masking_every_other_token_to_minus_infinity():
    """Random labels (many sharing prefixes) and random logits with ties: the core's greedy tokens and scores
    equal numpy's arg-max of each step's row with the disallowed tokens set to -inf."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        labels = {tuple(rng.integers(1, 5, size=int(rng.integers(1, 4))).tolist()) for _ in range(6)}
        labels = [list(c) for c in labels]
        rows = [np.round(rng.standard_normal(VOCAB), 1).astype(np.float32) for _ in range(5)]  # ties
        got = search.make_search(options(labels))
        got.start([np.array([1])])
        generated, score = [], 0.0
        while not got.is_done():
            row = rows[len(generated) % len(rows)]
            allowed = {
                c[len(generated)] for c in labels if c[: len(generated)] == generated and len(c) > len(generated)
            }
            allowed |= {EOS} if generated in labels else set()
            masked = np.where(np.isin(np.arange(VOCAB), sorted(allowed)), row, -np.inf)
            want = int(np.argmax(masked))
            score += float(masked[want] - np.log(np.exp(masked - masked.max()).sum()) - masked.max())
            assert int(got.step(row[None]).next_tokens[0]) == want
            if want != EOS:
                generated.append(want)
        hyp = got.finalize()[0][0]
        assert hyp.tokens.tolist() == generated and generated in labels
        assert hyp.score == pytest.approx(score, abs=1e-5)


def test_sampled_outputs_are_always_choices_and_cover_them():
    seen = set()
    flat = ranking([FAVOURITE, EOS, 4, 7, 5, 8, 2, 6])
    for seed in range(6):
        opts = options(LABELS, do_sample=True, num_return_sequences=8, temperature=3.0, seed=seed)
        for tokens in decode(opts, lambda *_: flat):
            assert tokens in LABELS
            seen.add(tuple(tokens))
    assert seen == {tuple(c) for c in LABELS}


def test_processors_apply_first_and_the_constraint_wins_when_they_ban_every_allowed_token():
    # Repetition penalty (the prompt holds 2) halves 2's logit: 3 wins among the allowed.
    row = np.zeros(VOCAB, dtype=np.float32)
    row[[FAVOURITE, 2, 3]] = [5.0, 1.0, 0.9]
    assert decode(options([[2], [3]], repetition_penalty=2.0), lambda *_: row, prompts=([2],)) == [[3]]
    # 1-gram blocking bans every token seen, here both allowed ones: ranked without it, 3 before 2.
    opts = options([[2], [3]], no_repeat_ngram_size=1)
    assert decode(opts, lambda *_: ranking([EOS, 3, 2]), prompts=([2, 3],)) == [[3]]
    # min_new_tokens bans EOS: a longer label goes on where there is one; the last label still ends.
    assert decode(options(LABELS, min_new_tokens=4), lambda *_: ranking([EOS, 4, 5, 6])) == [[4, 5]]


def test_step_topk_picks_the_best_allowed_candidate_and_refuses_when_none_is_there():
    s = search.make_search(options([[4, 5], [7]]))
    s.start([np.array([1])])
    values = np.array([[-0.1, -2.0, -3.0]], dtype=np.float32)
    r = s.step_topk(values, np.array([[FAVOURITE, 7, 4]]))
    assert r.next_tokens.tolist() == [7]
    # Only EOS may follow [7], and it is not among the candidates.
    with pytest.raises(RuntimeError, match="none of the allowed continuations is among the k=3 candidates"):
        s.step_topk(values, np.array([[FAVOURITE, 7, 4]]))
    # Nothing changed: the full logits end the row.
    assert s.step(ranking([FAVOURITE, EOS])[None]).next_tokens.tolist() == [EOS]
    assert s.finalize()[0][0].tokens.tolist() == [7]


def test_step_topk_with_every_token_as_candidate_equals_step():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((6, VOCAB)).astype(np.float32)
    logp = rows - rows.max(1, keepdims=True)
    logp = (logp - np.log(np.exp(logp).sum(1, keepdims=True))).astype(np.float32)
    order = np.argsort(-logp, axis=1, kind="stable")
    dense, sparse = search.make_search(options(LABELS)), search.make_search(options(LABELS))
    for s in (dense, sparse):
        s.start([np.array([1])])
    step = 0
    while not dense.is_done():
        a = dense.step(rows[step][None]).next_tokens
        b = sparse.step_topk(np.take_along_axis(logp, order, 1)[step][None], order[step][None]).next_tokens
        assert a.tolist() == b.tolist()
        step += 1
    assert sparse.is_done()


def test_slot_search_items_keep_their_own_choices():
    s = search.make_slot_search(options([[6], [6, 2]]), num_slots=2)
    per_item = [None, options([[3, 4], [5]]), options([]), None]
    for opts in per_item:
        s.submit(np.array([1]), opts)
    row = ranking([FAVOURITE, 2, 4, 6, 3, 5, EOS])
    out = {}
    while not s.is_done():
        s.admit()
        slots = s.active_slots()
        s.step(np.stack([row] * len(slots)), slots)
        out.update((item, hyp.tokens.tolist()) for item, hyp in s.take_finished())
    assert out == {0: [6, 2], 1: [3, 4], 2: [FAVOURITE] * 6, 3: [6, 2]}


@pytest.mark.parametrize(
    ("choices", "extra", "reason"),
    [
        ([[4]], dict(eos_token_ids=[]), "needs at least one id in eos_token_ids"),
        ([[4], []], {}, r"choices\[1\] is empty"),
        ([[4, 5], [6], [4, 5]], {}, r"choices\[0\] and choices\[2\] are the same sequence"),
        ([[4, -1]], {}, "negative token id -1"),
        ([[4, EOS]], {}, "contains the EOS id 0"),
        ([[4, 5, 6]], dict(max_new_tokens=3), r"longest choice's length \+ 1 \(4\)"),
        ([[4]], dict(num_beams=2), "greedy search and sampling only"),
    ],
)
def test_bad_choices_are_refused_with_the_reason(choices, extra, reason):
    kw = dict(eos_token_ids=[EOS], max_new_tokens=6, choices=choices) | extra
    with pytest.raises(ValueError, match=reason):
        search.SearchOptions(**kw)
    core = search.SearchOptions().to_core()
    for name, value in kw.items():
        setattr(core, name, value)
    with pytest.raises(ValueError, match=reason):
        search.make_search(core)


def test_a_choice_token_outside_the_logits_is_an_error():
    s = search.make_search(options([[4], [12]]))
    s.start([np.array([1])])
    with pytest.raises(ValueError, match="token id 12 .* outside the logits' 10-token vocabulary"):
        s.step(np.zeros((1, VOCAB), dtype=np.float32))


# --- parity with transformers' PrefixConstrainedLogitsProcessor on a random Llama (it has no EOS: we give one).

PARITY_EOS = 3


def prefix_allowed(choices: list[list[int]], width: int):
    """transformers' prefix_allowed_tokens_fn for `choices`, the same semantics written out plainly."""

    def allowed(_batch_id: int, ids: torch.Tensor) -> list[int]:
        generated = ids[width:].tolist()
        if PARITY_EOS in generated:  # a finished row (transformers feeds it pads); any token will do
            return [PARITY_PAD]
        n = len(generated)
        tokens = {c[n] for c in choices if len(c) > n and c[:n] == generated}
        return sorted(tokens) + ([PARITY_EOS] if generated in choices else [])

    return allowed


@torch.no_grad()
def hf_choices(model, prompts, choices, max_new_tokens, **kw):
    """generate(prefix_allowed_tokens_fn=...) on a left-padded batch -> per item, (tokens, score)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PARITY_PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=PARITY_EOS,
        pad_token_id=PARITY_PAD,
        prefix_allowed_tokens_fn=prefix_allowed(choices, width),
        output_scores=True,
        return_dict_in_generate=True,
        **kw,
    )
    logp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
    results = []
    for i, row in enumerate(out.sequences[:, width:].tolist()):
        n = row.index(PARITY_EOS)  # every row ends with an EOS within max_new_tokens
        results.append((row[:n], float(sum(logp[i, t, row[t]] for t in range(n + 1)))))
    return results


@pytest.fixture(scope="module")
def model():
    return parity_llama()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(4, PARITY_VOCAB, (n,), generator=g).tolist() for n in [5, 2, 8, 3, 6, 4]]


CHOICE_SETS = {
    "single-tokens": [[11], [42], [77]],
    "shared-first-token": [[20, 31], [20, 32, 45], [20, 33], [60]],
    "prefix-of-another": [[50], [50, 51], [50, 51, 52, 53], [70, 71]],
    "many-labels": [[t, u] for t in range(10, 90, 7) for u in (5, 40, 91)] + [[t] for t in range(12, 90, 13)],
}
# Labels that share a prefix and that the batch really decodes, each for some row.
REACHED = {"shared-first-token": [[20, 31], [20, 33]], "prefix-of-another": [[50], [50, 51, 52, 53]]}


@pytest.mark.parametrize("name", list(CHOICE_SETS))
def test_greedy_with_choices_equals_transformers_prefix_allowed_tokens_fn(model, prompts, name):
    choices = CHOICE_SETS[name]
    max_new_tokens = max(len(c) for c in choices) + 2
    opts = search.SearchOptions(
        max_new_tokens=max_new_tokens, eos_token_ids=[PARITY_EOS], pad_token_id=PARITY_PAD, choices=choices
    )
    core = [item[0] for item in core_generate(model, prompts, opts, PARITY_PAD)]
    ref = hf_choices(model, prompts, choices, max_new_tokens)
    assert [tokens for tokens, _ in core] == [tokens for tokens, _ in ref]
    for (_, a), (_, b) in zip(core, ref, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert all(tokens in choices for tokens, _ in core)
    assert all(label in [tokens for tokens, _ in core] for label in REACHED.get(name, []))


def test_greedy_with_choices_and_repetition_penalty_equals_transformers(model, prompts):
    # One-token labels from two prompts' tokens: the penalty moves a row to another label.
    choices = [[t] for t in sorted(set(prompts[0]) | set(prompts[2]))]
    opts = search.SearchOptions(
        max_new_tokens=3, eos_token_ids=[PARITY_EOS], pad_token_id=PARITY_PAD, choices=choices, repetition_penalty=1.5
    )
    core = [item[0] for item in core_generate(model, prompts, opts, PARITY_PAD)]
    ref = hf_choices(model, prompts, choices, 3, repetition_penalty=1.5)
    assert [tokens for tokens, _ in core] == [tokens for tokens, _ in ref]
    for (_, a), (_, b) in zip(core, ref, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    plain = core_generate(model, prompts, dataclasses.replace(opts, repetition_penalty=1.0), PARITY_PAD)
    assert [item[0][0] for item in plain] != [tokens for tokens, _ in core]
