"""The prefill (softtool.runtime.slots): a task's shared prompt computed once and copied in on every backend and form,
the gqa form's text-only chunks included (export/gqa.py), and the bucketed prefill at fixed (rows, length) shapes,
which gives the exact prefill's tokens. Tiny lively Llama with 16-wide heads, two tasks, on the CPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import save_tiny_adapter
from softtool.runtime.decode import EngineOptions
from softtool.runtime.static_step import PREFILL_LENGTHS, prefill_length, prefill_shape
from softtool.search import SearchOptions

pytest.importorskip("softtool._core", reason="generation drives the compiled search core")

SOURCES = [
    "A man in a red jacket rides a bicycle.",
    "Two dogs play in the snow.",
    "Kids.",
    "The tower was finished in 1889 and is 330 metres tall.",
    "A cat sleeps on a warm windowsill in the afternoon sun.",
    "A woman reads.",
]
N = 4  # virtual tokens per task
OPTIONS = SearchOptions(max_new_tokens=10, eos_token_ids=[2], pad_token_id=2)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, gqa_model_dir):
    root = tmp_path_factory.mktemp("prefill-adapters")
    torch.manual_seed(1)
    return [save_tiny_adapter(root / name, gqa_model_dir, torch.randn(N, 64) * 0.5) for name in ("de", "fr")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, adapters):
    """Both tasks in one export, in the traced and the gqa form."""
    from softtool.export.onnx import ExportOptions, export_adapters

    out = tmp_path_factory.mktemp("prefill-exports")
    for form in ("traced", "gqa"):
        export_adapters([str(a) for a in adapters], out / form, ExportOptions(form=form, verify_steps=4))
    return {form: out / form for form in ("traced", "gqa")}


def _rows(generator):
    return [generator.encode({"source": s}) for s in SOURCES]


TASKS = [0, 1, 1, 0, 1, 0]


def test_prefill_lengths_round_up_to_a_bucket_within_the_cache():
    assert prefill_length(1, 1000) == PREFILL_LENGTHS[0]
    assert prefill_length(PREFILL_LENGTHS[1], 1000) == PREFILL_LENGTHS[1]
    assert prefill_length(PREFILL_LENGTHS[1] + 1, 1000) == PREFILL_LENGTHS[2]
    assert prefill_length(PREFILL_LENGTHS[-1] + 1, 10_000) == -(-(PREFILL_LENGTHS[-1] + 1) // 128) * 128
    assert prefill_length(20, 22) == 22 and prefill_length(30, 22) == 30  # the cache bounds it, never below the rows
    assert prefill_shape(3, 20, 16, 1000) == (4, prefill_length(20, 1000))
    assert prefill_shape(9, 20, 12, 1000)[0] == 12


def test_the_gqa_prefill_feeds_only_the_texts_positions(exports):
    """A shared prefix in the gqa form: the prompt's keys/values are computed once per task (one call of virtual ids),
    then each admitted row runs alone, its text only, at positions N.. after its task's prompt."""
    from softtool.runtime import load_generator

    generator = load_generator(str(exports["gqa"]), "onnx")
    assert generator.shares_prefix and generator.export_meta.prefix_chunks
    calls = []
    forward = generator._forward
    generator._forward = lambda ids, positions, kv: (
        calls.append((ids.clone(), positions.clone())) or forward(ids, positions, kv)
    )
    rows = _rows(generator)
    generator.generate(rows, TASKS, OPTIONS, EngineOptions(slots=4))
    virtual = [c for c in calls if (c[0] >= generator.vocab_size).any()]
    assert len(virtual) == 1 and virtual[0][0].shape == (2, N)  # both tasks' prompts, once
    prefills = [c for c in calls if c[0].shape[1] > 1 and not (c[0] >= generator.vocab_size).any()]
    assert len(prefills) == len(rows)  # one call per row
    texts = {tuple(sum(row, [])) for row in rows}
    for ids, positions in prefills:
        assert ids.shape[0] == 1
        length = int((positions[0] >= 0).sum())
        assert positions[0, :length].tolist() == list(range(N, N + length))
        assert tuple(ids[0, :length].tolist()) in texts


