"""How many CPU threads softtool's compute libraries use, and how their idle threads wait.

The count defaults to the cores this process may use (its CPU affinity, so `taskset` and container limits
count), and `--threads N` on every command sets it.

Intra-op threads work in lockstep: each parallel operator waits for its slowest thread. When another process
holds one of the cores, the thread that shares it runs only in the scheduler's time slices, and threads that
spin while they wait for it take the time it needs. The policy ($SOFTTOOL_THREAD_POLICY), measured by
benchmarks/shared_machine.py (benchmarks/results/shared_machine.json, docs/safety.md):

- `balanced` (the default): torch's OpenMP threads sleep at once (OMP_WAIT_POLICY=PASSIVE); ONNX Runtime's
  spin for at most 50 us, then sleep. Spinning OpenMP threads made a torch eval 2.9x slower next to one busy
  core and 6.2x with two evals started together (sleeping: 1.4x and 1.2x); ONNX Runtime's short spin keeps
  its speed alone (spinning is ~17% faster than sleeping there) and stays within 1.4x under load.
- `passive`: both sleep at once; a little slower alone, the least affected by other work.
- `spin`: both libraries' own defaults, for a machine you have to yourself.

OpenMP reads its wait policy once, when torch loads, so `prepare_process` must run before that: the
command line calls it first thing. Library users who import torch themselves keep torch's OpenMP default.
"""

from __future__ import annotations

import os

POLICY_ENV = "SOFTTOOL_THREAD_POLICY"
POLICIES = ("balanced", "passive", "spin")
DEFAULT_POLICY = "balanced"
ORT_SPIN_US = 50  # under "balanced": how long an idle ONNX Runtime thread spins before it sleeps


def available_cores() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def policy() -> str:
    """The thread policy in force: $SOFTTOOL_THREAD_POLICY, else balanced; a SofttoolError for an unknown one."""
    name = os.environ.get(POLICY_ENV, "").strip().lower() or DEFAULT_POLICY
    if name not in POLICIES:
        from softtool.errors import SofttoolError

        raise SofttoolError(f"{POLICY_ENV}={name!r}: use one of {', '.join(POLICIES)}")
    return name


def prepare_process() -> str:
    """Tell OpenMP how to wait, per the policy; call before torch is imported (the CLI does). Returns the policy.

    An OMP_WAIT_POLICY the user set is kept.
    """
    name = policy()
    if name != "spin":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return name


def ort_wait_settings() -> dict[str, str]:
    """ONNX Runtime session config entries for how idle intra-op threads wait, per the policy."""
    name = policy()
    if name == "passive":
        return {"session.intra_op.allow_spinning": "0"}
    if name == "balanced":
        return {"session.intra_op.allow_spinning": "1", "session.intra_op.spin_duration_us": str(ORT_SPIN_US)}
    return {"session.intra_op.allow_spinning": "1"}


def resolve_threads(threads: int | None) -> int:
    """`threads`, or the available cores when it is None or 0."""
    if threads is not None and threads < 0:
        raise ValueError(f"threads must be >= 0 (0: one per available core), got {threads}")
    return threads or available_cores()


def configure_threads(threads: int | None = None) -> int:
    """Set the thread count for torch (and, via the environment, OpenMP and ONNX Runtime); returns it.

    Call it before the first model runs. torch.set_num_threads takes effect at once; the OpenMP variables
    only if OpenMP has not started yet (see prepare_process).
    """
    n = resolve_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["SOFTTOOL_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    return n


def current_threads() -> int:
    """The thread count configure_threads set in this process (or the available cores)."""
    value = os.environ.get("SOFTTOOL_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else available_cores()
