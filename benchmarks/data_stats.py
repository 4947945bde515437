"""Statistics of the real data sets as softtool reads them: counts, read time, token lengths, truncation.

Backs the numbers in docs/data.md. Run from the repository root:

    python benchmarks/data_stats.py --data ../shared/data --output benchmarks/results/data_stats.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from softtool.bench.limits import cpu_model, git_commit

# (task, options, data folder, splits)
DATASETS = [
    ("squad", {}, "squad", ["train", "dev"]),
    ("squad-qg", {}, "squad", ["dev"]),
    ("cnndm", {}, "cnn_dailymail", ["train", "dev"]),
    ("translation", {"src": "en", "tgt": "de"}, "multi30k", ["train", "val", "test_2016_flickr"]),
]


def _machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}


def _commit() -> str:
    return git_commit(Path(__file__).resolve().parents[1]) or "unknown"


def _summary(values: list[int]) -> dict:
    ordered = sorted(values)
    return {
        "mean": round(statistics.fmean(ordered), 1),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    parser.add_argument("--virtual-tokens", type=int, default=20, help="virtual tokens of the default template")
    parser.add_argument("--max-length", type=int, default=512, help="training length budget for the truncation count")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    data_root, virtual_tokens, max_length, output = args.data, args.virtual_tokens, args.max_length, args.output
    from softtool.data import encode_example, get_task, load_split
    from softtool.models import DEFAULT_MODEL, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    rows = []
    for task_name, options, folder, splits in DATASETS:
        task = get_task(task_name, **options)
        template = task.default_template(virtual_tokens)
        for split_name in splits:
            start = time.perf_counter()
            split = load_split(data_root / folder, split_name, task=task)
            read_s = time.perf_counter() - start
            start = time.perf_counter()
            full = [encode_example(tokenizer, template, task, ex, max_length=10**9) for ex in split.examples]
            encode_s = time.perf_counter() - start
            cut = sum(
                encode_example(tokenizer, template, task, ex, max_length=max_length).truncated for ex in split.examples
            )
            targets = [len(e.target_ids) - 1 for e in full]  # without EOS
            field = task.truncate_field
            field_tokens = [
                len(tokenizer(ex.fields[field], add_special_tokens=False)["input_ids"]) for ex in split.examples
            ]
            row = {
                "task": task_name,
                "split": split_name,
                "files": [str(p.relative_to(data_root)) for p in split.paths],
                "total_rows": split.total_rows,
                "examples": len(split),
                "skipped_empty": split.skipped_empty,
                "read_s": round(read_s, 3),
                "encode_ms_per_example": round(1000 * encode_s / len(split), 3),
                "input_tokens": _summary([e.input_length for e in full]),
                "target_tokens": _summary(targets),
                "long_field": field,
                "long_field_tokens": _summary(field_tokens),
                "truncated_at_max_length": cut,
                "targets_over_max_target_tokens": sum(t + 1 > task.max_target_tokens for t in targets),
                "max_target_tokens": task.max_target_tokens,
            }
            rows.append(row)
            print(json.dumps(row))
    result = {
        "benchmark": "data_stats",
        "commit": _commit(),
        "machine": _machine(),
        "command": f"python benchmarks/data_stats.py --data {data_root} --virtual-tokens {virtual_tokens} "
        f"--max-length {max_length} --output {output}",
        "tokenizer": DEFAULT_MODEL,
        "virtual_tokens": virtual_tokens,
        "max_length": max_length,
        "splits": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
