"""Records (one dict of columns per row) into Examples: the step every data source shares.

The file readers (softtool.data.readers) and the Hugging Face source (softtool.data.hub) both yield
records and hand them to `collect_examples`; neither needs the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from softtool.data.example import Example
from softtool.data.tasks import Task


def collect_examples(
    records: Iterable[Mapping[str, Any]], columns: Mapping[str, str], task: Task, limit: int | None
) -> tuple[list[Example], int, int]:
    """Examples from records, up to `limit`; returns (examples, rows skipped as empty, rows read)."""
    examples: list[Example] = []
    skipped = total = 0
    for index, record in enumerate(records):
        total += 1
        example = task.make_example(record, columns, index)
        if example is None:
            skipped += 1
            continue
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    return examples, skipped, total


def flatten_translation(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """The Hugging Face translation layout nests the sides ({"translation": {"en": ..., "de": ...}}); lift them."""
    nested = record.get("translation")
    if isinstance(nested, Mapping):
        return {**{k: v for k, v in record.items() if k != "translation"}, **nested}
    return record
