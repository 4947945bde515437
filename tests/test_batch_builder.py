"""The C++ batch builder lays rows out exactly like Template/assemble_ids, pads either side, and
rejects bad input with ValueError."""

from __future__ import annotations

import numpy as np
import pytest

from softtool import search
from softtool.prompts.template import Template, assemble_ids

V = 100


def _rows(rng: np.random.Generator, batch: int, slots: int) -> list[list[np.ndarray]]:
    return [[rng.integers(0, V, size=rng.integers(0, 6)) for _ in range(slots)] for _ in range(batch)]


@pytest.mark.parametrize(
    "template",
    ["[P:4]Translate: {source}", "[P:3] Context: {context} [P:2] Question: {question} Answer:", "{x}[P:2]"],
)
@pytest.mark.parametrize("side", ["left", "right"])
def test_rows_equal_assemble_ids_with_mixed_tasks(template, side):
    t = Template.parse(template)
    rng = np.random.default_rng(0)
    slots = sum(1 for kind, _ in t.layout if kind == "text")
    rows = _rows(rng, 5, slots)
    tasks = [0, 2, 1, 0, 3]
    opts = search.BatchOptions(vocab_size=V, num_virtual_tokens=t.num_virtual_tokens, padding_side=side, pad_id=7)
    batch = search.build_batch(rows, tasks, t.layout, opts)
    width = batch.input_ids.shape[1]
    for i, (row, task) in enumerate(zip(rows, tasks, strict=True)):
        expected = assemble_ids(t, [list(p) for p in row], V, task)
        n = len(expected)
        assert batch.lengths[i] == n
        real = slice(width - n, width) if side == "left" else slice(0, n)
        pad = slice(0, width - n) if side == "left" else slice(n, width)
        assert batch.input_ids[i, real].tolist() == expected
        assert (batch.input_ids[i, pad] == 7).all()
        assert batch.attention_mask[i, real].tolist() == [1] * n
        assert (batch.attention_mask[i, pad] == 0).all()
        assert batch.position_ids[i, real].tolist() == list(range(n))
        assert (batch.position_ids[i, pad] == 1).all()


def test_position_ids_match_transformers_generate_convention():
    rows = [[np.array([1, 2, 3])], [np.array([4])]]
    batch = search.build_batch(rows, 0, [("text", 0)], search.BatchOptions(vocab_size=V))
    mask = batch.attention_mask
    expected = np.cumsum(mask, axis=1) - 1
    expected[mask == 0] = 1
    np.testing.assert_array_equal(batch.position_ids, expected)


def test_arrays_are_int64_and_dict_readable():
    batch = search.build_batch([[[1, 2]]], [0], [("virtual", 2), ("text", 0)], search.BatchOptions(V, 2))
    assert batch["input_ids"].dtype == np.int64
    assert batch["input_ids"].tolist() == [[V, V + 1, 1, 2]]
    assert set(batch.as_dict()) == {"input_ids", "attention_mask", "position_ids", "lengths"}


@pytest.mark.parametrize(
    ("rows", "tasks", "layout", "n", "message"),
    [
        ([[[1]]], [-1], [("text", 0)], 0, "task id"),
        ([[[V]]], [0], [("text", 0)], 0, "outside"),
        ([[[-3]]], [0], [("text", 0)], 0, "outside"),
        ([[[1]]], [0], [("text", 1)], 0, "slot"),
        ([[[1]]], [0], [("virtual", 3), ("text", 0)], 2, "virtual tokens"),
        ([[[1]], [[2]]], [0], [("text", 0)], 0, "task ids"),
        ([[[1]]], [0], [("bogus", 0)], 0, "kind"),
    ],
)
def test_bad_input_raises_value_error(rows, tasks, layout, n, message):
    with pytest.raises(ValueError, match=message):
        search.build_batch(rows, tasks, layout, search.BatchOptions(vocab_size=V, num_virtual_tokens=n))


def test_task_id_beyond_num_tasks_is_rejected():
    opts = search.BatchOptions(vocab_size=V, num_virtual_tokens=1, num_tasks=2)
    with pytest.raises(ValueError, match="valid ids are 0..1"):
        search.build_batch([[[1]]], [2], [("virtual", 1), ("text", 0)], opts)


def test_bad_padding_side_is_rejected():
    with pytest.raises(ValueError, match="padding_side"):
        search.BatchOptions(vocab_size=V, padding_side="middle")
