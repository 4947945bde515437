"""How many CPU threads softtool's compute libraries use, and how they wait.

The default is the number of cores this process may run on (its CPU affinity, so `taskset` and container
limits are honoured), not the machine's core count. Intra-op threads that spin while waiting for each other
stall badly when another process holds one of the cores (a 4-example eval took over 13x longer next to
one busy core), so waiting threads sleep instead: OpenMP's passive wait policy for torch, and
`session.intra_op.allow_spinning = 0` for ONNX Runtime (softtool.runtime.session).
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """`threads`, or the available cores when it is None or 0."""
    if threads is not None and threads < 0:
        raise ValueError(f"threads must be >= 0 (0: one per available core), got {threads}")
    return threads or available_cores()


def configure_threads(threads: int | None = None) -> int:
    """Set the thread count for torch (and, via the environment, OpenMP and ONNX Runtime); returns it.

    Call it before the first model runs. The OpenMP variables only take effect if OpenMP has not started
    yet, which is why the CLI calls this before importing torch's heavy paths.
    """
    n = resolve_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["SOFTTOOL_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    return n


def current_threads() -> int:
    """The thread count configure_threads set in this process (or the available cores)."""
    value = os.environ.get("SOFTTOOL_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else available_cores()
