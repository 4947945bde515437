"""Readers for the data formats users have, and the folder/split convention that finds them.

`--data` is a folder; a split names a file stem in it:

    train.json / dev.json            SQuAD v1.1 JSON (data[].paragraphs[].qas[].answers[]) or a JSON list of records
    train.jsonl                      one JSON record per line
    train.csv / train.tsv            a header row naming the columns
    train.en + train.de              line-aligned parallel text (translation; language codes from the task)

Any of these may be gzip-compressed (`.gz` appended). A name that is not a folder goes to the first
registered source that claims it (`register_source`; softtool.data.hub registers Hugging Face dataset
names), so this module never imports those sources. The task (softtool.data.tasks) decides which columns
it needs and turns each record into an Example; rows whose needed fields are empty are counted in
`Split.skipped_empty`, never dropped silently.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softtool.data.example import Split
from softtool.data.records import collect_examples, flatten_translation
from softtool.data.tasks import Task
from softtool.errors import SofttoolError

TABLE_FORMATS = (".json", ".jsonl", ".csv", ".tsv")  # in order of preference when several exist
DEV_SPLITS = ("dev", "val")
_LANGUAGE_SUFFIX = re.compile(r"^\.[a-z]{2,3}$")
# Articles can be far longer than csv's default 128 KiB field limit.
csv.field_size_limit(2**31 - 1)


@dataclass(frozen=True)
class Source:
    """A place data can come from besides a folder, e.g. the Hugging Face hub (softtool.data.hub)."""

    name: str
    claims: Callable[[str], bool]  # is `--data TEXT` (not an existing path) meant for this source?
    load: Callable[..., Split]  # load(data, split, *, task, limit) -> Split
    dev_split: str = "dev"  # what `default_dev_split` answers for it


_SOURCES: list[Source] = []


def register_source(source: Source) -> None:
    """Let `load_split` hand names that are not folders to `source` (later registrations are asked first)."""
    _SOURCES.insert(0, source)


def _source_for(text: str) -> Source | None:
    return next((s for s in _SOURCES if s.claims(text)), None)


def load_split(data: str | Path, split: str | None, *, task: Task, limit: int | None = None) -> Split:
    """Read split `split` (a file stem; None = the dev split) of `data` for `task`, up to `limit` examples."""
    if limit is not None and limit <= 0:
        raise SofttoolError(f"--limit must be a positive number of examples, got {limit}")
    folder = _data_folder(data)
    if isinstance(folder, Source):
        return folder.load(str(data), split, task=task, limit=limit)
    if split is None:
        split = default_dev_split(folder)
    paths = _find_split_files(folder, split, task)
    where = ", ".join(str(p) for p in paths)
    try:
        if len(paths) == 2:
            columns, records = _read_parallel(paths[0], paths[1], task)
        else:
            columns, records = _read_table(paths[0])
        mapping = task.resolve_columns(columns, where)
        try:
            result = collect_examples(records, mapping, task, limit)
        except SofttoolError as exc:  # a record the task refuses (softtool.data.user_tasks): name the file
            raise SofttoolError(f"{where}: {exc}") from exc
    except SofttoolError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:  # a file failing outside _reading
        raise SofttoolError(
            f"{where}: cannot read the file ({_describe(exc)}); check that it is a valid, complete file"
        ) from exc
    examples, skipped, total = result
    if not examples:
        raise SofttoolError(
            f"{where}: no usable examples ({total} rows, {skipped} with an empty field); check the file's contents"
        )
    return Split(
        split, examples, paths=paths, skipped_empty=skipped, total_rows=total, source=where, columns=dict(mapping)
    )


def split_files(data: str | Path, split: str | None, *, task: Task) -> list[Path]:
    """The files split `split` (None = the dev split) of `data` would be read from, without reading them.

    A cheap check before any work: SofttoolError for a missing folder or split; [] for a registered
    source's name (a Hugging Face dataset), which is only checked when loaded.
    """
    folder = _data_folder(data)
    if isinstance(folder, Source):
        return []
    return _find_split_files(folder, split or default_dev_split(folder), task)


def default_dev_split(data: str | Path) -> str:
    """`dev` or `val`, whichever the folder has (dev first); a registered source's own answer for its names."""
    folder = _data_folder(data)
    if isinstance(folder, Source):
        return folder.dev_split
    splits = list_splits(folder)
    for name in DEV_SPLITS:
        if name in splits:
            return name
    raise SofttoolError(
        f"{folder}: no dev split (dev.* or val.*); it has splits {sorted(splits) or 'none'}; "
        "name one explicitly or add a dev file"
    )


