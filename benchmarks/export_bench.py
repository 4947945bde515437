"""Measure an export end to end on SmolLM2 (or --model): export time, parity with PyTorch, and greedy tokens/s
onnx vs torch.

    python benchmarks/export_bench.py --device cpu --out benchmarks/results/export_smollm2.json
    python benchmarks/export_bench.py --device cuda --dtypes fp32,fp16 --out benchmarks/results/export_smollm2_cuda.json

The prompt is softtool's default vocabulary init (softtool.prompts.encoder.initial_table), so the numbers do
not depend on a training run. Inputs are the first Multi30k validation sentences when ../shared/data is
there, else fixed sentences.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from softtool.bench.limits import cpu_model, git_commit

TEMPLATE = "[P:20]Translate English to German.\nEnglish: {source}\nGerman:"
FALLBACK = [
    "A man in an orange hat starring at something.",
    "A Boston Terrier is running on lush green grass.",
    "A girl in karate uniform breaking a stick with a front kick.",
    "Five people in winter jackets and helmets.",
]


def _sentences(count: int) -> tuple[list[str], str]:
    data = Path(os.environ.get("SOFTTOOL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = data / "multi30k" / "val.en.gz"
    if path.is_file():
        with gzip.open(path, "rt") as fh:
            return [next(fh).strip() for _ in range(count)], str(path)
    return (FALLBACK * count)[:count], "fixed sentences"


def _machine() -> dict:
    info = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "load_average_1m": os.getloadavg()[0]}
    try:
        info["gpu"] = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    return info


def _commit() -> str:
    return git_commit(Path(__file__).resolve().parents[1]) or "unknown"


def _timed_generate(gen, rows, options, repeats: int) -> tuple[list, float, int]:
    gen.generate(rows[:1], None, options)  # warm-up (allocations, first-run kernels)
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = gen.generate(rows, None, options)
        best = min(best, time.perf_counter() - start)
    tokens = sum(len(seq) for item in out for seq in item)
    return out, best, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="the base model (a built-in name or a folder)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtypes",
        default="fp32,int8,int8:dynamic",
        help="comma-separated exports to measure: fp32, fp16, int8 (weight-only), int8:dynamic",
    )
    parser.add_argument("--batch", type=int, default=4, help="sentences generated together")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per backend (the best is kept)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads (default: cores)"
    )
    parser.add_argument("--out", type=Path, required=True)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    device, batch, max_new_tokens, repeats = args.device, args.batch, args.max_new_tokens, args.repeats

    from softtool.adapter import Adapter, AdapterMeta, save_adapter
    from softtool.export.onnx import ExportOptions, export_adapters
    from softtool.models import load_model
    from softtool.prompts.encoder import PromptConfig, initial_table
    from softtool.runtime.onnx_backend import OnnxGenerator
    from softtool.runtime.torch_backend import TorchGenerator
    from softtool.search import SearchOptions
    from softtool.threads import configure_threads

    threads = configure_threads(args.threads)
    model = load_model(args.model, device=device)
    table = initial_table(PromptConfig(num_virtual_tokens=20), model.get_input_embeddings())
    meta = AdapterMeta(
        base_model=args.model,
        num_virtual_tokens=20,
        token_dim=model.config.hidden_size,
        vocab_size=model.config.vocab_size,
        template=TEMPLATE,
    )
    sentences, source = _sentences(batch)
    options = SearchOptions(max_new_tokens=max_new_tokens, eos_token_ids=[2], pad_token_id=2)
    result = {
        "command": shlex.join(["python", "benchmarks/export_bench.py", *argv]),
        "commit": _commit(),
        "machine": _machine(),
        "threads": threads,
        "device": device,
        "model": args.model,
        "template": TEMPLATE,
        "inputs": source,
        "batch": batch,
        "max_new_tokens": max_new_tokens,
        "exports": {},
        "generation": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_adapter(Path(tmp) / "adapter", Adapter(table, meta), model.config)
        torch_gen = TorchGenerator.from_adapter(adapter, model=model, device=device)
        rows = [torch_gen.encode({"source": s}) for s in sentences]
        ref, seconds, tokens = _timed_generate(torch_gen, rows, options, repeats)
        result["generation"]["torch"] = {"seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds}
        for spec in args.dtypes.split(","):
            dtype, _, method = spec.partition(":")
            export_options = ExportOptions(device=device, dtype=dtype, int8_method=method or "weight-only")
            dtype = spec.replace(":", "-")
            start = time.perf_counter()
            export_meta = export_adapters([adapter], Path(tmp) / dtype, export_options)
            total = time.perf_counter() - start
            size = sum(p.stat().st_size for p in (Path(tmp) / dtype).glob("model.onnx*"))
            result["exports"][dtype] = {
                "export_seconds": export_meta.export_seconds,
                "total_seconds_with_verify": total,
                "model_bytes": size,
                "verification": export_meta.verification,
            }
            gen = OnnxGenerator.from_export_dir(Path(tmp) / dtype, device=device, threads=threads)
            got, seconds, tokens = _timed_generate(gen, rows, options, repeats)
            same = sum(a == b for a, b in zip(got, ref, strict=True))
            result["generation"][f"onnx-{dtype}"] = {
                "seconds": seconds,
                "new_tokens": tokens,
                "tokens_per_s": tokens / seconds,
                "sequences_equal_to_torch": f"{same}/{len(ref)}",
            }
    result["machine"]["load_average_1m_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["generation"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
