"""Readers: every supported format written small in tmp_path, every bad input, and the real data sets."""

from __future__ import annotations

import csv
import gzip
import json
import sys
from pathlib import Path

import pytest

from softtool.data import default_dev_split, get_task, list_splits, load_split
from softtool.errors import SofttoolError

SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "T",
            "paragraphs": [
                {
                    "context": "Denver Broncos won Super Bowl 50.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Who won?",
                            "answers": [{"text": "Denver Broncos", "answer_start": 0}, {"text": "Denver Broncos"}],
                        },
                        {"id": "q2", "question": "Which game?", "answers": [{"text": "Super Bowl 50"}]},
                        {"id": "q3", "question": "   ", "answers": [{"text": "x"}]},
                        {"id": "q4", "question": "Unanswerable?", "answers": []},
                    ],
                }
            ],
        }
    ],
}


def write_gz(path, text: str) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(text)


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, delimiter=delimiter).writerows(rows)


# -- formats ----------------------------------------------------------------------------------


def test_squad_json_gives_one_example_per_question_and_counts_empty_ones(tmp_path):
    (tmp_path / "dev.json").write_text(json.dumps(SQUAD))
    split = load_split(tmp_path, "dev", task=get_task("squad"))
    assert [e.id for e in split.examples] == ["q1", "q2"]
    assert split.examples[0].fields == {"context": "Denver Broncos won Super Bowl 50.", "question": "Who won?"}
    assert split.examples[0].references == ["Denver Broncos"]  # duplicates of one answer collapse
    assert (split.skipped_empty, split.total_rows, split.name) == (2, 4, "dev")
    assert split.path == tmp_path / "dev.json" and split.paths == [tmp_path / "dev.json"]


def test_limit_stops_after_that_many_examples(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(SQUAD))
    split = load_split(tmp_path, "train", task=get_task("squad-qg"), limit=1)
    assert len(split) == 1 and split.total_rows == 1
    assert split.examples[0].fields["answer"] == "Denver Broncos"
    with pytest.raises(SofttoolError, match="--limit must be a positive"):
        load_split(tmp_path, "train", task=get_task("squad"), limit=0)


def test_csv_with_multiline_highlights_reads_each_row(tmp_path):
    write_csv(
        tmp_path / "dev.csv",
        [["id", "article", "highlights"], ["a1", 'Long, quoted "story".', "One .\nTwo ."], ["a2", "Other.", ""]],
    )
    split = load_split(tmp_path, "dev", task=get_task("cnndm"))
    assert len(split) == 1 and split.skipped_empty == 1 and split.total_rows == 2
    assert split.examples[0].fields == {"article": 'Long, quoted "story".'}
    assert split.examples[0].target == "One .\nTwo ."


def test_gzipped_csv_tsv_and_byte_order_mark_are_read(tmp_path):
    write_gz(tmp_path / "train.csv.gz", "id,article,highlights\nx,A story.,A point .\n")
    assert load_split(tmp_path, "train", task=get_task("cnndm")).examples[0].id == "x"
    (tmp_path / "test.tsv").write_text("\ufeffen\tde\nA dog.\tEin Hund.\n", encoding="utf-8")
    split = load_split(tmp_path, "test", task=get_task("translation"))
    assert split.examples[0].fields == {"source": "A dog."} and split.examples[0].target == "Ein Hund."


