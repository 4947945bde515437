"""The C++ option structs (softtool._core.SearchOptions / BatchOptions) and the Python dataclasses in
softtool.search agree field by field: the same names in the same order, the same defaults, and the same
verdict (accepted or rejected) on every value, bad and good, including the cross-field rules."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from softtool import _core, search

PAIRS = [(search.SearchOptions, _core.SearchOptions), (search.BatchOptions, _core.BatchOptions)]


def _core_fields(core_type: type) -> list[str]:
    return [name for name, value in vars(core_type).items() if isinstance(value, property)]


@pytest.mark.parametrize(("py_type", "core_type"), PAIRS, ids=lambda t: t.__name__)
def test_same_field_names_in_the_same_order(py_type, core_type):
    assert [f.name for f in dataclasses.fields(py_type)] == _core_fields(core_type)


def _py_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@pytest.mark.parametrize(("py_type", "core_type"), PAIRS, ids=lambda t: t.__name__)
def test_same_defaults(py_type, core_type):
    core = core_type()
    for f in dataclasses.fields(py_type):
        want = _py_default(f)
        if want is dataclasses.MISSING:
            # Required in Python (BatchOptions.vocab_size); the core's placeholder must not validate.
            assert f.name == "vocab_size"
            with pytest.raises(ValueError, match=f.name):
                core.validate()
            continue
        got = getattr(core, f.name)  # early_stopping reads back through the binding's conversion
        assert got == want and type(got) is type(want), f.name


def _verdict(make) -> str:
    try:
        make()
    except (ValueError, TypeError):
        return "rejected"
    return "accepted"


def _core_with(core_type: type, values: dict):
    core = core_type()
    for name, value in values.items():
        setattr(core, name, value)
    core.validate()
    return core


NAN, INF = math.nan, math.inf

# (overrides, expected verdict). Every field has at least one bad value.
SEARCH_CASES = [
    (dict(max_new_tokens=-1), "rejected"),
    (dict(max_new_tokens=1.5), "rejected"),
    (dict(max_new_tokens="3"), "rejected"),
    (dict(max_new_tokens=0), "accepted"),
    (dict(min_new_tokens=-1), "rejected"),
    (dict(min_new_tokens=100, max_new_tokens=2), "accepted"),
    (dict(eos_token_ids=[-1]), "rejected"),
    (dict(eos_token_ids=[1.5]), "rejected"),
    (dict(eos_token_ids=["2"]), "rejected"),
    (dict(eos_token_ids="2"), "rejected"),
    (dict(eos_token_ids=None), "rejected"),
    (dict(eos_token_ids=2.0), "rejected"),
    (dict(eos_token_ids=-3), "rejected"),
    (dict(eos_token_ids=3), "accepted"),
    (dict(eos_token_ids=[2, 5]), "accepted"),
    (dict(eos_token_ids=(2,)), "accepted"),
    (dict(eos_token_ids=np.array([2, 5])), "accepted"),
    (dict(eos_token_ids=[np.int64(4)]), "accepted"),
    (dict(eos_token_ids=np.int64(4)), "accepted"),
    (dict(eos_token_ids=torch.tensor([2, 5])), "accepted"),
    (dict(eos_token_ids=[2**70]), "rejected"),
    (dict(pad_token_id=-1), "rejected"),
    (dict(pad_token_id=None), "rejected"),
    (dict(num_beams=0), "rejected"),
    (dict(num_beams=-2), "rejected"),
    (dict(num_beams=4), "accepted"),
    (dict(length_penalty=NAN), "rejected"),
    (dict(length_penalty=INF), "rejected"),
    (dict(length_penalty=-2.0), "accepted"),
    (dict(early_stopping="sometimes"), "rejected"),
    (dict(early_stopping="True"), "rejected"),
    (dict(early_stopping=1), "rejected"),
    (dict(early_stopping=None), "rejected"),
    (dict(early_stopping=True), "accepted"),
    (dict(early_stopping="never"), "accepted"),
    (dict(repetition_penalty=0.0), "rejected"),
    (dict(repetition_penalty=-1.0), "rejected"),
    (dict(repetition_penalty=NAN), "rejected"),
    (dict(repetition_penalty=INF), "rejected"),
    (dict(repetition_penalty=0.5), "accepted"),
    (dict(no_repeat_ngram_size=-1), "rejected"),
    (dict(no_repeat_ngram_size=3), "accepted"),
    (dict(num_return_sequences=0), "rejected"),
    (dict(num_return_sequences=2), "rejected"),  # greedy returns one sequence
    (dict(num_return_sequences=2, do_sample=True), "accepted"),
    (dict(num_return_sequences=3, num_beams=2), "rejected"),
    (dict(num_return_sequences=2, num_beams=2), "accepted"),
    (dict(do_sample=True, num_beams=2), "rejected"),
    (dict(do_sample="yes"), "rejected"),
    (dict(do_sample=True), "accepted"),
    (dict(temperature=0.0), "rejected"),
    (dict(temperature=-1.0), "rejected"),
    (dict(temperature=NAN), "rejected"),
    (dict(temperature=INF), "rejected"),
    (dict(temperature=0.3), "accepted"),
    (dict(top_k=-1), "rejected"),
    (dict(top_k=5), "accepted"),
    (dict(top_p=0.0), "rejected"),
    (dict(top_p=1.5), "rejected"),
    (dict(top_p=-0.1), "rejected"),
    (dict(top_p=NAN), "rejected"),
    (dict(top_p=1.0), "accepted"),
    (dict(top_p=0.01), "accepted"),
    (dict(seed=-1), "rejected"),
    (dict(seed=2**64), "rejected"),
    (dict(seed=1.5), "rejected"),
    (dict(seed=2**64 - 1), "accepted"),
    (dict(num_threads=-1), "rejected"),
    (dict(num_threads=0), "accepted"),
    (dict(choices=[[5]], eos_token_ids=[2]), "accepted"),
    (dict(choices=[[5, 6], [5], (7,)], eos_token_ids=[2]), "accepted"),  # a choice may be a prefix of another
    (dict(choices=np.array([[5, 6], [7, 8]]), eos_token_ids=[2]), "accepted"),
    (dict(choices=[torch.tensor([5, 6]), [np.int64(7)]], eos_token_ids=[2]), "accepted"),
    (dict(choices=[[5] * 63], eos_token_ids=[2]), "accepted"),  # max_new_tokens 64 leaves room for the EOS
    (dict(choices=[[5] * 64], eos_token_ids=[2]), "rejected"),  # ... and here it does not
    (dict(choices=[[5, 6]], eos_token_ids=[2], max_new_tokens=2), "rejected"),
    (dict(choices=[[5]]), "rejected"),  # no EOS id to end it
    (dict(choices=[[]], eos_token_ids=[2]), "rejected"),
    (dict(choices=[[5], [6], [5]], eos_token_ids=[2]), "rejected"),
    (dict(choices=[[-5]], eos_token_ids=[2]), "rejected"),
    (dict(choices=[[5, 2]], eos_token_ids=[2]), "rejected"),  # the EOS would end it early
    (dict(choices=[[5]], eos_token_ids=[2], num_beams=2), "rejected"),
    (dict(choices=[[5]], eos_token_ids=[2], do_sample=True), "accepted"),
    (dict(choices=[5, 6], eos_token_ids=[2]), "rejected"),  # flat: not read as one-token choices
    (dict(choices=[[1.5]], eos_token_ids=[2]), "rejected"),
    (dict(choices=[["5"]], eos_token_ids=[2]), "rejected"),
    (dict(choices=["ab"], eos_token_ids=[2]), "rejected"),
    (dict(choices=[[2**70]], eos_token_ids=[2]), "rejected"),
    (dict(choices=[torch.tensor(5)], eos_token_ids=[2]), "rejected"),
    (dict(choices=None), "rejected"),
]

BATCH_CASES = [
    (dict(vocab_size=0), "rejected"),
    (dict(vocab_size=-5), "rejected"),
    (dict(vocab_size=1.5), "rejected"),
    (dict(vocab_size=10), "accepted"),
    (dict(vocab_size=10, num_virtual_tokens=-1), "rejected"),
    (dict(vocab_size=10, num_virtual_tokens=20), "accepted"),
    (dict(vocab_size=10, padding_side="middle"), "rejected"),
    (dict(vocab_size=10, padding_side=None), "rejected"),
    (dict(vocab_size=10, padding_side="right"), "accepted"),
    (dict(vocab_size=10, pad_id=-1), "rejected"),
    (dict(vocab_size=10, pad_id=3), "accepted"),
    (dict(vocab_size=10, num_tasks=-1), "rejected"),
    (dict(vocab_size=10, num_tasks=4), "accepted"),
]


def _case_id(case):
    return ",".join(f"{k}={v!r}" for k, v in case[0].items())


@pytest.mark.parametrize(("py_type", "core_type", "cases"), [(*PAIRS[0], SEARCH_CASES), (*PAIRS[1], BATCH_CASES)])
def test_every_field_has_a_rejected_value(py_type, core_type, cases):
    rejected = {name for values, verdict in cases if verdict == "rejected" for name in values}
    assert rejected >= {f.name for f in dataclasses.fields(py_type)}


@pytest.mark.parametrize("case", SEARCH_CASES, ids=_case_id)
def test_search_options_validate_alike(case):
    values, verdict = case
    assert _verdict(lambda: search.SearchOptions(**values)) == verdict
    assert _verdict(lambda: _core_with(_core.SearchOptions, values)) == verdict


@pytest.mark.parametrize("case", BATCH_CASES, ids=_case_id)
def test_batch_options_validate_alike(case):
    values, verdict = case
    assert _verdict(lambda: search.BatchOptions(**values)) == verdict
    assert _verdict(lambda: _core_with(_core.BatchOptions, values)) == verdict


@pytest.mark.parametrize(("py_type", "core_type", "cases"), [(*PAIRS[0], SEARCH_CASES), (*PAIRS[1], BATCH_CASES)])
def test_accepted_values_convert_to_the_same_core_struct(py_type, core_type, cases):
    for values, verdict in cases:
        if verdict != "accepted":
            continue
        converted = py_type(**values).to_core()
        direct = _core_with(core_type, values)
        for name in _core_fields(core_type):
            assert getattr(converted, name) == getattr(direct, name), (values, name)


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        search.SearchOptions(top_p=1.5)
    with pytest.raises(ValueError, match="num_return_sequences"):
        search.SearchOptions(num_beams=2, num_return_sequences=3)
    with pytest.raises(TypeError, match="eos_token_ids"):
        search.SearchOptions(eos_token_ids=[1.5])
    with pytest.raises(ValueError, match=r"choices\[0\] and choices\[2\] are the same sequence"):
        search.SearchOptions(choices=[[5], [6], [5]], eos_token_ids=[2])
    with pytest.raises(TypeError, match="choices"):
        search.SearchOptions(choices=[5, 6], eos_token_ids=[2])
    with pytest.raises(ValueError, match="pad_id"):
        search.BatchOptions(vocab_size=10, pad_id=-1)


def test_choices_come_back_as_plain_lists():
    opts = search.SearchOptions(choices=(np.array([5, 6]), torch.tensor([7])), eos_token_ids=[2])
    assert opts.choices == [[5, 6], [7]] and all(type(t) is int for c in opts.choices for t in c)
    assert opts.to_core().choices == [[5, 6], [7]]


def test_choices_are_not_a_command_line_flag():
    meta = {f.name: f.metadata for f in dataclasses.fields(search.SearchOptions)}["choices"]
    assert meta["cli"] is False and meta["help"]
