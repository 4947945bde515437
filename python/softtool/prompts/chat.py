"""A discrete prompt or a soft prompt's template as the user turn of the tokenizer's chat template.

An instruct model is prompted through its chat template by its makers; `softtool eval --baseline` scores the
instruction that way, and a task trained with --chat-template wraps its input the same way for training and
inference (the template recorded in the adapter is the wrapped one).
"""

from __future__ import annotations

from softtool.prompts.template import Template


def chat_template(tokenizer, template: Template) -> Template | None:
    """`template` (a discrete prompt) as the user turn of the tokenizer's chat template, ending where the
    assistant's reply starts; None when the tokenizer has no chat template (a base model)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    if template.num_virtual_tokens and template.is_prefix:
        # A prompt-tuning prompt stays in front, so its keys and values are still shared by every row.
        rest = Template(template.segments[1:])
        return Template.parse(f"[P:{template.num_virtual_tokens}]" + str(chat_template(tokenizer, rest)))
    # The fields go through the chat template as markers (the template's own braces could clash with them).
    fields = template.fields
    content = str(template).format(**{f: f"\x00{i}\x00" for i, f in enumerate(fields)})
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    text = text.replace("{", "{{").replace("}", "}}")
    for i, f in enumerate(fields):
        text = text.replace(f"\x00{i}\x00", "{" + f + "}")
    return Template.parse(text)
