"""torch on the CPU, issue 30 item 5: can oneDNN's matmul or a wider GEMM beat MKL's small-M sgemm in the decode step?

MKL's sgemm for M = 1..16 rows took 77% of the torch backend's decode step (profile_decode_cpu_b16.json). This
trial times, on the default model's shapes (SmolLM2-135M: hidden 576, MLP 1536, q 576, k/v 192 each, 30 layers):

1. per projection and M: torch's F.linear (MKL sgemm) against oneDNN's linear on a weight packed once for it
   (torch.ops.mkldnn._linear_pointwise after _reorder_linear_weight, what inductor emits with freezing);
2. a batched-GEMM layout: q, k, v as one [576, 960] GEMM and gate, up as one [576, 3072] (what the gqa export
   does), against the separate GEMMs, with MKL and with oneDNN;
3. the whole decode step at 16 slots: the torch backend eager, and its model compiled by inductor with freezing
   (oneDNN packed linears), with the tokens of both compared.

Nothing here is for a loaded machine: run it alone (`one-at-a-time` free), e.g.

    python benchmarks/cpu_matmul_trial.py --threads 2 --output benchmarks/results/cpu_matmul_trial.json

If neither reaches the 1.8x over hf-embeds the issue asks for, the JSON shows which part of the step stays.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

# (name, in, out): the projections of one SmolLM2-135M layer, and the head.
SHAPES = [("q", 576, 576), ("k", 576, 192), ("v", 576, 192), ("o", 576, 576), ("gate", 576, 1536),
          ("up", 576, 1536), ("down", 1536, 576)]  # fmt: skip
FUSED = [("qkv", 576, 960), ("gate_up", 576, 3072)]


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def linears(rows: list[int], repeats: int) -> list[dict]:
    """Per shape and M: MKL (F.linear) and oneDNN (packed weight) times, and their largest difference."""
    import torch
    import torch.nn.functional as F

    out = []
    for name, k, n in SHAPES + FUSED:
        weight = torch.randn(n, k) * 0.02
        for m in rows:
            x = torch.randn(m, k)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, m)
            mkl = _median_ms(lambda x=x, w=weight: F.linear(x, w), repeats)
            onednn = _median_ms(
                lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), repeats
            )
            diff = (
                (F.linear(x, weight) - torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")).abs().max()
            )
            out.append({"shape": name, "k": k, "n": n, "m": m, "mkl_ms": mkl, "onednn_ms": onednn,
                        "max_abs_diff": float(diff)})  # fmt: skip
    return out


def layouts(rows: list[int], repeats: int) -> list[dict]:
    """Separate q, k, v and gate, up GEMMs against one wider GEMM each (the batched layout), per M."""
    import torch
    import torch.nn.functional as F

    out = []
    for m in rows:
        x = torch.randn(m, 576)
        parts = {name: torch.randn(n, k) * 0.02 for name, k, n in SHAPES}
        qkv = torch.cat([parts["q"], parts["k"], parts["v"]])
        gate_up = torch.cat([parts["gate"], parts["up"]])
        apart = [parts[p] for p in ("q", "k", "v", "gate", "up")]
        separate = _median_ms(lambda x=x, ws=apart: [F.linear(x, w) for w in ws], repeats)
        fused = _median_ms(lambda x=x, a=qkv, b=gate_up: (F.linear(x, a), F.linear(x, b)), repeats)
        out.append({"m": m, "separate_ms": separate, "fused_ms": fused})
    return out


def decode_step(model_name: str, slots: int, repeats: int, backend: str = "inductor") -> dict:
    """The torch backend's decode step at `slots` rows, eager against inductor with freezing (oneDNN linears)."""
    import numpy as np
    import torch

    from softtool.models import load_model, load_tokenizer
    from softtool.prompts.template import Template
    from softtool.runtime.torch_backend import TorchGenerator

    model, tokenizer = load_model(model_name), load_tokenizer(model_name)
    generator = TorchGenerator(model, tokenizer, Template.parse("[P:20]English: {source}\nGerman:"),
                               model.get_input_embeddings().weight[:20].detach().clone())  # fmt: skip
    rows = [[list(range(1000 + i, 1020 + i))] for i in range(slots)]
    ids = generator.row_ids(rows, [0] * slots)
    generator.reserve(slots, 128)
    generator.prefill(list(range(slots)), ids, [0] * slots)
    tokens = np.full(slots, 1000, dtype=np.int64)
    positions = np.asarray([len(r) for r in ids], dtype=np.int64)
    eager_head = generator.step(tokens, positions)[0]
    eager = _median_ms(lambda: generator.step(tokens, positions), repeats)
    import torch._inductor.config as inductor

    inductor.freezing = True  # weights become constants: inductor packs them for oneDNN's linear
    compiled = torch.compile(generator.slot_lm, backend=backend)
    generator.slot_lm = compiled
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled_head = generator.step(tokens, positions)[0]
    compile_s = time.perf_counter() - t0
    frozen = _median_ms(lambda: generator.step(tokens, positions), repeats)
    return {"slots": slots, "compile_backend": backend, "eager_ms": eager, "inductor_freezing_ms": frozen, "compile_s": compile_s,
            "same_argmax": bool((eager_head.argmax(-1) == compiled_head.argmax(-1)).all()),
            "max_abs_logit_diff": float(np.abs(eager_head - compiled_head).max())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4,8,16", help="M values of the GEMMs (decode rows)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--skip-step", action="store_true", help="only the GEMMs (no model)")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of the step (a test: eager)"
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    from softtool.threads import configure_threads

    configure_threads(args.threads)
    import torch

    rows = [int(m) for m in args.rows.split(",")]
    result = {
        "benchmark": "cpu_matmul_trial",
        "machine": {
            "processor": platform.processor(),
            "threads": args.threads,
            "torch": torch.__version__,
            "mkldnn": torch.backends.mkldnn.is_available(),
        },  # fmt: skip
        "linears": linears(rows, args.repeats),
        "layouts": layouts(rows, args.repeats),
    }
    if not args.skip_step:
        result["decode_step"] = decode_step(args.model, max(rows), max(1, args.repeats // 10), args.compile_backend)
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
