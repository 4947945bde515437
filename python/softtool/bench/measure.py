"""Timing one backend on the workload: load, warm up, time to first token, timed passes, peak memory.

The unit of work is the data set: each timed pass hands the backend every example at once, and the backend
batches them its own way (softtool: continuous batching over `batch_size` slots; hf-cb: transformers'
continuous batching; peft and hf: static batches of `batch_size`, each run until its longest row ends).

Definitions (the same for every backend):
  tokens_per_s    useful tokens (each row's tokens up to and including its EOS) / timed wall time
  examples_per_s  examples / timed wall time
  ttft            latency of one batch with max_new_tokens=1 (prefill plus the first token), median over the
                  first `ttft_batches` batches
  prefill_tokens_per_s  input tokens (virtual ones included) of those batches / their summed ttft
  peak_rss_mb     the process's resident-memory high-water mark, a clean number only in its own process
  peak_gpu_mb     on cuda: PyTorch's peak allocated GPU memory for the torch and transformers rows; for the
                  ONNX rows the device memory in use after the run less before loading (ONNX Runtime's arena
                  keeps what it took, so this is its high-water mark plus torch's KV buffers), as
                  gpu_memory_source says
  load_s          loading weights and graphs (softtool: the static engine's CUDA-graph capture included)
  capture_s       of load_s, compiling (torch on cuda) and capturing softtool's static step per slot bucket
                  (once per engine)
  warmup_s        the untimed warm-up batches (transformers' static cache compiles its decode step here)
  row_steps_per_s static batches only (peft, hf, softtool with --no-continuous), greedy: rows x decode steps
                  each batch ran (finished rows included) / timed wall time, the engine's speed whatever the
                  outputs' lengths; None for continuous engines, where a slot never idles on a finished row

peft runs on the first `peft_limit` examples only (it is uncached and slow); its rates are per example, so
they compare with the others'. On cuda every `generate` returns token lists on the host, so each timed call
ends synchronized.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from softtool.bench.backends import BACKENDS, BackendUnavailable
from softtool.bench.options import BenchOptions
from softtool.bench.workload import Workload


def set_threads(threads: int) -> None:
    """Pin every library to the same thread count (ONNX Runtime backends read OMP_NUM_THREADS too)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["SOFTTOOL_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec, whereas ru_maxrss
    carries the forking parent's peak into the child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def examples_for(name: str, options: BenchOptions, workload: Workload) -> range:
    """The examples a backend generates for: all of them, except the slow PEFT rows (the first peft_limit)."""
    total = len(workload.rows)
    return range(min(total, options.peft_limit) if name.startswith("peft") else total)


def run_backend(name: str, options: BenchOptions, workload: Workload, isolated: bool) -> dict[str, Any]:
    """Measure one backend in this process; a skipped backend comes back with its reason."""
    set_threads(options.threads)
    if options.device != "cpu":
        import torch

        torch.cuda.reset_peak_memory_stats()  # in one process (--no-isolate), each backend's own peak
    backend = BACKENDS[name](options, workload)
    examples = examples_for(name, options, workload)
    batches = [b for b in workload.batches(options.batch_size) if b.start < examples.stop]
    gpu_before = _gpu_used_mb(options)
    start = time.perf_counter()
    try:
        backend.load()
        load_s = time.perf_counter() - start
        for idx in batches[: options.warmup]:
            backend.generate(idx, options.max_new_tokens)
    except BackendUnavailable as exc:
        return {"name": name, "status": "skipped", "reason": str(exc)}
    warmup_s = time.perf_counter() - start - load_s

    ttft = []
    for idx in batches[: options.ttft_batches]:
        t0 = time.perf_counter()
        backend.generate(idx, 1)
        ttft.append(time.perf_counter() - t0)
    # Plain transformers runs without the soft prompt, so its inputs are the text tokens only.
    input_rows = workload.rows if backend.uses_prompt else workload.text_rows
    ttft_tokens = sum(len(input_rows[i]) for idx in batches[: options.ttft_batches] for i in idx)

    passes, outputs = [], []
    for _ in range(options.repeats):
        t0 = time.perf_counter()
        out = backend.generate(examples, options.max_new_tokens)
        passes.append(time.perf_counter() - t0)
        outputs = out
    total = sum(passes)
    # Outputs exclude EOS; a row that stopped early did generate its EOS, so count it.
    tokens = sum(len(o) + (len(o) < options.max_new_tokens) for o in outputs)
    gpu_peak, gpu_source = None, None
    if options.device != "cpu" and name in ("onnx", "onnx-int8"):
        gpu_peak, gpu_source = _gpu_used_mb(options) - gpu_before, "device memory used after the run less before load"
    elif options.device != "cpu":
        import torch

        gpu_peak, gpu_source = torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    return {
        "name": name,
        "status": "ok",
        "examples": len(examples),
        "tokens_per_s": tokens * options.repeats / total,
        "examples_per_s": len(examples) * options.repeats / total,
        "generated_tokens": tokens,
        "pass_s": passes,
        "ttft_s": statistics.median(ttft),
        "prefill_tokens_per_s": ttft_tokens / sum(ttft),
        "input_tokens": sum(len(input_rows[i]) for i in examples),
        "load_s": load_s,
        "capture_s": backend.capture_seconds,
        "warmup_s": warmup_s,
        "timed_s": total,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_isolated": isolated,
        "peak_gpu_mb": gpu_peak,
        "gpu_memory_source": gpu_source,
        "static_batches": getattr(backend, "static_batches", True),
        "outputs": outputs,
    }


def _gpu_used_mb(options: BenchOptions) -> float:
    """Memory in use on the bench's GPU (every process's, every library's); 0 on the CPU."""
    if options.device == "cpu":
        return 0.0
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def row_steps_per_s(result: dict[str, Any], options: dict[str, Any]) -> float | None:
    """Decode row-steps per second of a greedy backend with static batches: every batch runs until its longest
    row ends, and its finished rows ride along, so rows x steps is the work done whatever the outputs say.
    tokens/s instead counts only the tokens up to each row's EOS. None for beam search (whose step count the
    outputs do not show) and for continuous engines (no finished row rides along)."""
    if result.get("status") != "ok" or options["num_beams"] != 1 or not result.get("static_batches", True):
        return None
    outputs, size, limit = result["outputs"], options["batch_size"], options["max_new_tokens"]
    work = 0
    for start in range(0, len(outputs), size):
        batch = outputs[start : start + size]
        # A row that stopped early spent one more step on its EOS.
        steps = max(min(len(o) + 1, limit) for o in batch)
        work += len(batch) * steps
    return work * options["repeats"] / result["timed_s"]


def workload_to_json(workload: Workload) -> dict[str, Any]:
    data = asdict(workload)
    data["adapter_dir"] = str(workload.adapter_dir)
    return data


def workload_from_json(data: dict[str, Any]) -> Workload:
    return Workload(**{**data, "adapter_dir": Path(data["adapter_dir"])})


def main(argv: list[str] | None = None) -> None:
    """Worker entry: `python -m softtool.bench.measure SPEC.json RESULT.json` runs one backend alone."""
    spec_path, result_path = (argv or sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text())
    options = BenchOptions(**spec["options"])
    result = run_backend(spec["backend"], options, workload_from_json(spec["workload"]), isolated=True)
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
