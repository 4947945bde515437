"""torch.compile on softtool's torch backend (CPU): does it help the decode loop?

    python benchmarks/compile_trial.py --adapter runs/de --data ../shared/data/multi30k

Times one eager pass over 64 Multi30k sentences (16 slots, 64 new tokens, greedy), then compiles the
backend's model (torch.compile, dynamic shapes) and times the first compiled call (compilation included)
and a compiled pass over the same rows. Result: benchmarks/results/torch_compile_cpu.json.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="runs/de")
    parser.add_argument("--data", default="../shared/data/multi30k")
    args = parser.parse_args()

    from softtool.threads import configure_threads

    configure_threads(2)
    import torch

    from softtool.runtime.torch_backend import TorchGenerator
    from softtool.search import SearchOptions

    gen = TorchGenerator.from_adapter(args.adapter)
    tok = gen.tokenizer
    with gzip.open(Path(args.data) / "val.en.gz", "rt") as fh:
        sources = [line.strip() for _, line in zip(range(64), fh, strict=False)]
    rows = [gen.encode({"source": s}) for s in sources]
    options = SearchOptions(max_new_tokens=64, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    eager = gen.generate(rows, None, options)  # warm-up and reference
    start = time.perf_counter()
    gen.generate(rows, None, options)
    print("eager", time.perf_counter() - start, flush=True)
    gen.slot_lm = torch.compile(gen.slot_lm, dynamic=True)
    start = time.perf_counter()
    gen.generate(rows[:16], None, options)
    print("compile and first 16 rows", time.perf_counter() - start, flush=True)
    start = time.perf_counter()
    compiled = gen.generate(rows, None, options)
    print("compiled", time.perf_counter() - start, "outputs equal:", compiled == eager, flush=True)


if __name__ == "__main__":
    main()
