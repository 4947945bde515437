"""Token ids of one example under a template, cut to a length budget.

Each text piece of `template.render(fields)` is tokenized on its own (add_special_tokens=False), the
same way at training and inference, so both see identical ids around the virtual blocks. When the
input is too long only the task's long field (context, article, source) is shortened, from its end
and at a token boundary; the target and every other piece are always kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from softtool.data.example import Example
from softtool.data.tasks import Task
from softtool.errors import SofttoolError
from softtool.prompts.template import Template


@dataclass
class Encoded:
    """One example's ids: one list per text slot, the target (+ EOS), and whether the input was cut."""

    pieces: list[list[int]]
    target_ids: list[int] = field(default_factory=list)
    truncated: bool = False

    @property
    def input_length(self) -> int:
        """Text tokens of the input (virtual tokens not included)."""
        return sum(len(p) for p in self.pieces)


def _tokenize(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _tokenize_pieces(tokenizer, template: Template, fields: dict[str, str]) -> list[list[int]]:
    return [_tokenize(tokenizer, piece) for piece in template.render(fields)]


def encode_example(
    tokenizer,
    template: Template,
    task: Task,
    example: Example,
    max_length: int = 512,
    with_target: bool = True,
) -> Encoded:
    """The ids of `example`; virtual tokens + pieces + target fit in `max_length` (SofttoolError if impossible).

    For generation pass `with_target=False` and leave room for the output yourself, e.g.
    `max_length = context_length - task.max_target_tokens`.
    """
    target_ids: list[int] = []
    if with_target:
        if tokenizer.eos_token_id is None:
            raise SofttoolError("the tokenizer has no EOS token; training needs one to end the target")
        target_ids = _tokenize(tokenizer, task.target_text(example)) + [tokenizer.eos_token_id]
    budget = max_length - template.num_virtual_tokens - len(target_ids)
    pieces = _tokenize_pieces(tokenizer, template, example.fields)
    overflow = sum(len(p) for p in pieces) - budget
    if overflow <= 0:
        return Encoded(pieces, target_ids, truncated=False)

    name = task.truncate_field
    if name not in template.fields:
        raise SofttoolError(
            f"example {example.id}: input is {overflow} tokens over --max-length {max_length} and template "
            f"{str(template)!r} has no {{{name}}} field to shorten; raise --max-length or shorten the template"
        )
    pieces = shorten_field(tokenizer, template, example.fields, name, budget, overflow)
    if pieces is None:
        empty = _tokenize_pieces(tokenizer, template, {**example.fields, name: ""})
        fixed = template.num_virtual_tokens + sum(len(p) for p in empty) + len(target_ids)
        raise SofttoolError(
            f"example {example.id}: even with an empty {name} the input takes {fixed} tokens (virtual tokens, "
            f"template text, other fields and target), over --max-length {max_length}; raise --max-length"
        )
    return Encoded(pieces, target_ids, truncated=True)


def shorten_field(
    tokenizer,
    template: Template,
    fields: dict[str, str],
    name: str,
    budget: int,
    overflow: int,
    *,
    keep: str = "start",
) -> list[list[int]] | None:
    """The pieces of `template` with field `name` shortened (at a token boundary) until the text fits `budget`.

    `overflow` is how many tokens the uncut text is over. keep="start" cuts the field's end (the tasks' long
    fields: context, article, source); keep="end" cuts its start, so text to be continued keeps its last words.
    None when the text does not fit even with the field empty.
    """
    field_ids = _tokenize(tokenizer, fields[name])
    keep_count = len(field_ids)
    # Re-tokenizing the shortened text can merge tokens differently at the cut, so the exact length
    # is only known after rendering again; shrink by the remaining overflow until it fits.
    while overflow > 0:
        keep_count -= overflow
        if keep_count < 0:
            return None
        kept = field_ids[:keep_count] if keep == "start" else field_ids[len(field_ids) - keep_count :]
        text = tokenizer.decode(kept, clean_up_tokenization_spaces=False)
        # A cut inside a multi-byte character decodes to U+FFFD; drop that partial character.
        text = text.rstrip("\ufffd") if keep == "start" else text.lstrip("\ufffd")
        pieces = _tokenize_pieces(tokenizer, template, {**fields, name: text})
        overflow = sum(len(p) for p in pieces) - budget
    return pieces
