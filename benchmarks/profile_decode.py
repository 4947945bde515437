"""Where one batch of greedy decoding goes: softtool's torch backend against transformers' generate.

    python benchmarks/profile_decode.py --adapter runs/de --data ../shared/data/multi30k \\
        [--device cuda --dtype float16] [--batch 16 --new-tokens 32] [--json out.json]

For each of `hf` (transformers, text only) and `torch` (softtool, with the soft prompt), on the same
batch of the bench workload: the wall time of one `generate`; the time inside the model's forward (a
device sync around each call) and, for softtool, inside the C++ search step; and torch.profiler's
operator totals (self CPU time, and self CUDA time on a GPU). The CPU comparison of `torch` and `hf` in
docs/bench.md comes from this script; results/gpu_profile_h200.txt came from an uncommitted earlier
form of it (the same measurements) run on the lent H200.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections import defaultdict
from pathlib import Path


def _timed(store: dict, name: str, fn, sync):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        store[name] = store.get(name, 0.0) + time.perf_counter() - start
        store[name + "_calls"] = store.get(name + "_calls", 0) + 1
        return out

    return wrapper


def profile_backend(name, options, workload, rows, sync) -> dict:
    from torch.profiler import ProfilerActivity, profile

    import softtool.runtime.torch_backend as torch_backend
    from softtool.bench.backends import BACKENDS

    backend = BACKENDS[name](options, workload)
    backend.load()
    model = backend.model if name == "hf" else backend.generator.model
    backend.generate(rows, options.max_new_tokens)  # warm up
    sync()
    start = time.perf_counter()
    outputs = backend.generate(rows, options.max_new_tokens)
    sync()
    wall = time.perf_counter() - start

    parts: dict = {}
    forward = model.forward
    model.forward = _timed(parts, "forward_s", forward, sync)
    search = torch_backend._search
    if name == "torch" and search is not None:
        make = search.make_search

        class TimedSearch:  # the C++ searcher with its step timed
            def __init__(self, opts):
                self._inner = make(opts)
                self.step = _timed(parts, "search_step_s", self._inner.step, sync)

            def __getattr__(self, attr):
                return getattr(self._inner, attr)

        torch_backend._search = type("TimedModule", (), {"make_search": staticmethod(TimedSearch)})
    try:
        backend.generate(rows, options.max_new_tokens)
    finally:
        model.forward = forward
        torch_backend._search = search

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if options.device != "cpu" else [])
    with profile(activities=activities) as prof:
        backend.generate(rows, options.max_new_tokens)
    ops = defaultdict(lambda: {"self_cpu_ms": 0.0, "self_device_ms": 0.0, "calls": 0})
    for event in prof.key_averages():
        op = ops[event.key]
        op["self_cpu_ms"] += event.self_cpu_time_total / 1e3
        op["self_device_ms"] += getattr(event, "self_device_time_total", 0) / 1e3
        op["calls"] += event.count
    top = sorted(ops.items(), key=lambda kv: -kv[1]["self_cpu_ms"])[:15]
    del backend
    return {
        "backend": name,
        "wall_s": wall,
        "generated_tokens": sum(len(o) for o in outputs),
        **parts,
        "profile_self_cpu_ms": sum(o["self_cpu_ms"] for o in ops.values()),
        "profile_self_device_ms": sum(o["self_device_ms"] for o in ops.values()),
        "top_ops": [{"op": k, **v} for k, v in top],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="trained prompt folder (translation)")
    parser.add_argument("--data", required=True, help="Multi30k folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)

    import torch

    from softtool.bench.limits import machine_info
    from softtool.bench.measure import set_threads
    from softtool.bench.options import BenchOptions
    from softtool.bench.workload import build_workload
    from softtool.models import load_model, load_tokenizer

    options = BenchOptions(
        task="translation",
        data=args.data,
        limit=args.batch,
        batch_size=args.batch,
        max_new_tokens=args.new_tokens,
        adapter=args.adapter,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        backends=["hf", "torch"],
    )
    set_threads(args.threads)
    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)
    workload = build_workload(options, load_model(args.model), load_tokenizer(args.model))
    rows = range(args.batch)
    results = [profile_backend(name, options, workload, rows, sync) for name in ("hf", "torch")]
    for r in results:
        parts = ", ".join(f"{k} {r[k]:.3f}" for k in ("forward_s", "search_step_s") if k in r)
        print(f"{r['backend']}: {r['wall_s']:.3f} s for {r['generated_tokens']} tokens; {parts}")
        for op in r["top_ops"][:8]:
            print(
                f"    {op['op']:<24} {op['self_cpu_ms']:9.1f} ms cpu {op['self_device_ms']:8.1f} ms device {op['calls']:7d}"
            )
    if args.json:
        record = {
            "command": "python benchmarks/profile_decode.py " + " ".join(argv or __import__("sys").argv[1:]),
            "machine": machine_info(args.threads),
            "options": vars(args) | {"json": str(args.json)},
            "results": results,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
