"""Regenerate the performance tables (Markdown) from the JSON results of `softtool bench`.

    python benchmarks/make_table.py                       # print the tables for benchmarks/results/bench_*.json
    python benchmarks/make_table.py --update docs/bench.md  # rewrite the part between the table markers

Every number comes from a result file; the file and its commit are named in each row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from softtool.bench.measure import row_steps_per_s
from softtool.bench.report import where as hardware

# The markers of docs/bench.md's block, the one benchmarks/render_docs.py renders as `bench` (make docs).
START, END = "<!-- render:bench:start -->", "<!-- render:bench:end -->"
RESULTS = Path(__file__).resolve().parent / "results"


def _f(value, spec=".1f", suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def generate_rows(result: dict, name: str) -> list[str]:
    opts, workload = result["options"], result["workload"]
    search = "greedy" if opts["num_beams"] == 1 else f"beam {opts['num_beams']}"
    metric = result.get("main_metric") or "metric"
    rows = []
    # Older results lack the row-step rate; it derives from the stored outputs, so fill it in.
    steps = {r["name"]: r.get("row_steps_per_s") or row_steps_per_s(r, opts) for r in result["backends"]}
    for r in result["backends"]:
        where = f"`{name}` @ {result['machine']['git_commit']}"
        if r["status"] != "ok":
            rows.append(
                f"| {opts['task']} | {opts['batch_size']} | {search} | {r['name']} | {r['status']}: "
                f"{r.get('reason', '')} | | | | | | | | {where} |"
            )
            continue
        step_ratio = steps[r["name"]] / steps["hf"] if steps[r["name"]] and steps.get("hf") else None
        same = r.get("identical_share")
        share = r.get("share_of_bandwidth_bound")
        peak = _f(r["peak_rss_mb"], ".0f") + (f" (GPU {r['peak_gpu_mb']:.0f})" if r.get("peak_gpu_mb") else "")
        rows.append(
            f"| {opts['task']} x{workload['examples']} | {opts['batch_size']} | {search} | {r['name']} "
            f"| {_f(r['tokens_per_s'])} | {_f(r.get('speedup_vs_peft'), '.2f', 'x')} "
            f"| {_f(r.get('speedup_vs_hf'), '.2f', 'x')} | {_f(step_ratio, '.2f', 'x')} | {_f(r['ttft_s'], '.3f')} | {peak} "
            f"| {metric} {_f(r.get('metric'), '.2f')} "
            f"| {'-' if same is None else f'{same:.0%}'} | {'-' if share is None else f'{share:.0%}'} | {where} |"
        )
    return rows


def train_rows(result: dict, name: str) -> list[str]:
    opts = result["options"]
    on = f", {result['machine'].get('gpu') or opts['device']}" if opts.get("device", "cpu") != "cpu" else ""
    rows = []
    for r in result["backends"]:
        where = f"`{name}` @ {result['machine']['git_commit']}"
        if r["status"] != "ok":
            rows.append(
                f"| {opts['task']} | {r.get('num_virtual_tokens')} | {r['name']} | {r['status']} | | | | {where} |"
            )
            continue
        agree = {True: "yes", False: "**no**", None: "-"}[r.get("losses_agree")]
        rows.append(
            f"| {opts['task']}, batch {opts['batch_size']}{on} | {r['num_virtual_tokens']} | {r['name']} "
            f"| {_f(r['samples_per_s'], '.2f')} | {_f(r.get('speedup_vs_peft'), '.2f', 'x')} "
            f"| {_f(r['final_loss'], '.4f')} | {agree} | {where} |"
        )
    return rows


def rank_rows(result: dict, name: str) -> list[str]:
    opts, workload = result["options"], result["workload"]
    on = f", {hardware(result)}" if opts.get("device", "cpu") != "cpu" else ""
    rows = []
    for r in result["backends"]:
        where = f"`{name}` @ {result['machine']['git_commit']}"
        if r["status"] != "ok":
            rows.append(
                f"| {opts['task']}{on} | {opts['batch_size']} | {r['name']} | {r['status']} | | | | | | | {where} |"
            )
            continue
        target = "-"
        if "target_speedup" in r:
            target = f"{r['target_speedup']:.1f}x " + ("met" if r["target_met"] else "**missed**")
        same = r.get("same_predictions_as_peer")
        # softtool's timed passes split: the prompts' prefill and the labels' forward (runtime.choices)
        parts = f"{r['prefill_s']:.1f} / {r['score_s']:.1f}" if "prefill_s" in r else "-"
        rows.append(
            f"| {opts['task']} x{workload['examples']}{on} | {opts['batch_size']} | {r['name']} "
            f"| {_f(r['examples_per_s'], '.2f')} | {_f(r.get('speedup_vs_hf_rank'), '.2f', 'x')} | {target} "
            f"| {_f(r.get('metric'), '.2f')} | {'-' if same is None else f'{same:.0%}'} "
            f"| {_f(r.get('max_abs_score_diff_vs_peer'), '.1e')} | {parts} | {where} |"
        )
    return rows


def make_tables(paths: list[Path]) -> str:
    gen, train, rank, limits, dirty = [], [], [], [], []
    for path in sorted(paths):
        result = json.loads(path.read_text())
        name = path.name
        if str(result["machine"].get("git_commit") or "").endswith("-dirty"):
            dirty.append(f"`{name}`")
        if result.get("kind") == "train":
            train += train_rows(result, name)
            continue
        if result.get("kind") == "rank":
            rank += rank_rows(result, name)
        else:
            gen += generate_rows(result, name)
        lim = result.get("limits") or {}
        if lim:
            limits.append(
                f"| `{name}` | {hardware(result)} "
                f"| {_f(lim['memory_bandwidth_gbs'])} GB/s | {_f(lim['matmul_gflops'], '.0f')} GFLOP/s "
                f"| {_f(lim.get('decode_bound_tokens_per_s_batch1'), '.0f')} tok/s |"
            )
    out = []
    if gen:
        out += [
            "| workload | batch | search | backend | tokens/s | vs peft | vs hf | row-steps vs hf | ttft s | peak MB "
            "| metric | same as torch | of bandwidth bound | result |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *gen,
            "",
        ]
    if rank:
        out += [
            "| classification | examples/batch | backend | examples/s | vs hf-rank | target | accuracy "
            "| same as hf-rank | max score diff | prefill / labels s | result |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rank,
            "",
        ]
    if limits:
        out += [
            "| result | machine | copy bandwidth | matmul | batch-1 decode bound |",
            "| --- | --- | --- | --- | --- |",
            *limits,
            "",
        ]
    if train:
        out += [
            "| training | virtual tokens | backend | samples/s | vs peft | loss after K | losses agree | result |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *train,
            "",
        ]
    if dirty:
        out += [f"Run from a tree with uncommitted edits (a commit that ends in `-dirty`; the edits were not kept): "
                f"{', '.join(dirty)}.", ""]  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", type=Path, help="result JSON files (default: results/bench_*.json)")
    parser.add_argument("--update", type=Path, help=f"Markdown file whose text between {START} and {END} is replaced")
    args = parser.parse_args(argv)
    paths = args.results or sorted(RESULTS.glob("bench_*.json"))
    if not paths:
        print("no result files found", file=sys.stderr)
        return 1
    tables = make_tables(paths)
    if not args.update:
        print(tables)
        return 0
    text = args.update.read_text()
    if START not in text or END not in text:
        print(f"{args.update} has no {START} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    args.update.write_text(f"{head}{START}\n{tables.rstrip()}\n{END}{tail}")  # as render_docs.py writes it
    return 0


if __name__ == "__main__":
    sys.exit(main())
