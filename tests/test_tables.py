"""Every command's table reads in a plain 80-column terminal and in a pipe: no header is cut, no line is wider
than the console, and what does not fit is named (the full table stays in the JSON)."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

BACKENDS = ["peft", "hf", "hf-cb", "torch", "onnx", "onnx-int8"]


def _console(width: int) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    # force_terminal=False: what CI logs and pipes get.
    return Console(file=out, width=width, force_terminal=False, color_system=None), out


def _bench_result() -> dict:
    rows = []
    for k, name in enumerate(BACKENDS):
        rows.append(
            {
                "name": name,
                "status": "ok",
                "examples": 32 if name == "peft" else 256,
                "tokens_per_s": 1234.5 / (k + 1),
                "examples_per_s": 12.345,
                "speedup_vs_peft": 30.12,
                "speedup_vs_hf": 1.23,
                "speedup_vs_hf_cb": 1.89,
                "row_steps_speedup_vs_hf": 2.01 if name in ("peft", "hf") else None,
                "ttft_s": 0.123,
                "peak_rss_mb": 1234.0,
                "metric": 12.34,
                "identical_share": 0.99 if name != "hf" else None,
                "identical_to": "torch",
            }
        )
    rows.append({"name": "peft-cache", "status": "skipped", "reason": "peft is not installed"})
    return {
        "kind": "generate",
        "options": {"task": "translation", "batch_size": 16, "max_new_tokens": 64, "num_beams": 1, "threads": 2},
        "machine": {"cpu_model": "Intel(R) Xeon(R) Processor", "git_commit": "abc1234"},
        "workload": {"examples": 256},
        "main_metric": "bleu",
        "limits": {},
        "notes": [],
        "backends": rows,
    }


def _train_result() -> dict:
    return {
        "kind": "train",
        "options": {"task": "translation", "batch_size": 8, "steps": 10},
        "backends": [
            {"name": side, "num_virtual_tokens": n, "status": "ok", "samples_per_s": 4.56, "tokens_per_s": 789.0,
             "speedup_vs_peft": 1.66, "final_loss": 3.1234, "losses_agree": True}
            for n in (20, 100) for side in ("peft", "softtool", "softtool-naive")
        ],
    }  # fmt: skip


def _eval_results() -> dict:
    metrics = {"bleu": 12.34, "bleu_signature": "nrefs:1|...", "chrf": 45.67, "chrf_signature": "...", "n": 100}
    record = {"task": "translation", "split": "val", "n": 100, "metrics": metrics, "tokens_per_s": 123.4}
    return {"soft_prompt": record, "baseline": record, "zero_shot": record}


def _print_bench(console, result):
    from softtool.bench.report import print_table

    print_table(result, console, path="benchmarks/results/bench_translation.json")


def _print_eval(console, result):
    from pathlib import Path

    from softtool.cli.evaluate import print_scores

    print_scores(result, Path("runs/de/eval"), console)


TABLES = {
    "bench": (_print_bench, _bench_result),
    "bench --train": (_print_bench, _train_result),
    "eval": (_print_eval, _eval_results),
}


def _headers_in(text: str) -> set[str]:
    """Every cell of the table's header row (the first line with column separators)."""
    for line in text.splitlines():
        if "│" in line or "┃" in line:
            return {cell.strip() for cell in re.split(r"[│┃]", line) if cell.strip()}
    return set()


@pytest.mark.parametrize("name", sorted(TABLES))
def test_the_table_fits_80_columns_with_every_header_whole(name):
    printer, make = TABLES[name]
    console, out = _console(80)
    printer(console, make())
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "…" not in text, text  # rich's mark for a cut cell
    headers = _headers_in(text)
    wide_console, wide_out = _console(250)
    printer(wide_console, make())
    all_headers = _headers_in(wide_out.getvalue())
    assert headers and headers <= all_headers, (headers, all_headers)
    left_out = all_headers - headers
    if left_out:  # narrowed: the table says which columns it dropped, and where the full table is
        assert "columns left out at this width" in text and all(h in text for h in left_out), text


@pytest.mark.parametrize("name", sorted(TABLES))
def test_a_wide_terminal_gets_the_full_table(name):
    printer, make = TABLES[name]
    console, out = _console(250)
    printer(console, make())
    assert "columns left out" not in out.getvalue()


def test_a_terminal_too_narrow_for_any_table_gets_one_block_per_row():
    console, out = _console(30)
    _print_bench(console, _bench_result())
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines() if "tok/s" in line or "vs hf" in line) <= 30
    for name in BACKENDS:
        assert name in text
