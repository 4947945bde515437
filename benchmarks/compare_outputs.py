"""Share of identical outputs between two runs on the same inputs: two `softtool bench` results, backend by
backend (or one backend of each), or two `softtool eval` folders (their predictions, and each metric's difference).

    python benchmarks/compare_outputs.py A.json B.json                    # every backend both ran
    python benchmarks/compare_outputs.py A.json B.json --pair torch onnx  # A's torch against B's onnx
    python benchmarks/compare_outputs.py runs/de/eval runs/de/eval-onnx --output onnx_vs_torch.json

For example the static decode step against the dynamic one (two bench runs that differ only in `--step`), or
the ONNX backend against the PyTorch one on a dev set (two evals). Differing bench rows are listed with the
first step at which they differ; differing eval examples with both predictions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    """Two backends' output tokens, row by row."""
    n = min(len(a), len(b))
    differ = []
    for i in range(n):
        if a[i] != b[i]:
            first = next(
                (k for k, (x, y) in enumerate(zip(a[i], b[i], strict=False)) if x != y), min(len(a[i]), len(b[i]))
            )
            differ.append({"row": i, "first_differing_step": first})
    return {
        "rows": n,
        "identical": n - len(differ),
        "identical_share": (n - len(differ)) / n if n else None,
        "differ": differ,
    }


def compare_benches(a: Path, b: Path, pair: list[str] | None) -> dict:
    """Every backend both bench results ran ok (or the one `pair`), output against output."""
    runs = [{r["name"]: r for r in json.loads(p.read_text())["backends"] if r["status"] == "ok"} for p in (a, b)]
    pairs = [tuple(pair)] if pair else [(name, name) for name in runs[0] if name in runs[1]]
    result = {"pairs": {}}
    for x, y in pairs:
        if x not in runs[0] or y not in runs[1]:
            raise ValueError(f"no ok row of {x} in {a}" if x not in runs[0] else f"no ok row of {y} in {b}")
        r = compare(runs[0][x]["outputs"], runs[1][y]["outputs"])
        result["pairs"][f"{x} vs {y}"] = r
        print(f"{x} vs {y}: {r['identical']}/{r['rows']} identical ({r['identical_share']:.1%})")
    return result


def _read_eval(folder: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return rows, json.loads((folder / "metrics.json").read_text())["metrics"]


def compare_evals(a: Path, b: Path) -> dict:
    """Two eval folders: identical predictions, example by example, and every numeric metric's difference."""
    (a_rows, a_metrics), (b_rows, b_metrics) = _read_eval(a), _read_eval(b)
    if [r["id"] for r in a_rows] != [r["id"] for r in b_rows]:
        raise ValueError(f"{a} and {b} did not predict the same examples in the same order")
    differ = [
        {"row": i, "id": x["id"], "a": x["prediction"], "b": y["prediction"]}
        for i, (x, y) in enumerate(zip(a_rows, b_rows, strict=True))
        if x["prediction"] != y["prediction"]
    ]
    n = len(a_rows)
    predictions = {"rows": n, "identical": n - len(differ), "identical_share": (n - len(differ)) / n if n else None,
                   "differ": differ}  # fmt: skip
    # Only numbers: metrics.json also holds signatures (sacrebleu's) and, for a classify task, the confusion table.
    metrics = {
        k: {"a": v, "b": b_metrics[k], "difference": b_metrics[k] - v}
        for k, v in a_metrics.items()
        if isinstance(v, int | float) and isinstance(b_metrics.get(k), int | float) and not isinstance(v, bool)
    }
    print(f"predictions: {predictions['identical']}/{n} identical")
    for k, m in metrics.items():
        print(f"{k}: {m['a']:.4g} vs {m['b']:.4g} ({m['difference']:+.4g})")
    return {"predictions": predictions, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="a bench result JSON, or an eval folder (the reference)")
    parser.add_argument("b", type=Path, help="the same kind of run to compare with it")
    parser.add_argument("--pair", nargs=2, metavar=("A_BACKEND", "B_BACKEND"), help="bench results only")
    parser.add_argument("--output", type=Path, help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    folders = [p.is_dir() for p in (args.a, args.b)]
    if folders[0] != folders[1]:
        parser.error("compare two bench result files or two eval folders, not one of each")
    if folders[0] and args.pair:
        parser.error("--pair names bench backends; eval folders hold one run each")
    from softtool.bench.limits import git_commit

    try:
        found = compare_evals(args.a, args.b) if folders[0] else compare_benches(args.a, args.b, args.pair)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = {"a": str(args.a), "b": str(args.b), "kind": "eval" if folders[0] else "bench",
              "commit": git_commit(Path(__file__).resolve().parents[1]), **found}  # fmt: skip
    if args.output:
        args.output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