def test_json_list_and_jsonl_records_are_read_including_nested_translation(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"article": "S.", "highlights": "H ."}]))
    assert load_split(tmp_path, "a", task=get_task("cnndm")).examples[0].target == "H ."
    lines = [{"id": 5, "translation": {"en": "A cat.", "de": "Eine Katze."}}, {"translation": {"en": "", "de": "x"}}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    split = load_split(tmp_path, "b", task=get_task("translation"))
    assert [(e.id, e.fields["source"], e.target) for e in split.examples] == [("5", "A cat.", "Eine Katze.")]
    assert split.skipped_empty == 1


def test_parallel_text_plain_and_gzipped_stays_line_aligned(tmp_path):
    write_gz(tmp_path / "val.en.gz", "A dog.\nA man\rwith a hat.\n\nTwo cats.\n")
    write_gz(tmp_path / "val.de.gz", "Ein Hund.\nEin Mann mit Hut.\nLeer.\nZwei Katzen.\n")
    split = load_split(tmp_path, "val", task=get_task("translation"))
    # The stray "\r" stays inside its line; the empty source line is skipped and counted.
    assert [e.target for e in split.examples] == ["Ein Hund.", "Ein Mann mit Hut.", "Zwei Katzen."]
    assert split.examples[1].fields["source"] == "A man\rwith a hat."
    assert [e.id for e in split.examples] == ["0", "1", "3"] and split.skipped_empty == 1
    (tmp_path / "t.de").write_text("Hallo\r\n")
    (tmp_path / "t.en").write_text("Hello\r\n")
    rev = load_split(tmp_path, "t", task=get_task("translation", src="de", tgt="en"))
    assert rev.examples[0].fields == {"source": "Hallo"} and rev.examples[0].target == "Hello"
    assert rev.paths == [tmp_path / "t.de", tmp_path / "t.en"]


def test_dev_split_defaults_to_dev_then_val(tmp_path):
    (tmp_path / "val.en").write_text("a\n")
    (tmp_path / "val.de").write_text("b\n")
    assert default_dev_split(tmp_path) == "val"
    assert load_split(tmp_path, None, task=get_task("translation")).name == "val"
    (tmp_path / "dev.jsonl").write_text('{"en": "c", "de": "d"}\n')
    assert default_dev_split(tmp_path) == "dev"
    assert set(list_splits(tmp_path)) == {"dev", "val"}


# -- errors: each names the file or folder --------------------------------------------------


def test_no_dev_split_lists_the_splits_present(tmp_path):
    (tmp_path / "train.csv").write_text("article,highlights\na,b\n")
    with pytest.raises(SofttoolError, match=rf"{tmp_path}: no dev split .* splits \['train'\]"):
        default_dev_split(tmp_path)


def test_missing_folder_and_file_as_data_are_user_errors(tmp_path):
    with pytest.raises(SofttoolError, match="--data ./nope/: no such folder"):
        load_split("./nope/", "dev", task=get_task("squad"))
    (tmp_path / "dev.json").write_text("{}")
    with pytest.raises(SofttoolError, match=rf"--data {tmp_path / 'dev.json'}: is a file; pass the folder"):
        load_split(tmp_path / "dev.json", None, task=get_task("squad"))


def test_missing_split_file_lists_the_splits_that_exist(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(SQUAD))
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(SofttoolError, match=rf"{tmp_path}: no file for split 'test' .*splits present: train$"):
        load_split(tmp_path, "test", task=get_task("squad"))


def test_missing_columns_name_the_file_and_the_columns_present(tmp_path):
    (tmp_path / "dev.csv").write_text("id,article\n1,text\n")
    with pytest.raises(
        SofttoolError, match=r"dev\.csv: missing column\(s\) 'highlights' or 'summary'.*'article', 'id'"
    ):
        load_split(tmp_path, "dev", task=get_task("cnndm"))


def test_malformed_json_names_the_file(tmp_path):
    (tmp_path / "dev.json").write_text('{"data": [')
    with pytest.raises(SofttoolError, match=r"dev\.json: not valid JSON"):
        load_split(tmp_path, "dev", task=get_task("squad"))
    (tmp_path / "dev.json").write_text('{"data": [{"title": "T", "paragraphs": [{"context": "c"}]}]}')
    with pytest.raises(
        SofttoolError, match=r"dev\.json: not SQuAD v1.1 JSON: data\[0\]\.paragraphs\[0\] has no list 'qas'"
    ):
        load_split(tmp_path, "dev", task=get_task("squad"))
    (tmp_path / "dev.json").write_text('"just a string"')
    with pytest.raises(SofttoolError, match=r"dev\.json: neither SQuAD v1.1 JSON"):
        load_split(tmp_path, "dev", task=get_task("squad"))


def test_bad_jsonl_line_names_the_file_and_line(tmp_path):
    (tmp_path / "dev.jsonl").write_text('{"en": "a", "de": "b"}\n{"en": oops}\n')
    with pytest.raises(SofttoolError, match=r"dev\.jsonl: line 2 is not valid JSON"):
        load_split(tmp_path, "dev", task=get_task("translation"))
    (tmp_path / "dev.jsonl").write_text('["en", "de"]\n')
    with pytest.raises(SofttoolError, match=r"dev\.jsonl: line 1 is not a JSON object"):
        load_split(tmp_path, "dev", task=get_task("translation"))


def test_corrupt_gzip_and_non_utf8_files_are_reported_with_their_name(tmp_path):
    (tmp_path / "val.en.gz").write_bytes(b"this is not gzip data")
    write_gz(tmp_path / "val.de.gz", "Hallo\n")
    with pytest.raises(SofttoolError, match=r"val\.en\.gz: cannot read the file \(BadGzipFile"):
        load_split(tmp_path, "val", task=get_task("translation"))
    full = gzip.compress(b"Hallo\n" * 1000)
    (tmp_path / "val.en.gz").write_bytes(full[: len(full) // 2])  # cut mid-stream
    with pytest.raises(SofttoolError, match=r"val\.en\.gz.*cannot read the file \(EOFError"):
        load_split(tmp_path, "val", task=get_task("translation"))
    (tmp_path / "dev.csv").write_bytes(b"article,highlights\n\xff\xfe bad,bytes\n")
    with pytest.raises(SofttoolError, match=r"dev\.csv: cannot read the file \(UnicodeDecodeError"):
        load_split(tmp_path, "dev", task=get_task("cnndm"))


def test_empty_csv_is_reported(tmp_path):
    (tmp_path / "dev.csv").write_text("")
    with pytest.raises(SofttoolError, match=r"dev\.csv: empty file or no header row"):
        load_split(tmp_path, "dev", task=get_task("cnndm"))


def test_file_with_only_empty_rows_has_no_usable_examples(tmp_path):
    (tmp_path / "dev.csv").write_text("article,highlights\n ,x\ny,\n")
    with pytest.raises(SofttoolError, match=r"dev\.csv: no usable examples \(2 rows, 2 with an empty field\)"):
        load_split(tmp_path, "dev", task=get_task("cnndm"))


def test_parallel_files_of_different_lengths_name_both_files(tmp_path):
    (tmp_path / "train.en").write_text("a\nb\nc\n")
    (tmp_path / "train.de").write_text("x\ny\n")
    with pytest.raises(
        SofttoolError, match=r"train\.en has 3 lines but .*train\.de has 2; parallel files must be line-aligned"
    ):
        load_split(tmp_path, "train", task=get_task("translation"))


def test_parallel_file_without_its_other_side_names_the_missing_file(tmp_path):
    write_gz(tmp_path / "val.en.gz", "a\n")
    with pytest.raises(SofttoolError, match=r"val\.en\.gz: its other side .*val\.de\[\.gz\] is missing"):
        load_split(tmp_path, "val", task=get_task("translation"))


def test_hub_name_without_the_datasets_package_says_how_to_proceed(monkeypatch):
    # `datasets` is installed wherever lm-eval is (make setup): None in sys.modules makes its import fail as on a
    # machine without it, which is the case this message is for.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(
        SofttoolError, match=r"--data wmt16:de-en: no such folder.*pip install datasets.*or pass a folder"
    ):
        load_split("wmt16:de-en", "dev", task=get_task("translation"))
    assert default_dev_split("hf:squad") == "dev"


def test_hub_rows_in_the_translation_layout_become_examples():
    # The rows `datasets` yields for e.g. wmt16 nest both sides under "translation".
    from softtool.data.hub import looks_like_hub_name, parse_hub_name
    from softtool.data.records import collect_examples, flatten_translation

    rows = [{"translation": {"de": "Ein Hund.", "en": "A dog."}}, {"translation": {"de": "x", "en": " "}}]
    task = get_task("translation")
    mapping = task.resolve_columns(["de", "en"], "hf:wmt16")
    examples, skipped, total = collect_examples((flatten_translation(r) for r in rows), mapping, task, None)
    assert [(e.fields["source"], e.target) for e in examples] == [("A dog.", "Ein Hund.")]
    assert (skipped, total) == (1, 2)
    assert parse_hub_name("hf:wmt16:de-en") == ("wmt16", "de-en")
    assert looks_like_hub_name("Helsinki-NLP/europarl") and not looks_like_hub_name("./nope/")


# -- the real data sets ---------------------------------------------------------------------


@pytest.mark.data
def test_real_squad_dev_has_4961_questions_with_all_gold_answers(shared_data):
    split = load_split(shared_data / "squad", None, task=get_task("squad"))
    assert split.name == "dev" and len(split) == 4961 and split.skipped_empty == 0
    first = split.examples[0]
    assert first.id == "56be4db0acb8001400a502ec" and first.references == ["Denver Broncos"]
    assert max(len(e.references) for e in split.examples) > 1


@pytest.mark.data
def test_real_cnndm_dev_has_100_articles_with_multi_sentence_highlights(shared_data):
    split = load_split(shared_data / "cnn_dailymail", None, task=get_task("cnndm"))
    assert split.name == "dev" and len(split) == 100 and split.skipped_empty == 0
    assert all("\n" in e.target for e in split.examples[:10])


@pytest.mark.data
def test_real_multi30k_val_has_1014_aligned_pairs(shared_data):
    task = get_task("translation", src="en", tgt="de")
    split = load_split(shared_data / "multi30k", None, task=task)
    assert split.name == "val" and len(split) == 1014 and split.total_rows == 1014
    assert split.examples[0].fields["source"] == "A group of men are loading cotton onto a truck"
    assert split.examples[0].target == "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"
    assert set(list_splits(shared_data / "multi30k")) == {"train", "val", "test_2016_flickr"}


def test_file_readers_never_import_the_hub_module():
    # hub registers itself as a Source; the readers reach it only through that registry (no import circle).
    import ast

    import softtool.data.readers as readers

    tree = ast.parse(Path(readers.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "softtool.data.hub" not in imported and not any(name and name.endswith(".hub") for name in imported)


def test_a_name_that_is_not_a_folder_goes_to_the_source_that_claims_it(monkeypatch):
    from softtool.data import Split, readers

    loaded = []

    def load(data, split, *, task, limit=None):
        loaded.append((data, split, limit))
        return Split(split or "dev", [], source=data)

    source = readers.Source("test", claims=lambda text: text.startswith("test:"), load=load, dev_split="valid")
    monkeypatch.setattr(readers, "_SOURCES", [source, *readers._SOURCES])
    assert load_split("test:thing", None, task=get_task("translation"), limit=3).source == "test:thing"
    assert loaded == [("test:thing", None, 3)]
    assert default_dev_split("test:thing") == "valid"
    with pytest.raises(SofttoolError, match="no such folder"):
        load_split("./not/here/", "dev", task=get_task("translation"))
