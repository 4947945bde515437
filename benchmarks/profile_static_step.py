"""Where a static decode step's time goes, per slot bucket: the device work of one step (the captured graph's
replay, timed with CUDA events over many replays) against the whole step as the engine runs it (replay, the
one pinned copy of its result and the wait for it), for the PyTorch backend and an ONNX export. The difference
is host time: launching, Python, ONNX Runtime's run call, the copy's round trip.

    python benchmarks/profile_static_step.py --model MODEL --device cuda --output profile.json

Runs every slot idle (positions at the scratch column), so attention spans the whole capacity: an upper bound
of a busy step's attention, the same work for every backend. On the CPU (no events) only the whole step is
timed.
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


def profile(generator, slots: int, capacity: int, repeats: int) -> list[dict]:
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
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    from softtool.export.onnx import ExportOptions, export_adapters
    from softtool.runtime import load_generator

    dtype = "float16" if args.device == "cuda" else "float32"
    result = {"model": args.model, "device": args.device, "dtype": dtype, "slots": args.slots, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = _adapter(args.model, Path(tmp))
        for name in args.backends.split(","):
            if name == "torch":
                generator = load_generator(str(adapter), "torch", device=args.device, dtype=dtype)
            else:
                dtype_export = "fp16" if args.device == "cuda" else "fp32"
                options = ExportOptions(device=args.device, dtype=dtype_export, verify=False)
                meta = export_adapters([str(adapter)], Path(tmp) / "export", options)
                generator = load_generator(str(Path(tmp) / "export"), "onnx", device=args.device)
                result["export_form"] = meta.kv_layout
            t0 = time.perf_counter()
            rows = profile(generator, args.slots, args.capacity, args.repeats)
            result["backends"][name] = {
                "buckets": rows,
                "capture_s": generator.capture_seconds,
                "wall_s": time.perf_counter() - t0,
            }
            for r in rows:
                print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
