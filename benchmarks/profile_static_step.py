"""Where a static decode step's time goes, per slot bucket: the device work of one step (the captured graph's
replay, timed with CUDA events over many replays) against the whole step as the engine runs it (replay, the
one pinned copy of its result and the wait for it), for the PyTorch backend and an ONNX export. The difference
is host time: launching, Python, ONNX Runtime's run call, the copy's round trip.

    python benchmarks/profile_static_step.py --model MODEL --device cuda --output profile.json
    # issue 30: a 100-token prompt, kernels per step and per layer, both compile modes, the prefill
    python benchmarks/profile_static_step.py --model MODEL --device cuda --virtual-tokens 100 --kernels \
        --compile-modes default,max-autotune-no-cudagraphs --prefill --output profile.json

Runs every slot idle (positions at the scratch column), so attention spans the whole capacity: an upper bound
of a busy step's attention, the same work for every backend. On the CPU (no events) only the whole step is
timed. --kernels counts the CUDA kernels of one step (torch.profiler, the captured graph's kernels included)
per bucket, per layer, and by name (the most frequent: what is left to fuse). --compile-modes profiles the
torch row once per torch.compile mode ("eager": uncompiled), each under softtool's own CUDA graph capture.
--prefill times one row's prefill (its text after the shared prompt, --text-tokens long) exact and bucketed
(captured on cuda), device time and wall time: the time to first token but for the search.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _adapter(model_name: str, folder: Path, n: int = 20) -> Path:
    """An untrained prompt (rows of the vocabulary) for `model_name`, saved as an adapter."""
    import torch

    from softtool.adapter import Adapter, AdapterMeta, save_adapter
    from softtool.models import load_model

    model = load_model(model_name)
    embed = model.get_input_embeddings().weight
    torch.manual_seed(0)
    table = embed[torch.randint(0, 5000, (n,))].detach().clone()
    meta = AdapterMeta(
        base_model=model_name,
        num_virtual_tokens=n,
        token_dim=table.shape[1],
        vocab_size=embed.shape[0],
        template=f"[P:{n}]English: {{source}}\nGerman:",
        task="translation",
        task_options={"src": "en", "tgt": "de"},
    )
    return save_adapter(folder / "prompt", Adapter(table, meta))


def kernel_counts(run, num_layers: int, repeats: int = 5) -> dict:
    """The CUDA kernels of one call of `run` (mean over `repeats`): in all, per layer, and the most frequent names."""
    from collections import Counter

    import torch
    from torch.profiler import ProfilerActivity, profile

    run()  # settled: nothing below is a first call
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    names = Counter(
        e.name
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    )
    total = sum(names.values()) / repeats
    return {
        "kernels_per_step": total,
        "kernels_per_layer": total / num_layers,
        "top_kernels": {name[:120]: n / repeats for name, n in names.most_common(15)},
    }


def profile_prefill(generator, text_tokens: int, repeats: int) -> dict:
    """One row's prefill (text of `text_tokens` ids after the task's prompt) into slot 0: exact and bucketed."""
    import torch

    row = generator.row_ids([[list(range(1000, 1000 + text_tokens))]], [0])[0]
    out = {"text_tokens": text_tokens, "row_tokens": len(row)}
    cuda = generator.kv_device.type == "cuda"
    for shape in ("exact", "buckets"):
        buckets = shape == "buckets"

        def run(buckets=buckets):
            generator.prefill([0], [row], [0], buckets=buckets)

        with generator.stream_context():
            for _ in range(3):
                run()
            entry = {}
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeats):
                    run()
                end.record()
                end.synchronize()
                entry["device_and_host_ms"] = start.elapsed_time(end) / repeats
            walls = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                walls.append((time.perf_counter() - t0) * 1000)
            entry["wall_ms"] = statistics.median(walls)
        out[shape] = entry
    return out


def profile(generator, slots: int, capacity: int, repeats: int, kernels: bool = False) -> list[dict]:
    import torch

    st = generator.static_slots(slots, capacity)
    cuda = generator.kv_device.type == "cuda"
    rows = []
    for bucket in st.buckets:
        entry = {"bucket": bucket}
        with generator.stream_context():
            for _ in range(5):
                generator.static_step(st, bucket, True)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(st.stream)
                for _ in range(repeats):
                    st.steps[bucket]()
                end.record(st.stream)
                end.synchronize()
                entry["device_ms"] = start.elapsed_time(end) / repeats
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            generator.static_step(st, bucket, True)
            walls.append((time.perf_counter() - t0) * 1000)
        entry["step_ms"] = statistics.median(walls)
        if "device_ms" in entry:
            entry["host_ms"] = entry["step_ms"] - entry["device_ms"]
        if kernels and cuda:
            with generator.stream_context():
                entry.update(kernel_counts(st.steps[bucket], generator.num_layers))
        rows.append(entry)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--capacity", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--virtual-tokens", type=int, default=20, help="the untrained prompt's length")
    parser.add_argument("--kernels", action="store_true", help="count the CUDA kernels of a step (cuda)")
    parser.add_argument(
        "--compile-modes",
        default=None,
        help="torch row once per torch.compile mode, comma-separated (eager: uncompiled); default: the backend's own",
    )
    parser.add_argument("--prefill", action="store_true", help="time one row's prefill, exact and bucketed")
    parser.add_argument("--text-tokens", type=int, default=24, help="the prefilled row's text length (--prefill)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    from softtool.export.onnx import ExportOptions, export_adapters
    from softtool.runtime import load_generator

    dtype = "float16" if args.device == "cuda" else "float32"
    result = {"model": args.model, "device": args.device, "dtype": dtype, "slots": args.slots, "backends": {}}
    result["virtual_tokens"] = args.virtual_tokens
    rows = []
    for name in args.backends.split(","):
        modes = (args.compile_modes or "").split(",") if name == "torch" and args.compile_modes else [None]
        rows += [(name, mode) for mode in modes]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = _adapter(args.model, Path(tmp), args.virtual_tokens)
        for name, mode in rows:
            if name == "torch":
                kwargs = {}
                if mode == "eager":
                    kwargs["compile_step"] = False
                elif mode is not None:
                    kwargs["compile_mode"] = None if mode == "default" else mode
                generator = load_generator(str(adapter), "torch", device=args.device, dtype=dtype, **kwargs)
            else:
                dtype_export = "fp16" if args.device == "cuda" else "fp32"
                options = ExportOptions(device=args.device, dtype=dtype_export, verify=False)
                meta = export_adapters([str(adapter)], Path(tmp) / "export", options)
                generator = load_generator(str(Path(tmp) / "export"), "onnx", device=args.device)
                result["export_form"] = meta.kv_layout
            t0 = time.perf_counter()
            buckets = profile(generator, args.slots, args.capacity, args.repeats, args.kernels)
            label = f"{name} {mode}" if mode else name
            result["backends"][label] = {
                "buckets": buckets,
                "capture_s": generator.capture_seconds,
                "layers": generator.num_layers,
            }
            if name == "torch":
                result["backends"][label]["compile_mode"] = mode or "the backend's own"
            if args.prefill:
                result["backends"][label]["prefill"] = profile_prefill(generator, args.text_tokens, args.repeats)
            result["backends"][label]["wall_s"] = time.perf_counter() - t0
            for r in buckets:
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k != "top_kernels"}
                print(label, json.dumps(shown), flush=True)
            if args.prefill:
                print(label, "prefill", json.dumps(result["backends"][label]["prefill"]), flush=True)
            if args.output:  # after every row: a run cut short by its time limit keeps the rows it finished
                Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
