"""Where an ONNX graph spends its time: an ONNX Runtime profile summed by operator type.

Profile any softtool run that uses ONNX Runtime by setting SOFTTOOL_ORT_PROFILE to a file prefix; each
session then writes PREFIX_<date>.json when it ends. For example one decoding pass of the bench workload:

    SOFTTOOL_ORT_PROFILE=/tmp/ort softtool bench --config benchmarks/configs/translation.json \\
        --backends onnx-int8 --no-isolate --no-limits --limit 16 --warmup 0
    python benchmarks/ort_profile.py /tmp/ort_*.json [--json out.json]

Prints, per profile, the number of session runs, their total time, and the share of kernel time each
operator type takes (MatMulNBits, MatMul, attention ops, ...).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def summarize(path: Path) -> dict:
    events = json.loads(path.read_text())
    by_op: dict[str, float] = defaultdict(float)
    runs = []
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_op[e["args"].get("op_name", "?")] += e["dur"]
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append(e["dur"])
    total = sum(by_op.values()) or 1.0
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {
        "profile": str(path),
        "model_runs": len(runs),
        "model_run_ms_total": sum(runs) / 1e3,
        "kernel_ms_total": total / 1e3,
        "ops": [{"op": op, "ms": us / 1e3, "share": us / total} for op, us in ops],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", type=Path, help="ONNX Runtime profile JSON files")
    parser.add_argument("--json", type=Path, help="also write the summaries here")
    parser.add_argument("--top", type=int, default=8, help="operator types to print per profile")
    args = parser.parse_args(argv)
    summaries = [summarize(p) for p in args.profiles]
    for s in summaries:
        print(
            f"{s['profile']}: {s['model_runs']} runs, {s['model_run_ms_total']:.0f} ms in run(), "
            f"{s['kernel_ms_total']:.0f} ms in kernels"
        )
        for op in s["ops"][: args.top]:
            print(f"  {op['op']:<28} {op['ms']:9.1f} ms  {op['share']:6.1%}")
    if args.json:
        from softtool.bench.limits import cpu_model, git_commit

        record = {"machine": {"cpu_model": cpu_model(), "git_commit": git_commit()}, "profiles": summaries}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