def list_splits(folder: Path) -> dict[str, list[Path]]:
    """Every split the folder holds: file stem -> its data files (tables, and parallel sides in pairs)."""
    tables: dict[str, list[Path]] = {}
    sides: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        stem, dot, suffix = name.rpartition(".")
        if not (dot and stem):
            continue
        if f".{suffix}" in TABLE_FORMATS:
            tables.setdefault(stem, []).append(path)
        elif _LANGUAGE_SUFFIX.match(f".{suffix}"):
            sides.setdefault(stem, []).append(path)
    # A lone "notes.txt" is not half of a parallel corpus: language-suffixed files count only in pairs.
    for stem, paths in sides.items():
        if len(paths) >= 2:
            tables.setdefault(stem, []).extend(paths)
    return dict(sorted(tables.items()))


# -- locating files ---------------------------------------------------------------------------


def _data_folder(data: str | Path) -> Path | Source:
    """The folder `data` names, or the registered source that claims the name."""
    text = str(data)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SofttoolError(f"--data {text}: is a file; pass the folder that holds it (a split is a file stem there)")
    source = _source_for(text)
    if source is not None:
        return source
    raise SofttoolError(f"--data {text}: no such folder; pass a folder with <split>.json/.jsonl/.csv or parallel files")


def _find_split_files(folder: Path, split: str, task: Task) -> list[Path]:
    def existing(name: str) -> Path | None:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    if hasattr(task, "src") and hasattr(task, "tgt"):
        src, tgt = existing(f"{split}.{task.src}"), existing(f"{split}.{task.tgt}")
        if src and tgt:
            return [src, tgt]
        if src or tgt:
            have, lacking = (src, f"{split}.{task.tgt}") if src else (tgt, f"{split}.{task.src}")
            raise SofttoolError(
                f"{have}: its other side {folder / lacking}[.gz] is missing; translation {task.src}->{task.tgt} "
                "needs both line-aligned files"
            )
    for ext in TABLE_FORMATS:
        found = existing(f"{split}{ext}")
        if found:
            return [found]
    splits = sorted(list_splits(folder))
    raise SofttoolError(
        f"{folder}: no file for split {split!r} (looked for {split}.json/.jsonl/.csv/.tsv"
        + (f" or {split}.{task.src}+{split}.{task.tgt}" if hasattr(task, "src") else "")
        + f"); splits present: {', '.join(splits) if splits else 'none'}"
    )


