"""Hugging Face dataset names as `--data` (needs the optional `datasets` package and a network).

`--data squad`, `--data cnn_dailymail:3.0.0` (name:config) or `--data hf:wmt16:de-en`. The split
names dev and val map to the hub's `validation`. `datasets` is imported only here, so softtool
works without it; when it is missing the user is told how to get it or to pass a folder instead.
"""

from __future__ import annotations

import re
from typing import Any

from softtool.data.example import Split
from softtool.data.readers import Source, register_source
from softtool.data.records import collect_examples, flatten_translation
from softtool.data.tasks import Task
from softtool.errors import SofttoolError

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_SPLIT_NAMES = {"dev": "validation", "val": "validation"}


def looks_like_hub_name(text: str) -> bool:
    """True for `name`, `owner/name`, optionally `:config`: what a missing folder may really be."""
    return bool(_HUB_NAME.match(text.removeprefix("hf:")))


def parse_hub_name(text: str) -> tuple[str, str | None]:
    """("owner/name", "config" or None) from `[hf:]owner/name[:config]`."""
    name, _, config = text.removeprefix("hf:").partition(":")
    return name, config or None


def load_hub_split(data: str, split: str | None, *, task: Task, limit: int | None = None) -> Split:
    """Read a split of a Hugging Face dataset for `task` (rows are records, as in a JSONL file)."""
    name, config = parse_hub_name(data)
    try:
        import datasets
    except ImportError:
        raise SofttoolError(
            f"--data {data}: no such folder, and reading it as a Hugging Face dataset needs the `datasets` "
            "package (pip install datasets) and a network connection; or pass a folder with "
            "<split>.json/.jsonl/.csv or parallel <split>.<lang> files"
        ) from None
    hub_split = _SPLIT_NAMES.get(split or "dev", split or "dev")
    try:
        dataset: Any = datasets.load_dataset(name, config, split=hub_split)
    except Exception as exc:  # the hub raises many kinds (connection, missing config, missing split)
        raise SofttoolError(
            f"--data {data}: could not load split {hub_split!r} of Hugging Face dataset {name!r}"
            f"{f' (config {config!r})' if config else ''}: {exc}; check the name and the network, or pass a folder"
        ) from exc
    where = f"hf:{name}" + (f":{config}" if config else "") + f" [{hub_split}]"
    columns = list(dataset.column_names)
    if "translation" in columns and dataset.num_rows:
        columns = [c for c in columns if c != "translation"] + list(dataset[0]["translation"])
    mapping = task.resolve_columns(columns, where)
    examples, skipped, total = collect_examples((flatten_translation(r) for r in dataset), mapping, task, limit)
    if not examples:
        raise SofttoolError(f"{where}: no usable examples ({total} rows, {skipped} with an empty field)")
    return Split(
        hub_split, examples, paths=[], skipped_empty=skipped, total_rows=total, source=where, columns=dict(mapping)
    )


register_source(Source("Hugging Face dataset", claims=looks_like_hub_name, load=load_hub_split))
