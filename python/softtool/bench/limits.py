"""The machine a benchmark ran on, and its limits measured with the benchmark's own thread count.

Two probes bound what any backend can reach:
  memory bandwidth  a large float32 tensor copy; bytes read + written per second (batch-1 decoding reads
                    every weight once per token, so bandwidth / weight bytes is its tokens/s ceiling)
  matmul FLOP/s     a square float32 matrix multiply (prefill of a large batch is matmul-bound)
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
    repo = repo or Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


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
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
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


def model_costs(model) -> dict[str, float]:
    """Bytes read per decoded token (all weights, tied ones once) and prefill FLOPs per input token."""
    seen, weight_bytes, params = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        weight_bytes += p.numel() * p.element_size()
        params += p.numel()
    embed = model.get_input_embeddings().weight.numel()
    # Prefill runs every layer matmul on every input token; the LM head only on the last one, and the
    # embedding is a lookup, so they are left out of the per-token cost.
    return {"weight_bytes": weight_bytes, "params": params, "prefill_flops_per_token": 2 * (params - embed)}


def measure_limits(threads: int, costs: dict[str, float] | None = None, quick: bool = False) -> dict[str, Any]:
    """The machine's bounds now; with the model's `costs` (model_costs), its tokens/s ceilings too."""
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
    return bounds(merged, costs or None, readings=len(probes))


def bounds(probe: dict[str, Any], costs: dict[str, float] | None, readings: int = 1) -> dict[str, Any]:
    limits: dict[str, Any] = {
        **probe,
        "method": "bandwidth: 256 MiB float32 tensor copy, read+write bytes, best of 5; compute: 1024^3 float32 "
        f"torch.mm, best of 10; the best of {readings} reading(s) (before and after the backends)",
    }
    if costs:
        limits.update(costs)
        limits["decode_bound_tokens_per_s_batch1"] = limits["memory_bandwidth_gbs"] * 1e9 / costs["weight_bytes"]
        limits["prefill_bound_tokens_per_s"] = limits["matmul_gflops"] * 1e9 / costs["prefill_flops_per_token"]
    return limits
