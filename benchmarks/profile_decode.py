"""Where greedy decoding of a data set goes: softtool's engine (torch or onnx backend) against transformers.

    python benchmarks/profile_decode.py --adapter runs/de --data ../shared/data/multi30k --limit 128 \\
        [--backends hf,torch,onnx] [--onnx-dir runs/de-onnx] [--slots 16] [--no-continuous] [--json out.json]

For `hf` (transformers' generate, text only, static batches of --slots) it times `generate` and the model's
forward calls. For softtool's backends it times the whole `generate` and splits it into the backend's
forward calls at prefill (rows entering slots) and at decode steps (one token for every busy slot), the
C++ search steps, and the rest (Python bookkeeping, cache copies at admission); it also counts the rows
and tokens each kind of forward processed. With --ops N, a second, untimed pass of the torch backend runs
under torch.profiler and its N costliest operators (self CPU time) are recorded.

`torch-compiled` is the torch backend with its forward under torch.compile (dynamic shapes, --compile-backend):
its warm-up over the first --slots rows includes the compilation and is timed on its own (`first_call_s`), and
its outputs are compared with the torch row's. On the CPU it lost: it recompiles as the slot count and prefill
widths change, and after a 9.5 min compile it decoded 64 Multi30k sentences at 16 slots 9.4x slower than eager
(benchmarks/results/archive/torch_compile_cpu.json), so the product keeps it off there.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.tokens: dict[str, int] = {}

    def wrap(self, name: str, fn, count=None):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.calls[name] = self.calls.get(name, 0) + 1
            if count is not None:
                rows, tokens = count(*args, **kwargs)
                self.rows[name] = self.rows.get(name, 0) + rows
                self.tokens[name] = self.tokens.get(name, 0) + tokens
            return out

        return timed

    def report(self) -> dict:
        return {
            name: {
                "seconds": round(s, 3),
                "calls": self.calls[name],
                **({"rows": self.rows[name], "tokens": self.tokens[name]} if name in self.rows else {}),
            }
            for name, s in self.seconds.items()
        }


def _softtool(gen, rows, options, engine) -> tuple[float, list, dict]:
    import softtool.runtime.decode as decode

    clock = _Clock()
    gen.prefill = clock.wrap(
        "prefill",
        gen.prefill,
        lambda slots, rs, tasks, **_: (len(rs), sum(len(r) for r in rs) - gen.num_virtual * len(rs)),
    )
    gen.step = clock.wrap("decode_step", gen.step, lambda tokens, positions: (len(tokens), len(tokens)))
    make = decode._search.make_slot_search

    def make_timed(*args, **kwargs):
        search = make(*args, **kwargs)

        class Timed:
            def __getattr__(self, name):
                return getattr(search, name)

        timed = Timed()
        timed.step = clock.wrap("search_step", search.step)
        timed.step_topk = clock.wrap("search_step", search.step_topk)
        return timed

    decode._search.make_slot_search = make_timed
    try:
        start = time.perf_counter()
        out = gen.generate(rows, None, options, engine)
        wall = time.perf_counter() - start
    finally:
        decode._search.make_slot_search = make
    return wall, out, clock.report()


def _hf(model, texts, options, slots, pad) -> tuple[float, list, dict]:
    import torch

    clock = _Clock()
    forward = model.forward
    model.forward = clock.wrap("forward", forward)
    out = []
    start = time.perf_counter()
    for lo in range(0, len(texts), slots):
        batch = texts[lo : lo + slots]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in batch])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch])
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=options.max_new_tokens,
                do_sample=False,
                eos_token_id=options.eos_token_ids,
                pad_token_id=pad,
            )
        out += [[seq[width:].tolist()] for seq in gen]
    wall = time.perf_counter() - start
    model.forward = forward
    return wall, out, clock.report()


def _operators(gen, rows, options, engine, top: int) -> list[dict]:
    """The costliest operators (self CPU time) of one more generate over `rows`, under torch.profiler."""
    import torch

    with torch.profiler.profile() as prof:
        gen.generate(rows, None, options, engine)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "name": e.key,
            "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2),
            "share": round(e.self_cpu_time_total / total, 4),
            "calls": e.count,
        }
        for e in events[:top]
    ]


def _compiled(torch_gen, backend: str):
    """A second torch generator over the same model and prompt, its forward under torch.compile."""
    import torch

    from softtool.runtime.torch_backend import TorchGenerator

    gen = TorchGenerator(torch_gen.model, torch_gen.tokenizer, torch_gen.template, torch_gen.table, torch_gen.meta)
    gen.slot_lm = torch.compile(gen.slot_lm, dynamic=True, backend=backend)
    return gen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--data", required=True, help="a Multi30k folder: its val.en.gz is read")
    parser.add_argument("--limit", type=int, default=128)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--backends", default="hf,torch,onnx", help="of hf, torch, torch-compiled, onnx")
    parser.add_argument("--onnx-dir", default=None)
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend for torch-compiled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-continuous", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--ops", type=int, default=0, help="record the torch backend's N costliest operators")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    if unknown := set(backends) - {"hf", "torch", "torch-compiled", "onnx"}:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    if "onnx" in backends and not args.onnx_dir:
        parser.error("the onnx backend needs --onnx-dir (an export of the adapter)")

    from softtool.threads import configure_threads

    configure_threads(args.threads)
    from softtool.runtime.decode import EngineOptions
    from softtool.runtime.torch_backend import TorchGenerator
    from softtool.search import SearchOptions

    torch_gen = TorchGenerator.from_adapter(args.adapter)
    tok = torch_gen.tokenizer
    with gzip.open(Path(args.data) / "val.en.gz", "rt") as fh:
        sources = [line.strip() for _, line in zip(range(args.limit), fh, strict=False)]
    rows = [torch_gen.encode({"source": s}) for s in sources]
    options = SearchOptions(
        max_new_tokens=args.max_new_tokens, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id
    )
    engine = EngineOptions(slots=args.slots, continuous=not args.no_continuous)
    results, outputs = {}, {}
    for name in backends:
        first_call = None
        if name == "hf":
            texts = [[t for piece in row for t in piece] for row in rows]
            _hf(torch_gen.model, texts[:2], options, args.slots, tok.pad_token_id)  # warm-up
            wall, out, parts = _hf(torch_gen.model, texts, options, args.slots, tok.pad_token_id)
            eos = tok.eos_token_id
            useful = sum((o[0].index(eos) + 1) if eos in o[0] else len(o[0]) for o in out)
        else:
            gen = torch_gen
            if name == "onnx":
                from softtool.runtime.onnx_backend import OnnxGenerator

                gen = OnnxGenerator.from_export_dir(args.onnx_dir, threads=args.threads)
            if name == "torch-compiled":
                gen = _compiled(torch_gen, args.compile_backend)
                start = time.perf_counter()
                gen.generate(rows[: args.slots], None, options, engine)  # warm-up: every slot busy, compiled
                first_call = time.perf_counter() - start
            else:
                gen.generate(rows[:2], None, options, engine)  # warm-up
            wall, out, parts = _softtool(gen, rows, options, engine)
            useful = sum(len(o[0]) + (len(o[0]) < args.max_new_tokens) for o in out)
        outputs[name] = out
        accounted = sum(p["seconds"] for p in parts.values())
        results[name] = {
            "wall_s": round(wall, 3),
            "useful_tokens": useful,
            "tokens_per_s": round(useful / wall, 1),
            "parts": parts,
            "other_s": round(wall - accounted, 3),
        }
        if first_call is not None:
            results[name]["first_call_s"] = round(first_call, 3)
            if "torch" in outputs:
                results[name]["outputs_equal_to_torch"] = out == outputs["torch"]
        if name == "torch" and args.ops:
            results[name]["ops"] = _operators(gen, rows, options, engine, args.ops)
        print(name, json.dumps(results[name]), flush=True)
    if args.json:
        from softtool.bench.limits import machine_info

        record = {"args": vars(args), "machine": machine_info(args.threads), "results": results}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
