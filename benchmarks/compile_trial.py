"""torch.compile on softtool's torch backend (CPU): does it help the decode loop? Run once by hand:

    python benchmarks/compile_trial.py   (needs runs/de, a trained translation prompt, and ../shared/data)

Prints the eager time, the first compiled call (compilation included) and a compiled pass over 64 rows.
"""

import gzip, time, sys, torch
from softtool.threads import configure_threads

configure_threads(2)
from softtool.runtime.torch_backend import TorchGenerator
from softtool.runtime.decode import EngineOptions
from softtool.search import SearchOptions

g = TorchGenerator.from_adapter("runs/de")
tok = g.tokenizer
src = [l.strip() for l in gzip.open("/work/shared/data/multi30k/val.en.gz", "rt")][:64]
rows = [g.encode({"source": s}) for s in src]
opts = SearchOptions(max_new_tokens=64, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
base = g.generate(rows, None, opts)
t = time.perf_counter()
g.generate(rows, None, opts)
print("eager", time.perf_counter() - t, flush=True)
g.slot_lm = torch.compile(g.slot_lm, dynamic=True)
t = time.perf_counter()
out = g.generate(rows[:16], None, opts)
print("compile+first", time.perf_counter() - t, flush=True)
t = time.perf_counter()
out = g.generate(rows, None, opts)
print("compiled", time.perf_counter() - t, out == base, flush=True)
