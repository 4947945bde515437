"""Templates: where the virtual tokens go in the model input.

A template is text with virtual-token blocks `[P:N]` and `{field}` placeholders, e.g.

    [P:8] Context: {context} [P:4] Question: {question} Answer:

Prompt tuning (Lester et al. 2021) puts every virtual token before the input (`[P:20]{source}`);
P-tuning (Liu et al. 2021) allows blocks anywhere, with anchor text between them.

Virtual tokens are numbered across blocks (0..N-1 in reading order). In token-id form, virtual
token j of task t is the id `V + t*N + j` (V the vocabulary size), the prompt-table convention
TensorRT-LLM uses: one batch can mix tasks, and an exported graph reads row `t*N + j` of its prompt
table for such ids. The C++ batch builder implements the same layout as `assemble_ids` below.

Whitespace directly around a `[P:N]` marker is dropped: it has no meaning next to an embedding, and
keeping it would make tokenization depend on how the user spaced the template.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from softtool.errors import SofttoolError

_MARKER = re.compile(r"\[P:(\d+)\]")


@dataclass(frozen=True)
class Segment:
    """One part of a template: a block of `size` virtual tokens, or a text piece to format."""

    kind: str  # "virtual" or "text"
    size: int = 0  # virtual tokens in the block (kind == "virtual")
    text: str = ""  # format string with {field} placeholders (kind == "text")


@dataclass(frozen=True)
class Template:
    segments: tuple[Segment, ...]

    @classmethod
    def parse(cls, source: str) -> Template:
        """Parse `[P:N]` blocks and text pieces; raises SofttoolError on a malformed template."""
        segments: list[Segment] = []
        pos = 0
        for match in _MARKER.finditer(source):
            cls._add_text(segments, source[pos : match.start()])
            size = int(match.group(1))
            if size <= 0:
                raise SofttoolError(f"template {source!r}: a virtual block needs at least one token, got [P:{size}]")
            segments.append(Segment("virtual", size=size))
            pos = match.end()
        cls._add_text(segments, source[pos:])
        if "[P:" in "".join(s.text for s in segments):
            raise SofttoolError(f"template {source!r}: malformed virtual block; write [P:N] with N a positive integer")
        for seg in segments:
            if seg.kind == "text":
                try:
                    list(string.Formatter().parse(seg.text))
                except ValueError as exc:
                    raise SofttoolError(f"template {source!r}: {exc}") from exc
        return cls(tuple(segments))

    @staticmethod
    def _add_text(segments: list[Segment], text: str) -> None:
        # Strip whitespace that touches a marker (or the template's ends); keep inner spacing.
        text = text.strip(" ")
        if text:
            segments.append(Segment("text", text=text))

    @classmethod
    def prefix(cls, num_virtual_tokens: int, text: str) -> Template:
        """The prompt-tuning layout: N virtual tokens, then the task's input text."""
        return cls.parse(f"[P:{num_virtual_tokens}]{text}")

    def __str__(self) -> str:
        return "".join(f"[P:{s.size}]" if s.kind == "virtual" else s.text for s in self.segments)

    def text_only(self) -> str:
        """The template's text without its virtual blocks: the input a discrete prompt reads. Pieces are joined as
        written, with a space where neither side had whitespace (`{a}[P:4]{b}` -> `{a} {b}`)."""
        out = ""
        for seg in self.segments:
            if seg.kind != "text":
                continue
            if out and not (out[-1].isspace() or seg.text[0].isspace()):
                out += " "
            out += seg.text
        return out

    @property
    def num_virtual_tokens(self) -> int:
        return sum(s.size for s in self.segments if s.kind == "virtual")

    @property
    def is_prefix(self) -> bool:
        """True when every virtual token precedes all text (one block, first): the shared-prefix case."""
        kinds = [s.kind for s in self.segments]
        return kinds.count("virtual") == 1 and kinds[0] == "virtual"

    @property
    def fields(self) -> list[str]:
        names: list[str] = []
        for seg in self.segments:
            if seg.kind == "text":
                names += [f for _, f, _, _ in string.Formatter().parse(seg.text) if f and f not in names]
        return names

    @property
    def layout(self) -> list[tuple[str, int]]:
        """The template as the C++ batch builder takes it: ("virtual", size) or ("text", slot)."""
        out: list[tuple[str, int]] = []
        slot = 0
        for seg in self.segments:
            if seg.kind == "virtual":
                out.append(("virtual", seg.size))
            else:
                out.append(("text", slot))
                slot += 1
        return out

    def render(self, fields: Mapping[str, str]) -> list[str]:
        """The text pieces, in order, with fields filled in (one string per text segment)."""
        missing = [f for f in self.fields if f not in fields]
        if missing:
            raise SofttoolError(f"template {self} needs field(s) {missing}; the example has {sorted(fields)}")
        return [seg.text.format(**fields) for seg in self.segments if seg.kind == "text"]


def virtual_token_id(vocab_size: int, num_virtual_tokens: int, task_id: int, index: int) -> int:
    """The id of virtual token `index` of task `task_id`: V + t*N + j."""
    return vocab_size + task_id * num_virtual_tokens + index


def assemble_ids(template: Template, pieces: Sequence[Sequence[int]], vocab_size: int, task_id: int = 0) -> list[int]:
    """One row's token ids: virtual ids where the template has blocks, the pieces' ids between.

    The reference for the C++ batch builder (which adds batching and padding).
    """
    n = template.num_virtual_tokens
    ids: list[int] = []
    j = 0
    for kind, value in template.layout:
        if kind == "virtual":
            ids += [virtual_token_id(vocab_size, n, task_id, j + k) for k in range(value)]
            j += value
        else:
            ids += list(pieces[value])
    return ids
