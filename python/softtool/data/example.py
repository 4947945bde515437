"""The data model shared by readers, tasks and encoding: one Example per input, a Split per file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Example:
    """One task input with its gold outputs.

    `fields` are the template fields (e.g. context/question for squad); `references` are all gold
    outputs (every SQuAD answer, the highlights, the target sentence); the training target is the
    first reference.
    """

    id: str
    fields: dict[str, str]
    references: list[str]

    @property
    def target(self) -> str:
        return self.references[0]


@dataclass
class Split:
    """The examples read from one split (one file, or a pair of line-aligned files)."""

    name: str
    examples: list[Example]
    paths: list[Path] = field(default_factory=list)  # empty for a Hugging Face dataset
    skipped_empty: int = 0  # rows left out because a needed field was empty or whitespace
    total_rows: int = 0  # rows read, kept or skipped (stops early when `limit` is reached)
    source: str = ""  # the file(s) or "hf:<name>", for messages
    columns: dict[str, str] = field(default_factory=dict)  # what the task read from which column (Task.resolve_columns)

    @property
    def path(self) -> Path | None:
        """The main file (the source side for parallel text), or None for a Hugging Face dataset."""
        return self.paths[0] if self.paths else None

    def __len__(self) -> int:
        return len(self.examples)
