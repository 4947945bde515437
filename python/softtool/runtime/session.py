"""ONNX Runtime sessions for exported graphs: providers per device, thread settings, and a clear error on a
bad file. The runtime and the exporter's self-check both open graphs through here."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from softtool.errors import SofttoolError
from softtool.threads import current_threads, ort_wait_settings

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
OPTIMIZATION_LEVELS = ("none", "basic", "extended", "all")


def resolve_device(device: str, strict: bool = False) -> str:
    """'cuda' when asked for and ONNX Runtime has the CUDA provider; else 'cpu' (a warning) or an error if strict."""
    if device == "cpu":
        return "cpu"
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return "cuda"
    message = (
        f"CUDA was requested but onnxruntime {ort.__version__} has no CUDA provider here "
        "(on a machine with an NVIDIA GPU, replace onnxruntime with onnxruntime-gpu; see docs/export.md)"
    )
    if strict:
        raise SofttoolError(f"--device cuda: {message}; drop --strict-device to fall back to the CPU")
    warnings.warn(f"{message}; falling back to the CPU", RuntimeWarning, stacklevel=3)
    return "cpu"


def create_session(
    model_path: str | os.PathLike,
    device: str = "cpu",
    threads: int | None = None,
    optimization: str = "all",
    *,
    cuda_options: dict[str, str] | None = None,
):
    """An InferenceSession on `device` ("cpu" or "cuda", already resolved); SofttoolError if the file won't load.

    cuda_options: CUDA execution provider options, e.g. {"enable_cuda_graph": "1", "user_compute_stream": ...}.

    Intra-op threads default to what softtool.threads.configure_threads set for this process (the `--threads`
    of every command), else the cores this process may use. Idle threads wait as softtool.threads' policy says
    (by default they spin for at most 50 us, then sleep: long spinning stalls next to a busy core).
    """
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
    so.intra_op_num_threads = threads or current_threads()
    so.inter_op_num_threads = 1
    for key, value in ort_wait_settings().items():
        so.add_session_config_entry(key, value)
    so.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
    profile = os.environ.get("SOFTTOOL_ORT_PROFILE")
    if profile:  # ONNX Runtime's own per-node trace; benchmarks/ort_profile.py sums it by op type
        so.enable_profiling = True
        so.profile_file_prefix = profile
    cuda = ("CUDAExecutionProvider", dict(cuda_options or {}))
    providers = [cuda, "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as exc:  # ORT raises several private exception types for unreadable graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SofttoolError(f"cannot load ONNX model {path}: {first}; re-run softtool export") from exc


def session_threads(session) -> int:
    """The intra-op thread count a session was created with."""
    return int(session.get_session_options().intra_op_num_threads)


def graph_inputs(session) -> list:
    """Every input of the graph, those with a default (an initializer, such as target_ids) included: ONNX Runtime
    lists them apart from the required ones (get_overridable_initializers)."""
    return [*session.get_inputs(), *session.get_overridable_initializers()]


def input_dtypes(session) -> dict[str, str]:
    """numpy dtype name of each graph input."""
    return {i.name: _ORT_TYPES.get(i.type, "float32") for i in session.get_inputs()}
