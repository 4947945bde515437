"""Share of identical outputs between two `softtool bench` results, backend by backend (or one backend of each).

    python benchmarks/compare_outputs.py A.json B.json                  # every backend both ran
    python benchmarks/compare_outputs.py A.json B.json --pair torch onnx  # A's torch against B's onnx

For example the static decode step against the dynamic one: two runs that differ only in `--step`. Rows that
differ are listed with the first step at which they do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--pair", nargs=2, metavar=("A_BACKEND", "B_BACKEND"))
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    runs = [
        {r["name"]: r for r in json.loads(p.read_text())["backends"] if r["status"] == "ok"} for p in (args.a, args.b)
    ]
    pairs = [tuple(args.pair)] if args.pair else [(name, name) for name in runs[0] if name in runs[1]]
    result = {"a": str(args.a), "b": str(args.b), "pairs": {}}
    for x, y in pairs:
        r = compare(runs[0][x]["outputs"], runs[1][y]["outputs"])
        result["pairs"][f"{x} vs {y}"] = r
        print(f"{x} vs {y}: {r['identical']}/{r['rows']} identical ({r['identical_share']:.1%})")
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
