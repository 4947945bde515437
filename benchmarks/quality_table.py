"""The README's quality table from benchmarks/results/quality_<task>_<model>.json (benchmarks/quality.py).

One row per (task, model): the held-out main metric of every discrete prompt and of each method's winner
(its learning rate in brackets), the winners' loop share, the decoding chosen on dev, and the JSON's commit.

    python benchmarks/quality_table.py benchmarks/results/quality_*_*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = (("zero_shot", "zero-shot"), ("baseline", "instruction"), ("chat", "chat template"),
           ("few_shot", "k-shot"), ("prompt", "prompt tuning"), ("ptuning", "P-tuning"),
           ("peft-ptuning", "PEFT P-tuning"))  # fmt: skip


def row(result: dict) -> list[str]:
    metric = result["main_metric"]
    test = result["test"]
    scores = {kind: test[kind][metric] for kind, _ in COLUMNS if kind in test}
    best = max(scores.values()) if scores else None
    cells = [f"{result['task']} ({test_size(result)})", result["model"], metric]
    for kind, _ in COLUMNS:
        if kind not in test:
            cells.append("-")
            continue
        text = f"{test[kind][metric]:.2f}"
        if kind in ("prompt", "ptuning", "peft-ptuning"):
            text += f" (lr {test[kind]['lr']:g})"
        cells.append(f"**{text}**" if test[kind][metric] == best else text)
    loops = ", ".join(f"{kind} {test[kind]['loop_share']:.0f}%" for kind, _ in COLUMNS if kind in test)
    decoding = result.get("decoding_chosen") or {}
    cells.append(loops)
    cells.append(f"ngram {decoding.get('no_repeat_ngram_size', 0)}, rp {decoding.get('repetition_penalty', 1.0):g}")
    cells.append(f"{result['budget']['steps']} steps x {result['budget']['batch_size']}")
    cells.append(result["commit"])
    return cells


def test_size(result: dict) -> str:
    where = result["budget"]["test"]
    n = next(iter(result["test"].values())).get("n")
    split = where["split"] if where["split"] != "dev" else f"dev {where['offset']}+"
    return f"{split}, {n or where['limit']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    header = ["task (held-out examples)", "model", "metric", *(name for _, name in COLUMNS), "loop share",
              "decoding (dev)", "budget per run", "commit"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for path in args.files:
        result = json.loads(path.read_text())
        if result.get("test"):
            print("| " + " | ".join(row(result)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
