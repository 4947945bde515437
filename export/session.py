"""ONNX Runtime sessions for exported graphs: providers per device, thread counts, and a clear error on a bad file."""

from __future__ import annotations

import os
from pathlib import Path

from softtool.errors import SofttoolError

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


def default_threads() -> int:
    """Intra-op threads: the cores this process may use (affinity-aware), which is what ORT's matmuls scale with."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def create_session(
    model_path: str | os.PathLike, device: str = "cpu", threads: int | None = None, optimization: str = "all"
):
    """An InferenceSession on `device` ("cpu" or "cuda", already resolved); SofttoolError if the file won't load."""
    import onnxruntime as ort

    path = Path(model_path)
    if not path.is_file():
        raise SofttoolError(f"ONNX model not found: {path}; re-run softtool export")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
    profile = os.environ.get("SOFTTOOL_ORT_PROFILE")
    if profile:  # ONNX Runtime's own per-node trace; benchmarks/ort_profile.py sums it by op type
        so.enable_profiling = True
        so.profile_file_prefix = profile
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as exc:  # ORT raises several private exception types for unreadable graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SofttoolError(f"cannot load ONNX model {path}: {first}; re-run softtool export") from exc


def input_dtypes(session) -> dict[str, str]:
    """numpy dtype name of each graph input."""
    return {i.name: _ORT_TYPES.get(i.type, "float32") for i in session.get_inputs()}
