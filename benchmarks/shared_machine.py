"""Does `softtool eval` behave on a shared machine? Wall time of an eval with default threads, alone and
next to other work, for each thread policy (softtool.threads) and backend.

Scenarios, each a `softtool eval` subprocess (the real command, default --threads) timed from start to exit:
    alone   nothing else running
    busy    next to a process that keeps one core busy (a single-threaded pure-Python loop)
    pair    two evals started together (both timed)
The target (issue 13): with the default policy, `busy` and each eval of `pair` take at most 2.5x `alone`.

Variants (softtool.threads): SOFTTOOL_THREAD_POLICY=balanced (the default: torch's threads sleep, ONNX
Runtime's spin 50 us then sleep), passive (both sleep), spin (both libraries' defaults: the behaviour before
the policy), and balanced with --threads 1. One thread per available core unless --threads.

    ../shared/bin/one-at-a-time .venv/bin/python benchmarks/shared_machine.py \
        --output benchmarks/results/shared_machine.json

Run it on an otherwise quiet machine: its own busy loop is the only load it expects. The adapter is an
untrained prompt (vocabulary init; speed does not depend on training) for --model, and the onnx backend's
export is `softtool export` of it (fp32); both are made once under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from softtool.bench.limits import cpu_model, git_commit

REPO = Path(__file__).resolve().parents[1]
# name -> (environment, extra eval flags); "balanced" is the default policy (softtool.threads)
VARIANTS = {
    "balanced": ({"SOFTTOOL_THREAD_POLICY": "balanced"}, []),
    "passive": ({"SOFTTOOL_THREAD_POLICY": "passive"}, []),
    "spin": ({"SOFTTOOL_THREAD_POLICY": "spin"}, []),
    "threads1": ({"SOFTTOOL_THREAD_POLICY": "balanced"}, ["--threads", "1"]),
}
DEFAULT = "balanced"
TARGET = 2.5


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "SOFTTOOL_THREAD", "MKL_"))}
    env.pop("SOFTTOOL_THREADS", None)
    return {**env, **extra}


def prepare(workdir: Path, model: str, tokens: int, backends: list[str]) -> dict[str, Path]:
    """The adapter (untrained, vocabulary init) and, for the onnx backend, its fp32 export, made once."""
    adapter, export = workdir / "adapter", workdir / "onnx"
    if not (adapter / "softtool.json").is_file():
        import torch

        from softtool.adapter import Adapter, AdapterMeta, save_adapter
        from softtool.data import get_task
        from softtool.models import load_model
        from softtool.prompts.encoder import PromptConfig, initial_table

        torch.set_num_threads(1)
        base = load_model(model)
        embed = base.get_input_embeddings().weight
        template = str(get_task("translation", src="en", tgt="de").default_template(tokens))
        table = initial_table(PromptConfig(num_virtual_tokens=tokens, init="vocab"), embed, seed=0)
        meta = AdapterMeta(
            base_model=model,
            num_virtual_tokens=tokens,
            token_dim=embed.shape[1],
            vocab_size=embed.shape[0],
            template=template,
            task="translation",
            task_options={"src": "en", "tgt": "de"},
        )
        save_adapter(adapter, Adapter(table, meta), base.config)
    if "onnx" in backends and not (export / "softtool_export.json").is_file():
        cmd = [sys.executable, "-m", "softtool", "export", str(adapter), "-o", str(export), "--verify-steps", "4"]
        subprocess.run(cmd, check=True, env=_env({}), stdout=subprocess.DEVNULL)
    return {"torch": adapter, "onnx": export}


class Eval:
    """One `softtool eval` subprocess."""

    def __init__(self, path: Path, args: argparse.Namespace, variant: str, scratch: Path) -> None:
        env, extra = VARIANTS[variant]
        self.out = Path(tempfile.mkdtemp(dir=scratch, prefix="eval-"))
        cmd = [sys.executable, "-m", "softtool", "eval", str(path), "--data", str(args.data)]
        cmd += ["--limit", str(args.limit), "--output", str(self.out), "--quiet", *extra]
        self.stderr = open(self.out / "stderr.txt", "w")  # noqa: SIM115
        self.ended: float | None = None
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=_env(env), stdout=subprocess.DEVNULL, stderr=self.stderr)

    def poll(self) -> bool:
        """Whether it has exited; the first time it has, its wall time is taken."""
        if self.ended is None and self.proc.poll() is not None:
            self.ended = time.perf_counter()
        return self.ended is not None

    def result(self) -> dict[str, Any]:
        """Its row; an eval still running (past the deadline) is killed and has no wall time."""
        if self.ended is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()
        wall = None if self.ended is None else self.ended - self.started
        row: dict[str, Any] = {"wall_s": None if wall is None else round(wall, 2), "exit": self.proc.returncode}
        metrics = self.out / "metrics.json"
        if wall is not None and metrics.is_file():
            record = json.loads(metrics.read_text())
            row["generate_s"] = record.get("seconds")
            row["tokens_per_s"] = record.get("tokens_per_s")
        elif wall is not None:
            row["error"] = (self.out / "stderr.txt").read_text().strip().splitlines()[-1:]
        return row


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def run_scenario(kind: str, path: Path, args: argparse.Namespace, variant: str, scratch: Path) -> dict[str, Any]:
    busy = None
    if kind == "busy":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)  # busy before the eval starts
    load = _load()
    try:
        evals = [Eval(path, args, variant, scratch) for _ in range(2 if kind == "pair" else 1)]
        deadline = time.perf_counter() + args.timeout
        while not all([e.poll() for e in evals]) and time.perf_counter() < deadline:
            time.sleep(0.05)  # each eval's end is taken when it exits, not when the other one does
        rows = [e.result() for e in evals]
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return {"scenario": kind, "load_avg_1m_at_start": load, "runs": rows}


def _ratio(wall: float | None, alone: float | None, timeout: float) -> str | float | None:
    if alone is None:
        return None
    return f">{timeout / alone:.1f}" if wall is None else round(wall / alone, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "multi30k")
    parser.add_argument("--limit", type=int, default=8, help="examples per eval")
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--variants", default="balanced,passive,spin", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--scenarios", default="alone,busy,pair")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each default-policy scenario (median)")
    parser.add_argument("--repeats-others", type=int, default=1, help="runs of each other variant's scenario")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds before an eval is given up on")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "softtool" / "shared_machine")
    parser.add_argument("--output", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    if unknown := set(backends) - {"torch", "onnx"}:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))} (torch, onnx)")

    commit = git_commit(REPO)  # the code the evals run (taken before, as others may commit meanwhile)
    load_before = _load()
    paths = prepare(args.workdir, args.model, args.virtual_tokens, backends)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        for backend in backends:
            for variant in args.variants.split(","):
                for kind in args.scenarios.split(","):
                    for repeat in range(args.repeats if variant == DEFAULT else args.repeats_others):
                        row = run_scenario(kind, paths[backend], args, variant, Path(scratch))
                        row.update(backend=backend, variant=variant, repeat=repeat)
                        results.append(row)
                        walls = [r["wall_s"] for r in row["runs"]]
                        print(f"{backend:6} {variant:9} {kind:6} #{repeat}: wall {walls} s", flush=True)

    summary = summarize(results, args.timeout)
    for line in summary["table"]:
        print(line)
    record = {
        "benchmark": "shared_machine",
        "commit": commit,
        "command": shlex.join([Path(sys.executable).name, "benchmarks/shared_machine.py", *argv]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "load_avg_1m_before": load_before,
        },
        "workload": {
            "eval": f"softtool eval PATH --data {args.data.name} --limit {args.limit} --quiet (default --threads)",
            "model": args.model,
            "virtual_tokens": args.virtual_tokens,
            "busy": f"{Path(sys.executable).name} -c 'while True: pass'",
            "timeout_s": args.timeout,
        },
        "target": f"busy and each pair eval within {TARGET}x alone, default policy ({DEFAULT})",
        "summary": summary["ratios"],
        "runs": results,
    }
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


def _median(values: list[float | None]) -> float | None:
    """Median where a timed-out run (None) counts as the slowest."""
    ordered = sorted(values, key=lambda v: (v is None, v or 0.0))
    return ordered[len(ordered) // 2] if ordered else None


def summarize(results: list[dict[str, Any]], timeout: float) -> dict[str, Any]:
    """Median wall time per backend/variant/scenario; ratios to the variant's own and the default's eval alone."""
    walls: dict[tuple[str, str, str], list[float | None]] = {}
    for row in results:
        for i, run in enumerate(row["runs"]):
            key = (row["backend"], row["variant"], row["scenario"] + (f"[{i}]" if row["scenario"] == "pair" else ""))
            walls.setdefault(key, []).append(run["wall_s"])
    ratios: dict[str, Any] = {}
    table = [f"{'backend':8}{'variant':10}{'scenario':10}{'wall s':>9}{'x alone':>9}{'x default alone':>17}"]
    for (backend, variant, kind), values in walls.items():
        wall = _median(values)
        own = _median(walls.get((backend, variant, "alone"), []))
        default = _median(walls.get((backend, DEFAULT, "alone"), []))
        entry = {
            "wall_s": wall,
            "x_alone": _ratio(wall, own, timeout),
            "x_default_alone": _ratio(wall, default, timeout),
        }
        ratios.setdefault(backend, {}).setdefault(variant, {})[kind] = entry
        shown = "timeout" if wall is None else f"{wall:.1f}"
        table.append(
            f"{backend:8}{variant:10}{kind:10}{shown:>9}{entry['x_alone']!s:>9}{entry['x_default_alone']!s:>17}"
        )
    return {"ratios": ratios, "table": table}


if __name__ == "__main__":
    raise SystemExit(main())