@pytest.mark.parametrize("step", ["static", "dynamic"])
def test_the_gqa_form_with_a_shared_prefix_gives_the_traced_forms_tokens(exports, step):
    """Mixed tasks in one batch: the gqa form's text-only prefill decodes what the traced form and the gqa form's
    whole-row prefill decode."""
    from softtool.runtime import load_generator

    traced = load_generator(str(exports["traced"]), "onnx")
    shared = load_generator(str(exports["gqa"]), "onnx")
    whole = load_generator(str(exports["gqa"]), "onnx", precompute_prompt=False)
    assert shared.shares_prefix and not whole.shares_prefix
    rows = _rows(traced)
    engine = EngineOptions(slots=4, step=step)
    want = traced.generate(rows, TASKS, OPTIONS, engine)
    assert shared.generate(rows, TASKS, OPTIONS, engine) == want
    assert whole.generate(rows, TASKS, OPTIONS, engine) == want
    assert len({tuple(r[0]) for r in want}) > 1


def test_mixed_tasks_in_a_gqa_prefill_read_their_own_prompts(exports):
    from softtool.runtime import load_generator

    generator = load_generator(str(exports["gqa"]), "onnx")
    rows = _rows(generator)
    mixed = generator.last_logits(rows, TASKS)
    alone = np.concatenate([generator.last_logits([r], [t]) for r, t in zip(rows, TASKS, strict=True)])
    np.testing.assert_allclose(mixed, alone, atol=1e-4, rtol=0)
    whole = load_generator(str(exports["gqa"]), "onnx", precompute_prompt=False)
    np.testing.assert_allclose(mixed, whole.last_logits(rows, TASKS), atol=1e-4, rtol=0)
    other = generator.last_logits(rows, [1 - t for t in TASKS])
    assert np.abs(other - mixed).max() > 1e-3  # each row read its own task's prompt


def test_an_earlier_gqa_export_is_prefilled_whole(tmp_path, exports):
    """A gqa export written before prefix_chunks counts no padding in seqlens_k: it runs prompt and text together."""
    from softtool.export_meta import ExportMeta
    from softtool.runtime import load_generator

    old = shutil.copytree(exports["gqa"], tmp_path / "old")
    record = json.loads((old / ExportMeta.FILE).read_text())
    del record["prefix_chunks"]
    (old / ExportMeta.FILE).write_text(json.dumps(record))
    generator = load_generator(str(old), "onnx")
    assert not generator.shares_prefix
    rows = _rows(generator)
    assert generator.generate(rows, TASKS, OPTIONS) == load_generator(str(exports["gqa"]), "onnx").generate(
        rows, TASKS, OPTIONS
    )


@pytest.mark.parametrize("source", ["torch", "traced", "gqa", "gqa-whole-rows"])
@pytest.mark.parametrize("step", ["static", "dynamic"])
def test_the_bucketed_prefill_gives_the_exact_prefills_tokens(adapters, exports, source, step):
    """Prefill at fixed (rows, length) shapes on kept buffers: the same tokens as prefill at the rows' own width.
    With the static engine's cache (capacity rounded up) every shape is a bucket's: rows a slot bucket, texts padded
    to a PREFILL_LENGTHS length; the dynamic engine's cache, as long as its longest row needs, may cut a length."""
    from softtool.runtime import load_generator

    if source == "torch":
        generator = load_generator(str(adapters[0]), "torch")
        generator.add_adapter(str(adapters[1]))
    elif source == "gqa-whole-rows":  # no shared prefix: rows together, right-padded, a first prompt
        generator = load_generator(str(exports["gqa"]), "onnx", precompute_prompt=False)
    else:
        generator = load_generator(str(exports[source]), "onnx")
    rows = _rows(generator)
    exact = generator.generate(rows, TASKS, OPTIONS, EngineOptions(slots=4, step=step))
    bucketed = generator.generate(rows, TASKS, OPTIONS, EngineOptions(slots=4, step=step, prefill="buckets"))
    assert bucketed == exact
    shapes = set(generator._prefill_shapes)
    assert shapes and all(rows in (1, 2, 4) for rows, _, _ in shapes)
    if step == "static":
        assert all(length in PREFILL_LENGTHS for _, length, _ in shapes)
    if source == "gqa":  # one row per chunk
        assert {rows for rows, _, _ in shapes} == {1}
    # The buffers are kept: a second call makes no new shapes.
    generator.generate(rows, TASKS, OPTIONS, EngineOptions(slots=4, step=step, prefill="buckets"))
    assert set(generator._prefill_shapes) == shapes