# -- formats ----------------------------------------------------------------------------------


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn the ways a file can fail to read into one SofttoolError that names it."""
    try:
        yield
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise SofttoolError(
            f"{path}: cannot read the file ({_describe(exc)}); check that it is a valid, complete file"
        ) from exc


def _open_text(path: Path, newline: str = "") -> io.TextIOBase:
    # utf-8-sig drops a byte-order mark, which would otherwise glue itself to the first column name.
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)


def _table_format(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix


def _read_table(path: Path) -> tuple[list[str], Iterator[Mapping[str, Any]]]:
    """(column names, records) of a .json / .jsonl / .csv / .tsv file."""
    fmt = _table_format(path)
    if fmt == ".json":
        return _read_json(path)
    if fmt == ".jsonl":
        return _read_jsonl(path)
    return _read_csv(path, delimiter="\t" if fmt == ".tsv" else ",")


def _read_json(path: Path) -> tuple[list[str], Iterator[Mapping[str, Any]]]:
    with _reading(path), _open_text(path) as fh:
        try:
            doc = json.load(fh)
        except json.JSONDecodeError as exc:
            raise SofttoolError(f"{path}: not valid JSON ({exc}); fix or re-download the file") from exc
    if isinstance(doc, Mapping) and "data" in doc:
        return ["id", "title", "context", "question", "answers"], iter(_squad_records(path, doc["data"]))
    if isinstance(doc, list) and all(isinstance(r, Mapping) for r in doc):
        return _keys(doc[:1]), iter(doc)
    raise SofttoolError(
        f'{path}: neither SQuAD v1.1 JSON ({{"data": [...]}}) nor a JSON list of records; '
        "convert it to one of these (or to .jsonl / .csv)"
    )


def _squad_records(path: Path, data: Any) -> list[dict[str, Any]]:
    """Flatten data[].paragraphs[].qas[] into one record per question (checked, so errors name the spot)."""

    def need(obj: Any, key: str, kind: type, where: str) -> Any:
        value = obj.get(key) if isinstance(obj, Mapping) else None
        if not isinstance(value, kind):
            raise SofttoolError(
                f"{path}: not SQuAD v1.1 JSON: {where} has no {kind.__name__} {key!r}; "
                "expected data[].paragraphs[].qas[].answers[]"
            )
        return value

    if not isinstance(data, list):
        raise SofttoolError(f"{path}: not SQuAD v1.1 JSON: 'data' is not a list of articles")
    records: list[dict[str, Any]] = []
    for i, article in enumerate(data):
        title = article.get("title", "") if isinstance(article, Mapping) else ""
        for j, paragraph in enumerate(need(article, "paragraphs", list, f"data[{i}]")):
            context = need(paragraph, "context", str, f"data[{i}].paragraphs[{j}]")
            for k, qa in enumerate(need(paragraph, "qas", list, f"data[{i}].paragraphs[{j}]")):
                where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                records.append(
                    {
                        "id": qa.get("id", "") if isinstance(qa, Mapping) else "",
                        "title": title,
                        "context": context,
                        "question": need(qa, "question", str, where),
                        "answers": need(qa, "answers", list, where),
                    }
                )
    return records


def _read_jsonl(path: Path) -> tuple[list[str], Iterator[Mapping[str, Any]]]:
    records: list[Mapping[str, Any]] = []
    with _reading(path), _open_text(path, newline="\n") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SofttoolError(f"{path}: line {number} is not valid JSON ({exc}); fix the line") from exc
            if not isinstance(record, Mapping):
                raise SofttoolError(f"{path}: line {number} is not a JSON object; each line must be one record")
            records.append(flatten_translation(record))
    return _keys(records[:1]), iter(records)


def _read_csv(path: Path, delimiter: str) -> tuple[list[str], Iterator[Mapping[str, Any]]]:
    with _reading(path), _open_text(path) as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    if not columns:
        raise SofttoolError(f"{path}: empty file or no header row; the first line must name the columns")
    return columns, iter(rows)


def _read_parallel(src: Path, tgt: Path, task: Task) -> tuple[list[str], Iterator[Mapping[str, Any]]]:
    sides = []
    for path in (src, tgt):
        # Only "\n" ends a line: a stray "\r" inside a sentence must not shift the alignment.
        with _reading(path), _open_text(path, newline="\n") as fh:
            sides.append([line.rstrip("\r\n") for line in fh])
    if len(sides[0]) != len(sides[1]):
        raise SofttoolError(
            f"{src} has {len(sides[0])} lines but {tgt} has {len(sides[1])}; parallel files must be line-aligned"
        )
    key_src, key_tgt = task.src, task.tgt
    records = ({"id": str(i), key_src: s, key_tgt: t} for i, (s, t) in enumerate(zip(*sides, strict=True)))
    return ["id", key_src, key_tgt], records


def _keys(records: list[Mapping[str, Any]]) -> list[str]:
    return list(records[0].keys()) if records else []


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
