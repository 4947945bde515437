"""The full benchmark run behind docs/bench.md, as one command (run it on a quiet machine):

    python benchmarks/run_all.py            # every generation config, the training comparison, then the tables
    python benchmarks/run_all.py --quick    # fewer examples and steps (minutes instead of an hour on 2 cores)
    python benchmarks/run_all.py --adapter translation=runs/de   # a trained prompt for one task's configs
    python benchmarks/run_all.py --adapter classify=runs/sst2    # adds classify_sst2 (it needs a trained prompt)

Each run writes benchmarks/results/bench_<config>.json (+ .png), and the training comparison on --train-config's
workload bench_train_<that config>.json; render_docs.py then renders every table that quotes them again
(`make docs`). --results and --root put the files and the rendered docs elsewhere. Extra arguments after `--` go to
every `softtool bench` call (e.g. `-- --adapter runs/de`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = ["translation", "translation_b1", "translation_beam4", "squad", "cnndm"]
# Configs that rank a trained classify prompt: run when --adapter classify=PATH names one.
CLASSIFY_CONFIGS = ["classify_sst2"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 examples per config, 5 training steps")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated config names")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="trained prompt for the configs of TASK (then their metric means something); repeatable",
    )
    parser.add_argument("--train-config", default="translation", help="the config of the training comparison")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="where the result files go")
    parser.add_argument("--root", type=Path, default=HERE.parent, help="whose README.md and docs/ are rendered")
    parser.add_argument("extra", nargs="*", help="arguments passed to every softtool bench call")
    args = parser.parse_args(argv)
    adapters = dict(a.split("=", 1) for a in args.adapter)
    if "classify" in adapters and args.configs == ",".join(CONFIGS):
        args.configs = ",".join(CONFIGS + CLASSIFY_CONFIGS)
    bench = [sys.executable, "-m", "softtool", "bench"]
    failed = []
    for name in args.configs.split(","):
        config = HERE / "configs" / f"{name}.json"
        cmd = [*bench, "--config", str(config), "--output", str(args.results / f"bench_{name}.json"), *args.extra]
        task = json.loads(config.read_text()).get("task")
        if task in adapters:
            cmd += ["--adapter", adapters[task]]
        if args.quick:
            cmd += ["--limit", "16" if name != "translation_b1" else "8"]
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=HERE.parent).returncode != 0:
            failed.append(name)
    train = [*bench, "--config", str(HERE / "configs" / f"{args.train_config}.json"), "--train"]
    train += ["--output", str(args.results / f"bench_train_{args.train_config}.json"), *args.extra]
    if args.quick:
        train += ["--steps", "5", "--warmup", "1"]
    print("+", " ".join(train), flush=True)
    if subprocess.run(train, cwd=HERE.parent).returncode != 0:
        failed.append("train")
    # Every table that quotes these files (docs/bench.md's and the README's), as `make docs` renders them.
    render = [sys.executable, str(HERE / "render_docs.py"), "--root", str(args.root), "--results", str(args.results)]
    if subprocess.run(render).returncode != 0:
        failed.append("render_docs")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
