"""Encoding with the real SmolLM2 tokenizer: pieces tokenized separately, whole targets, truncation."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softtool.data import Example, encode_example, get_task, load_split
from softtool.errors import SofttoolError
from softtool.prompts.template import Template, assemble_ids

PTUNING = Template.parse("[P:4] Context: {context} [P:4] Question: {question} Answer:")
LONG_CONTEXT = " ".join(f"Sentence {i} says that the Broncos played well in game {i}." for i in range(80))


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def squad_example(context="Denver Broncos won Super Bowl 50.", question="Who won?"):
    return Example("q1", {"context": context, "question": question}, ["Denver Broncos", "Broncos"])


def total_length(template, enc):
    return template.num_virtual_tokens + enc.input_length + len(enc.target_ids)


def test_short_example_is_tokenized_piece_by_piece_with_target_and_eos(smollm2_tokenizer):
    task = get_task("squad")
    template = task.default_template(8)
    enc = encode_example(smollm2_tokenizer, template, task, squad_example(), max_length=512)
    assert not enc.truncated
    assert enc.pieces == [
        ids(smollm2_tokenizer, "Context: Denver Broncos won Super Bowl 50.\nQuestion: Who won?\nAnswer:")
    ]
    assert smollm2_tokenizer.eos_token_id == 2
    assert enc.target_ids == ids(smollm2_tokenizer, " Denver Broncos") + [2]


def test_ptuning_template_gives_one_piece_per_text_slot(smollm2_tokenizer):
    task = get_task("squad")
    enc = encode_example(smollm2_tokenizer, PTUNING, task, squad_example(), max_length=512, with_target=False)
    assert enc.pieces == [
        ids(smollm2_tokenizer, "Context: Denver Broncos won Super Bowl 50."),
        ids(smollm2_tokenizer, "Question: Who won? Answer:"),
    ]
    assert enc.target_ids == []
    row = assemble_ids(PTUNING, enc.pieces, vocab_size=49152)
    assert len(row) == 8 + enc.input_length and row[:4] == [49152, 49153, 49154, 49155]


def test_truncation_cuts_only_the_long_field_from_its_end_and_keeps_the_target(smollm2_tokenizer):
    task = get_task("squad")
    example = squad_example(context=LONG_CONTEXT)
    full = encode_example(smollm2_tokenizer, PTUNING, task, example, max_length=4096)
    enc = encode_example(smollm2_tokenizer, PTUNING, task, example, max_length=96)
    assert not full.truncated and enc.truncated
    assert 96 - 4 <= total_length(PTUNING, enc) <= 96  # cut to fit, not far below the budget
    assert enc.target_ids == full.target_ids
    assert enc.pieces[1] == full.pieces[1]  # the question piece is untouched
    kept = smollm2_tokenizer.decode(enc.pieces[0]).removeprefix("Context: ")
    assert len(kept) > 50 and LONG_CONTEXT.startswith(kept)


def test_without_target_only_virtual_tokens_and_input_count(smollm2_tokenizer):
    task = get_task("squad")
    example = squad_example(context=LONG_CONTEXT)
    enc = encode_example(smollm2_tokenizer, PTUNING, task, example, max_length=80, with_target=False)
    assert enc.target_ids == [] and enc.truncated
    assert 80 - 4 <= total_length(PTUNING, enc) <= 80


def test_input_that_cannot_fit_even_with_an_empty_field_is_a_user_error(smollm2_tokenizer):
    task = get_task("squad")
    with pytest.raises(SofttoolError, match=r"example q1: even with an empty context .* over --max-length 20"):
        encode_example(smollm2_tokenizer, task.default_template(16), task, squad_example(LONG_CONTEXT), max_length=20)


def test_template_without_the_truncated_field_is_a_user_error_when_too_long(smollm2_tokenizer):
    task = get_task("squad")
    template = Template.parse("[P:2] Question: {question} Answer:")
    example = squad_example(question="Why? " * 100)
    with pytest.raises(SofttoolError, match=r"has no \{context\} field to shorten; raise --max-length"):
        encode_example(smollm2_tokenizer, template, task, example, max_length=64)


def test_cut_inside_a_multibyte_character_leaves_no_replacement_character(smollm2_tokenizer):
    task = get_task("translation")
    source = "Größe – 東京タワーの高さは333メートルです 🚀🚀 " * 8
    example = Example("s", {"source": source}, ["x"])
    template = task.default_template(4)
    for max_length in range(24, 60):
        enc = encode_example(smollm2_tokenizer, template, task, example, max_length=max_length)
        text = smollm2_tokenizer.decode(enc.pieces[0])
        assert "\ufffd" not in text and total_length(template, enc) <= max_length


@pytest.mark.data
def test_real_cnndm_dev_fits_512_tokens_with_whole_targets(shared_data, smollm2_tokenizer):
    task = get_task("cnndm")
    template = task.default_template(20)
    truncated = 0
    for example in load_split(shared_data / "cnn_dailymail", "dev", task=task).examples:
        enc = encode_example(smollm2_tokenizer, template, task, example, max_length=512)
        assert total_length(template, enc) <= 512
        assert smollm2_tokenizer.decode(enc.target_ids[:-1]) == " " + example.target
        truncated += enc.truncated
    assert 0 < truncated < 100  # CNN/DM articles average ~640 words: most, not all, are cut


@functools.lru_cache(maxsize=1)
def squad_dev(folder):
    return load_split(folder, "dev", task=get_task("squad"), limit=300).examples


@pytest.mark.data
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 299), max_length=st.integers(30, 260), virtual=st.sampled_from([1, 8, 20]))
def test_truncation_respects_max_length_and_never_touches_the_target(
    smollm2_tokenizer, shared_data, index, max_length, virtual
):
    task = get_task("squad")
    example = squad_dev(shared_data / "squad")[index]
    template = task.default_template(virtual)
    question = example.fields["question"]
    target_ids = ids(smollm2_tokenizer, " " + example.target) + [2]
    fixed = virtual + len(ids(smollm2_tokenizer, f"Context: \nQuestion: {question}\nAnswer:")) + len(target_ids)
    if fixed > max_length:
        with pytest.raises(SofttoolError, match="even with an empty context"):
            encode_example(smollm2_tokenizer, template, task, example, max_length=max_length)
        return
    enc = encode_example(smollm2_tokenizer, template, task, example, max_length=max_length)
    assert total_length(template, enc) <= max_length
    assert enc.target_ids == target_ids
    text = smollm2_tokenizer.decode(enc.pieces[0])
    assert text.endswith(f"\nQuestion: {question}\nAnswer:")
    assert enc.truncated == (text != f"Context: {example.fields['context']}\nQuestion: {question}\nAnswer:")
