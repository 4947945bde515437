"""The static decode step (softtool.runtime.static_step) on the CPU: slot buckets, fixed buffers that outlive
a generate() call, tokens and positions advanced on the device by the step itself, and the same tokens (and, for
rows that ask, the same log-probs) as the dynamic step in both backends, for the traced and the GroupQueryAttention
export forms (the CUDA-graph capture itself runs in tests/test_cuda_graphs.py, on a GPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import format_2_copy, run_cli, save_tiny_adapter
from softtool.runtime.decode import Engine, EngineOptions
from softtool.runtime.static_step import bucket_for, round_capacity, slot_buckets
from softtool.search import SearchOptions

SOURCES = [
    "A man in a red jacket rides a bicycle.",
    "Two dogs play in the snow.",
    "A woman reads.",
    "Kids.",
    "The tower was finished in 1889 and is 330 metres tall.",
    "A cat sleeps on a warm windowsill in the afternoon sun.",
] * 2
# The random model never emits its EOS; END is a token it emits in some rows only (chosen once from its greedy
# outputs, see the `options` fixture), so rows end at different steps and slots are handed on.
SETTINGS = {
    "greedy": {},
    # The search chooses other than the step's greedy id often here, so the engine writes tokens back.
    "penalties": {"no_repeat_ngram_size": 2, "repetition_penalty": 1.5},
    "sampling": {"do_sample": True, "top_k": 20, "seed": 3},
}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, gqa_model_dir):
    torch.manual_seed(1)
    return save_tiny_adapter(tmp_path_factory.mktemp("adapter") / "de", gqa_model_dir, torch.randn(4, 64) * 0.2)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, adapter_dir):
    from softtool.export.onnx import ExportOptions, export_adapters

    out = tmp_path_factory.mktemp("exports")
    for form in ("traced", "gqa"):
        export_adapters([str(adapter_dir)], out / form, ExportOptions(form=form))
    return {form: out / form for form in ("traced", "gqa")}


def _rows(generator):
    return [generator.encode({"source": s}) for s in SOURCES]


@pytest.fixture(scope="module")
def options(adapter_dir) -> dict[str, SearchOptions]:
    from collections import Counter

    from softtool.runtime import load_generator

    generator = load_generator(str(adapter_dir), "torch")
    free = generator.generate(_rows(generator), None, SearchOptions(max_new_tokens=12, eos_token_ids=[2]))
    seen = Counter(t for row in free for t in set(row[0][1:8]))
    end = next(t for t, n in seen.most_common() if n < len(free))
    return {k: SearchOptions(max_new_tokens=12, eos_token_ids=[end], pad_token_id=2, **v) for k, v in SETTINGS.items()}


def test_slot_buckets_are_powers_of_two_then_the_slot_count():
    assert slot_buckets(1) == [1]
    assert slot_buckets(16) == [1, 2, 4, 8, 16]
    assert slot_buckets(12) == [1, 2, 4, 8, 12]
    assert bucket_for(slot_buckets(12), 5) == 8 and bucket_for(slot_buckets(12), 9) == 12
    with pytest.raises(ValueError):
        bucket_for(slot_buckets(4), 5)


def test_capacities_round_up_to_a_multiple_of_128():
    assert [round_capacity(c) for c in (1, 128, 129, 300)] == [128, 128, 256, 384]


@pytest.mark.parametrize("setting", SETTINGS)
def test_torch_static_step_gives_the_dynamic_steps_tokens(adapter_dir, options, setting):
    from softtool.runtime import load_generator

    generator = load_generator(str(adapter_dir), "torch")
    rows = _rows(generator)
    dynamic = generator.generate(rows, None, options[setting], EngineOptions(slots=4, step="dynamic"))
    static = generator.generate(rows, None, options[setting], EngineOptions(slots=4, step="static"))
    assert static == dynamic
    if setting == "greedy":
        assert len({len(r[0]) for r in dynamic}) > 1, "rows should end at different steps"


@pytest.mark.parametrize("form", ["traced", "gqa"])
@pytest.mark.parametrize("setting", ["greedy", "penalties"])
def test_onnx_static_step_gives_torchs_tokens(adapter_dir, exports, options, form, setting):
    from softtool.runtime import load_generator

    reference = load_generator(str(adapter_dir), "torch")
    generator = load_generator(str(exports[form]), "onnx")
    rows = _rows(reference)
    want = reference.generate(rows, None, options[setting], EngineOptions(slots=4, step="dynamic"))
    for step in ("static", "dynamic"):
        assert generator.generate(rows, None, options[setting], EngineOptions(slots=4, step=step)) == want, step


def _decode_scored(generator, options, step: str):
    """Every source through one engine of 4 slots with `step`, the odd rows asking for each token's log-prob and 3
    best candidates (so the engine's rows need the full head, not only the greedy choice), the even rows for none.
    Returns each row's tokens and its TokenLogprobs."""
    rows = generator.row_ids(_rows(generator), [0] * len(SOURCES))
    engine = Engine(generator, options, 4, 64, engine=EngineOptions(slots=4, step=step))
    items = [engine.submit(row, 0, logprobs=3 if i % 2 else None) for i, row in enumerate(rows)]
    assert (engine.fixed is not None) == (step == "static") and not engine.greedy_only
    tokens = {item: [] for item in items}
    scores = {item: [] for item in items}
    while not engine.done:
        emitted, _ = engine.step()
        for item, token in emitted:
            tokens[item].append(token)
        for item, entries in engine.logprobs.items():
            scores[item] += entries
    return [tokens[i] for i in items], [scores[i] for i in items]


def _assert_same_scored(got, want):
    got_tokens, got_scores = got
    want_tokens, want_scores = want
    assert got_tokens == want_tokens
    for i, (g_row, w_row) in enumerate(zip(got_scores, want_scores, strict=True)):
        assert len(g_row) == (len(want_tokens[i]) if i % 2 else 0)
        for g, w in zip(g_row, w_row, strict=True):
            # The same model on the same inputs, in a fixed-shape batch: equal up to float32 summation order.
            assert g.token == w.token and g.logprob == pytest.approx(w.logprob, abs=1e-5)
            assert [t for t, _ in g.top] == [t for t, _ in w.top]
            assert [v for _, v in g.top] == pytest.approx([v for _, v in w.top], abs=1e-5)


@pytest.mark.parametrize("setting", SETTINGS)
def test_torch_static_step_with_logprobs_gives_the_dynamic_steps_tokens_and_logprobs(adapter_dir, options, setting):
    from softtool.runtime import load_generator

    generator = load_generator(str(adapter_dir), "torch")
    want = _decode_scored(generator, options[setting], "dynamic")
    _assert_same_scored(_decode_scored(generator, options[setting], "static"), want)


@pytest.mark.parametrize("form", ["traced", "gqa"])
@pytest.mark.parametrize("setting", ["greedy", "penalties"])
def test_onnx_static_step_with_logprobs_gives_the_dynamic_steps_tokens_and_logprobs(exports, options, form, setting):
    from softtool.runtime import load_generator

    generator = load_generator(str(exports[form]), "onnx")
    want = _decode_scored(generator, options[setting], "dynamic")
    _assert_same_scored(_decode_scored(generator, options[setting], "static"), want)


def test_admission_held_for_several_free_slots_gives_the_same_tokens_in_fewer_prefills(adapter_dir, options):
    from softtool.runtime import load_generator

    generator = load_generator(str(adapter_dir), "torch")
    rows = _rows(generator)
    calls = []
    prefill = generator.prefill
    generator.prefill = lambda slots, *a, **kw: calls.append(len(slots)) or prefill(slots, *a, **kw)
    at_once = generator.generate(rows, None, options["greedy"], EngineOptions(slots=4))
    singles = len(calls)
    calls.clear()
    held = generator.generate(rows, None, options["greedy"], EngineOptions(slots=4, admit_min=3))
    assert held == at_once
    assert len(calls) < singles and sum(calls) == len(rows)


def test_static_buffers_are_kept_and_shared_across_generate_calls(adapter_dir, options):
    from softtool.runtime import load_generator

    generator = load_generator(str(adapter_dir), "torch")
    rows = _rows(generator)
    generator.generate(rows, None, options["greedy"], EngineOptions(slots=4, step="static"))
    kept = dict(generator._static)
    assert len(kept) == 1 and next(iter(kept))[1] % 128 == 0
    st = next(iter(kept.values()))
    # Fewer rows, fewer new tokens: the same buffers (same addresses, which captured graphs rely on).
    generator.generate(
        rows[:2], None, SearchOptions(max_new_tokens=1, eos_token_ids=[2]), EngineOptions(slots=4, step="static")
    )
    assert generator._static == kept and generator.kv[0].data_ptr() == st.kv[0].data_ptr()
    # A row longer than the kept capacity gets buffers of its own; the old ones stay for their graphs.
    generator.generate([[list(range(5, 5 + 200))]], None, options["greedy"], EngineOptions(slots=4, step="static"))
    assert len(generator._static) == 2 and st in generator._static.values()


def test_the_step_advances_tokens_and_positions_in_its_own_buffers(adapter_dir, options):
    from softtool.runtime import load_generator

    generator = load_generator(str(adapter_dir), "torch")
    rows = generator.row_ids(_rows(generator)[:3], [0, 0, 0])
    engine = Engine(generator, options["greedy"], 4, 64, engine=EngineOptions(slots=4, step="static"))
    for row in rows:
        engine.submit(row)
    emitted, _ = engine.step()  # admits (prefill: each row's first token) and decodes one step
    st = engine.fixed
    busy = [0, 1, 2]
    # The device buffers hold what the host engine believes: each row's next token and position.
    assert st.tokens[busy, 0].tolist() == engine.tokens[busy].tolist()
    assert st.positions[busy, 0].tolist() == [len(r) + 1 for r in rows] == engine.positions[busy].tolist()
    assert st.positions[3, 0] == st.scratch  # the idle slot stays at the scratch column
    assert [t for _, t in emitted][-3:] == engine.tokens[busy].tolist()


def test_a_new_prompt_reaches_the_static_step(adapter_dir, options):
    from softtool.runtime import load_generator

    generator = load_generator(str(adapter_dir), "torch")
    rows = _rows(generator)
    generator.generate(rows, None, options["greedy"], EngineOptions(slots=4, step="static"))
    generator.set_prompt(torch.randn(4, 64) * 0.5)
    dynamic = generator.generate(rows, None, options["greedy"], EngineOptions(slots=4, step="dynamic"))
    assert generator.generate(rows, None, options["greedy"], EngineOptions(slots=4, step="static")) == dynamic


def test_gqa_export_records_its_form_and_verifies(exports):
    from softtool.export_meta import ExportMeta

    meta = ExportMeta.read(exports["gqa"])
    assert meta.kv_layout == "gqa" and meta.format == 3
    assert meta.inputs[:3] == ("input_ids", "position_ids", "total_sequence_length")
    assert meta.verification["passed"] and meta.verification["max_abs_logit_diff"] < 1e-4
    assert ExportMeta.read(exports["traced"]).kv_layout == "slots"


def test_auto_form_writes_the_traced_graph_for_the_cpu(tmp_path, adapter_dir):
    from softtool.export.onnx import ExportOptions, export_adapters

    meta = export_adapters([str(adapter_dir)], tmp_path / "auto", ExportOptions(verify=False))
    assert meta.kv_layout == "slots"


def test_gqa_form_refuses_a_model_it_does_not_cover(tmp_path, tiny_model_dir, capsys):
    adapter = save_tiny_adapter(tmp_path / "a", tiny_model_dir, torch.randn(4, 32))
    result = run_cli(["export", str(adapter), "-o", str(tmp_path / "out"), "--form", "gqa"], capsys)
    assert result.code == 2
    assert "head size 8 (GroupQueryAttention takes multiples of 16)" in result.err
    assert not (tmp_path / "out").exists()


def test_a_format_2_export_still_runs(tmp_path, exports, adapter_dir, options):
    from softtool.export_meta import ExportMeta
    from softtool.runtime import load_generator

    old = format_2_copy(exports["traced"], tmp_path / "old")
    generator = load_generator(str(old), "onnx")
    assert not generator.can_score_prompt
    reference = load_generator(str(adapter_dir), "torch")
    rows = _rows(reference)[:4]
    greedy = options["greedy"]
    assert generator.generate(rows, None, greedy) == reference.generate(rows, None, greedy)
    record = json.loads((old / ExportMeta.FILE).read_text())
    record["format"] = 1
    (old / ExportMeta.FILE).write_text(json.dumps(record))
    with pytest.raises(Exception, match="export format 1"):
        ExportMeta.read(old)


def test_gqa_prefill_pads_on_the_right_with_its_last_token_at_the_largest_position(exports):
    from softtool.runtime import load_generator

    # Without the shared prefix: the whole rows, prompt and text, as one first prompt.
    generator = load_generator(str(exports["gqa"]), "onnx", precompute_prompt=False)
    assert generator.right_padded_prefill and not generator.shares_prefix
    rows = generator.row_ids(_rows(generator)[:3], [0, 0, 0])
    generator.reserve(3, 128)
    together = generator.prefill([0, 1, 2], rows, [0, 0, 0])[0]
    alone = np.concatenate([generator.prefill([i], [row], [0])[0] for i, row in enumerate(rows)])
    np.testing.assert_allclose(together, alone, atol=1e-4)


@pytest.mark.parametrize("source", ["torch", "traced", "gqa"])
def test_beam_search_on_the_static_step_gives_the_dynamic_steps_beams(
    adapter_dir, exports, options, source, monkeypatch
):
    """Beam rows live in the static engine's slots: each reorder is an index copy on the device before the step
    (counted here), the search's tokens are written into the step's buffer, and every beam comes out as on the
    dynamic step, token for token."""
    from dataclasses import replace

    from softtool.runtime import load_generator, static_step

    path, backend = (adapter_dir, "torch") if source == "torch" else (exports[source], "onnx")
    generator = load_generator(str(path), backend)
    rows = _rows(generator)[:5]
    beams = replace(options["greedy"], num_beams=3, num_return_sequences=2)
    dynamic = generator.generate(rows, None, beams, EngineOptions(slots=8, step="dynamic"))
    steps, reorders = [], []
    device_head = generator._device_head
    monkeypatch.setattr(generator, "_device_head", lambda st, bucket: steps.append(bucket) or device_head(st, bucket))
    reorder_rows = static_step.reorder_rows
    monkeypatch.setattr(
        static_step, "reorder_rows", lambda st, bucket: reorders.append(bucket) or reorder_rows(st, bucket)
    )
    monkeypatch.setattr(generator, "step", lambda *a: pytest.fail("the dynamic step ran"))
    static = generator.generate(rows, None, beams, EngineOptions(slots=8, step="static"))
    assert static == dynamic
    assert reorders and set(steps) == {8, 4}  # 2 items x 3 beams: the 8-slot bucket; the last item alone: 4
    assert any(item[0] != item[1] for item in static)  # two different beams came back
