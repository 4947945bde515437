"""The template decides where virtual tokens go; these tests pin its parsing and id layout."""

import pytest

from softtool.errors import SofttoolError
from softtool.prompts.template import Template, assemble_ids


def test_ptuning_template_splits_blocks_and_anchor_text():
    t = Template.parse("[P:8] Context: {context} [P:4] Question: {question} Answer:")
    assert t.num_virtual_tokens == 12
    assert t.layout == [("virtual", 8), ("text", 0), ("virtual", 4), ("text", 1)]
    assert t.render({"context": "c", "question": "q"}) == ["Context: c", "Question: q Answer:"]
    assert t.fields == ["context", "question"]
    assert not t.is_prefix


def test_prefix_template_is_prefix_and_round_trips():
    t = Template.prefix(20, "English: {source}\nGerman:")
    assert t.is_prefix and t.num_virtual_tokens == 20
    assert Template.parse(str(t)) == t


def test_virtual_ids_follow_task_offset_convention():
    t = Template.parse("[P:2]a[P:1]b")
    ids = assemble_ids(t, [[7, 8], [9]], vocab_size=100, task_id=3)
    # task 3 of a 3-token prompt starts at 100 + 3*3 = 109
    assert ids == [109, 110, 7, 8, 111, 9]


@pytest.mark.parametrize("bad", ["[P:0]{x}", "[P:x]{x}", "{x"])
def test_malformed_template_is_a_user_error(bad):
    with pytest.raises(SofttoolError):
        Template.parse(bad)


def test_render_names_missing_field():
    with pytest.raises(SofttoolError, match="question"):
        Template.parse("[P:1]{question}").render({"context": "c"})
