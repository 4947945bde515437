"""The inputs of `softtool generate`: TEXT arguments, a text file (one input per line), a JSONL file (one
object of template fields per line) or stdin, read one line at a time so that a large file never sits in
memory; every problem is a one-line error naming the line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from softtool.errors import SofttoolError


@dataclass
class Record:
    """One input: where it came from, the template's field values, and what the output line repeats."""

    line: int
    fields: dict[str, str]
    echo: dict[str, Any]  # the input's own fields (a JSONL object as given, or {field: text})


class Inputs:
    """Where the inputs come from; iterate it (more than once for a file) to get Records in order.

    `fixed` are the --field NAME=VALUE values; `fields` are the template's fields. A text line fills the
    one field `fixed` leaves open; a JSONL object may give any field, and --field fills the rest.
    """

    def __init__(self, texts: Sequence[str], path: str | None, fields: Sequence[str], fixed: dict[str, str]) -> None:
        if texts and path is not None:
            raise SofttoolError("give TEXT arguments or --input, not both")
        self.texts, self.path, self.fields, self.fixed = list(texts), path, list(fields), fixed
        self.jsonl = path is not None and path != "-" and path.lower().endswith(".jsonl")
        self.open_fields = [f for f in self.fields if f not in fixed]
        if not self.jsonl and len(self.open_fields) != 1:
            raise SofttoolError(
                f"the template's field(s) {self.open_fields} are open but a text input fills one; "
                "fill the others with --field NAME=VALUE, or give a .jsonl --input with one object per input"
            )

    @property
    def name(self) -> str:
        return "stdin" if self.path in (None, "-") else self.path

    @property
    def rereadable(self) -> bool:
        """True when the inputs can be read twice (arguments or a file, not stdin)."""
        return bool(self.texts) or self.path not in (None, "-")

    def __iter__(self) -> Iterator[Record]:
        if self.texts:
            for number, text in enumerate(self.texts, 1):
                yield self._text_record(number, text)
            return
        stream = _open(self.path)
        try:
            for number, text in _lines(stream, self.name):
                yield self._json_record(number, text) if self.jsonl else self._text_record(number, text)
        finally:
            if stream is not _stdin():
                stream.close()

    def _text_record(self, number: int, text: str) -> Record:
        field = self.open_fields[0]
        return Record(number, {**self.fixed, field: text}, {field: text})

    def _json_record(self, number: int, text: str) -> Record:
        where = f"{self.name}: line {number}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SofttoolError(f"{where} is not valid JSON ({exc.msg}); write one object per line") from None
        if not isinstance(obj, dict):
            raise SofttoolError(f"{where} is not a JSON object; write one object of template fields per line")
        values = dict(self.fixed)
        for name in self.fields:
            if name in obj:
                value = obj[name]
                if isinstance(value, bool) or not isinstance(value, str | int | float):
                    raise SofttoolError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
                values[name] = str(value)
        missing = [f for f in self.fields if f not in values]
        if missing:
            raise SofttoolError(
                f"{where} lacks the template field(s) {missing}; add them to each object or pass --field NAME=VALUE"
            )
        return Record(number, values, obj)


def _stdin() -> IO[bytes]:
    return sys.stdin.buffer


def _open(path: str | None) -> IO[bytes]:
    if path in (None, "-"):
        return _stdin()
    try:
        return open(path, "rb")  # noqa: SIM115  (closed by the caller)
    except OSError as exc:
        raise SofttoolError(f"--input {path}: cannot open it ({exc.strerror})") from exc


def _lines(stream: IO[bytes], name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, decoded as UTF-8 (a byte-order mark is dropped)."""
    for number, raw in enumerate(stream, 1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise SofttoolError(
                f"{name}: line {number} is not UTF-8 text (byte {exc.start}); generate reads UTF-8 text or JSONL"
            ) from None
        text = text.rstrip("\r\n")
        if text.strip():
            yield number, text
