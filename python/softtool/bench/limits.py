"""The machine a benchmark ran on, and its limits measured with the benchmark's own thread count.

Two probes bound what any backend can reach:
  memory bandwidth  a large float32 tensor copy; bytes read + written per second (batch-1 decoding reads
                    every weight once per token, so bandwidth / weight bytes is its tokens/s ceiling)
  matmul FLOP/s     a square float32 matrix multiply (prefill of a large batch is matmul-bound)
On cuda both run on the GPU (timed with CUDA events), the matmul in the bench's dtype.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(repo: Path | None = None) -> str | None:
    """The checkout's commit (-dirty with uncommitted changes, by provenance.tree_diff's rule: changes under
    benchmarks/results/ do not count, they are what the benchmarks write); SOFTTOOL_GIT_COMMIT where the tree has
    no git history (a copy sent to another machine)."""
    from softtool.bench.provenance import CHECKOUT, tree_diff

    repo = repo or CHECKOUT
    if os.environ.get("SOFTTOOL_GIT_COMMIT"):
        return os.environ["SOFTTOOL_GIT_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if tree_diff(repo) else "")


def machine_info(threads: int) -> dict[str, Any]:
    import psutil
    import torch

    versions = {}
    for pkg in ("softtool", "torch", "transformers", "peft", "onnxruntime", "onnx", "numpy"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        # The module imported, which may be onnxruntime-gpu placed ahead of an installed onnxruntime.
        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        providers = None
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "onnxruntime_providers": providers,
        "threads": threads,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": git_commit(),
    }


def _best_time(fn, repeats: int) -> float:
    fn()  # warm caches and thread pools
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes read plus written per second by a large float32 copy (best of `repeats`)."""
    import torch

    torch.set_num_threads(threads)
    n = megabytes * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _best_time(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / seconds


def matmul_flops(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """float32 FLOP/s of a square matrix multiply (2 n^3 per product, best of `repeats`)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    seconds = _best_time(lambda: torch.mm(a, b, out=out), repeats)
    return 2 * size**3 / seconds


def _cuda_time(fn, repeats: int) -> float:
    """Best seconds of `fn` on the GPU by CUDA events (host timers would time the launch only)."""
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def cuda_limits(device: str, dtype: str, quick: bool = False) -> dict[str, float]:
    """GPU memory bandwidth (a 1 GiB float32 copy) and `dtype` matmul FLOP/s (8192^3)."""
    import torch

    n = (256 if quick else 1024) * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * n * 4 / _cuda_time(lambda: dst.copy_(src), 10)
    size = 2048 if quick else 8192
    torch_dtype = getattr(torch, dtype)
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    flops = 2 * size**3 / _cuda_time(lambda: a @ b, 10)
    return {"memory_bandwidth_gbs": bandwidth / 1e9, "matmul_gflops": flops / 1e9}


def model_costs(model, bytes_per_param: int | None = None) -> dict[str, float]:
    """Bytes read per decoded token (all weights, tied ones once) and prefill FLOPs per input token;
    `bytes_per_param` counts the weights as they will be loaded (2 for float16) instead of as they are."""
    seen, weight_bytes, params = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        weight_bytes += p.numel() * (bytes_per_param or p.element_size())
        params += p.numel()
    embed = model.get_input_embeddings().weight.numel()
    # Prefill runs every layer matmul on every input token; the LM head only on the last one, and the
    # embedding is a lookup, so they are left out of the per-token cost.
    return {"weight_bytes": weight_bytes, "params": params, "prefill_flops_per_token": 2 * (params - embed)}


def measure_limits(
    threads: int,
    costs: dict[str, float] | None = None,
    quick: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """The machine's bounds now; with the model's `costs` (model_costs), its tokens/s ceilings too."""
    if device != "cpu":
        return bounds(cuda_limits(device, dtype, quick), costs, device=device, dtype=dtype)
    return bounds(
        {
            "memory_bandwidth_gbs": memory_bandwidth(threads, 64 if quick else 256) / 1e9,
            "matmul_gflops": matmul_flops(threads, 512 if quick else 1024, repeats=10) / 1e9,
        },
        costs,
    )


def best_of(*probes: dict[str, Any]) -> dict[str, Any]:
    """The higher reading of each probe: other work on the machine only ever lowers them."""
    costs = {k: probes[0][k] for k in ("weight_bytes", "params", "prefill_flops_per_token") if k in probes[0]}
    merged = {key: max(p[key] for p in probes) for key in ("memory_bandwidth_gbs", "matmul_gflops")}
    where = {k: probes[0][k] for k in ("device", "dtype") if k in probes[0]}
    return bounds(merged, costs or None, readings=len(probes), **where)


def bounds(
    probe: dict[str, Any],
    costs: dict[str, float] | None,
    readings: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    if device == "cpu":
        method = "bandwidth: 256 MiB float32 tensor copy, read+write bytes, best of 5; compute: 1024^3 float32 torch.mm"
    else:
        method = (
            f"on {device}, CUDA events: bandwidth: 1 GiB float32 copy, read+write bytes; compute: 8192^3 {dtype} matmul"
        )
    limits: dict[str, Any] = {
        **probe,
        "device": device,
        "dtype": dtype,
        "method": f"{method}, best of 10; the best of {readings} reading(s) (before and after the backends)",
    }
    if costs:
        limits.update(costs)
        limits["decode_bound_tokens_per_s_batch1"] = limits["memory_bandwidth_gbs"] * 1e9 / costs["weight_bytes"]
        limits["prefill_bound_tokens_per_s"] = limits["matmul_gflops"] * 1e9 / costs["prefill_flops_per_token"]
    return limits
