"""The prefill length buckets (softtool.runtime.static_step.PREFILL_LENGTHS), chosen from the data, and the padding
they cost: computed from token counts, nothing is timed.

With a shared prefix a prefill runs only a row's text (the template's text pieces; the virtual tokens' keys and
values are copied in), so the buckets are chosen over text lengths: Multi30k's (translation, short) and SQuAD's
(a context paragraph, long). The buckets minimize the padded tokens of both sets together, each weighted by its
own real tokens so that neither dominates, with a fixed count (each bucket is a captured graph per row bucket)
and the last one at the training length budget; longer texts round up to a multiple of 128.

    python benchmarks/prefill_buckets.py --data ../shared/data --output benchmarks/results/prefill_buckets.json

The result records, per data set: the padding of one row at a time (bucket against exact length) and of groups
of 16 rows admitted together (a first admission: padded to the bucket of the longest against the longest), plus
the filler rows a row bucket adds for each admission size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from softtool.bench.limits import git_commit

# (name, task, task options, folder, split): the evaluation splits the benchmarks run.
SETS = [
    ("multi30k", "translation", {"src": "en", "tgt": "de"}, "multi30k", "val"),
    ("squad", "squad", {}, "squad", "dev"),
]
STEP = 128  # beyond the last bucket: a multiple of this (static_step.CAPACITY_STEP)


def text_lengths(data: Path) -> dict[str, list[int]]:
    """Each set's text tokens per example under its task's default template (SmolLM2's tokenizer)."""
    from softtool.data import encode_example, get_task, load_split
    from softtool.models import DEFAULT_MODEL, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    out = {}
    for name, task_name, options, folder, split_name in SETS:
        task = get_task(task_name, **options)
        template = task.default_template(20)
        split = load_split(data / folder, split_name, task=task)
        encoded = [
            encode_example(tokenizer, template, task, ex, max_length=10**9, with_target=False) for ex in split.examples
        ]
        out[name] = [sum(len(p) for p in e.pieces) for e in encoded]
    return out


def choose(lengths: dict[str, list[int]], count: int, last: int, align: int = 8) -> list[int]:
    """`count` bucket lengths, the last one `last`, each a multiple of `align` (fp16 tensor-core tiles on a GPU),
    minimizing the weighted padded tokens (dynamic programming over the aligned lengths some row rounds up to)."""
    weight = [0.0] * (last + 1)  # per length: rows of it, each set's rows weighted by 1 / its real tokens
    for values in lengths.values():
        total = sum(values)
        for v in values:
            if v <= last:
                weight[v] += 1.0 / total
    cum_w, cum_wv = [0.0], [0.0]  # prefix sums over lengths 0..last: the padding of a range in O(1)
    for v, w in enumerate(weight):
        cum_w.append(cum_w[-1] + w)
        cum_wv.append(cum_wv[-1] + w * v)

    def pad(lo: int, hi: int) -> float:  # lengths in (lo, hi] rounded up to hi
        return hi * (cum_w[hi + 1] - cum_w[lo + 1]) - (cum_wv[hi + 1] - cum_wv[lo + 1])

    points = sorted({-(-v // align) * align for v, w in enumerate(weight) if w} | {last})
    best = [{j: (pad(-1, p), [p]) for j, p in enumerate(points)}]
    for _ in range(1, count):
        row = {}
        for j, hi in enumerate(points):
            options = [(best[-1][i][0] + pad(points[i], hi), best[-1][i][1]) for i in range(j) if i in best[-1]]
            if options:
                cost, chosen = min(options)
                row[j] = (cost, [*chosen, hi])
        best.append(row)
    return best[-1][len(points) - 1][1]


def bucket(length: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= length:
            return b
    return -(-length // STEP) * STEP


def overhead(values: list[int], buckets: list[int], group: int = 16) -> dict:
    """Padded tokens over real ones: one row at a time, and groups of `group` rows padded to their longest."""
    real = sum(values)
    single = sum(bucket(v, buckets) - v for v in values)
    groups = [values[i : i + group] for i in range(0, len(values), group)]
    exact = sum(len(g) * max(g) - sum(g) for g in groups)
    padded = sum(len(g) * bucket(max(g), buckets) - sum(g) for g in groups)
    return {
        "examples": len(values),
        "text_tokens": {"mean": round(real / len(values), 1), "max": max(values)},
        "one_row": {"exact": 0.0, "bucketed": round(single / real, 4)},
        f"groups_of_{group}": {"exact": round(exact / real, 4), "bucketed": round(padded / real, 4)},
        "shapes_used": len({bucket(v, buckets) for v in values}),
    }


def row_filler(slots: int = 16) -> dict[str, float]:
    """For each admission size k, the filler rows of its row bucket (powers of two, then `slots`) over k."""
    from softtool.runtime.static_step import bucket_for, slot_buckets

    buckets = slot_buckets(slots)
    return {str(k): round((bucket_for(buckets, k) - k) / k, 4) for k in range(1, slots + 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--count", type=int, default=8, help="number of buckets up to --last (default 8)")
    parser.add_argument("--last", type=int, default=512, help="the largest bucket, the training length budget (512)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)

    from softtool.runtime.static_step import PREFILL_LENGTHS

    lengths = text_lengths(args.data)
    chosen = choose(lengths, args.count, args.last)
    command = f"python benchmarks/prefill_buckets.py --data {args.data} --count {args.count} --last {args.last}"
    result = {
        "benchmark": "prefill_buckets",
        "commit": git_commit(Path(__file__).resolve().parents[1]) or "unknown",
        "command": f"{command} --output {args.output}",
        "computed_not_measured": True,
        "chosen": chosen,
        "in_use": list(PREFILL_LENGTHS),
        "beyond_last": f"a multiple of {STEP}",
        "padding_over_real_tokens": {
            name: {"chosen": overhead(v, chosen), "in_use": overhead(v, list(PREFILL_LENGTHS))}
            for name, v in lengths.items()
        },
        "row_bucket_filler_over_rows": row_filler(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"chosen": chosen, "in_use": list(PREFILL_LENGTHS)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
