"""Compare two `softtool eval` runs on the same examples: the share of identical predictions and the
metric difference, e.g. the ONNX backend against the PyTorch backend on a dev set.

    python benchmarks/compare_predictions.py runs/de/eval runs/de/eval-onnx \
        --output benchmarks/results/onnx_vs_torch_translation.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from softtool.bench.limits import git_commit


def _read(folder: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return rows, json.loads((folder / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="eval folder of the reference run (e.g. --backend torch)")
    parser.add_argument("candidate", type=Path, help="eval folder of the run to compare (e.g. --backend onnx)")
    parser.add_argument("--output", type=Path, help="write the comparison as JSON here")
    args = parser.parse_args()

    ref_rows, ref_metrics = _read(args.reference)
    cand_rows, cand_metrics = _read(args.candidate)
    if [r["id"] for r in ref_rows] != [r["id"] for r in cand_rows]:
        raise SystemExit("the two runs did not predict the same examples in the same order")
    same = sum(r["prediction"] == c["prediction"] for r, c in zip(ref_rows, cand_rows, strict=True))
    differing = [
        {"id": r["id"], "reference_run": r["prediction"], "candidate_run": c["prediction"]}
        for r, c in zip(ref_rows, cand_rows, strict=True)
        if r["prediction"] != c["prediction"]
    ]
    metrics = {
        k: {"reference": v, "candidate": cand_metrics["metrics"][k], "difference": cand_metrics["metrics"][k] - v}
        for k, v in ref_metrics["metrics"].items()
        if isinstance(v, float) and isinstance(cand_metrics["metrics"].get(k), float)
    }
    commit = git_commit(Path(__file__).resolve().parents[1])
    result = {
        "reference": str(args.reference),
        "candidate": str(args.candidate),
        "commit": commit,
        "n": len(ref_rows),
        "identical_predictions": same,
        "identical_share": same / len(ref_rows),
        "metrics": metrics,
        "differing": differing,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "differing"}, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
