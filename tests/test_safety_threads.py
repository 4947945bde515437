"""Threads on a shared machine: torch's idle threads sleep by default (OpenMP told before torch loads), ONNX
Runtime's spin briefly (told per session), SOFTTOOL_THREAD_POLICY chooses otherwise, and the count follows
the CPU affinity. benchmarks/shared_machine.py measures the policies."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from softtool import threads
from softtool.errors import SofttoolError


@pytest.fixture
def policy(monkeypatch):
    """Set SOFTTOOL_THREAD_POLICY (None: unset) for one test."""

    def set_policy(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(threads.POLICY_ENV, raising=False)
        else:
            monkeypatch.setenv(threads.POLICY_ENV, value)

    return set_policy


def test_the_default_is_one_thread_per_available_core_and_balanced_waiting(policy):
    policy(None)
    assert threads.policy() == "balanced"
    assert threads.resolve_threads(0) == len(os.sched_getaffinity(0))
    assert threads.resolve_threads(3) == 3


@pytest.mark.parametrize(
    ("name", "allow", "duration"), [("balanced", "1", "50"), ("passive", "0", None), ("spin", "1", None)]
)
def test_the_policy_reaches_onnx_runtime_sessions(policy, tmp_path, name, allow, duration):
    import onnx
    from onnx import TensorProto, helper
    from softtool.runtime.session import create_session

    policy(name)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "relu.onnx")
    options = create_session(tmp_path / "relu.onnx", threads=1).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == allow
    if duration:
        assert options.get_session_config_entry("session.intra_op.spin_duration_us") == duration


def test_an_unknown_policy_is_one_line(policy):
    policy("fast")
    with pytest.raises(SofttoolError, match="SOFTTOOL_THREAD_POLICY='fast': use one of balanced, passive, spin"):
        threads.policy()


_BEFORE_TORCH = """
import os, sys
import softtool.threads as threads
from softtool.cli import main

original = threads.prepare_process
def prepare_process():
    print("torch loaded before the policy:", "torch" in sys.modules)
    return original()
threads.prepare_process = prepare_process
try:
    main(["generate", "no-such-folder", "x"])
except SystemExit:
    pass
print("OMP_WAIT_POLICY:", os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("name", "expected"), [(None, "PASSIVE"), ("passive", "PASSIVE"), ("spin", "None")])
def test_the_command_line_sets_the_openmp_wait_policy_before_torch_loads(name, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", threads.POLICY_ENV)}
    env.update({threads.POLICY_ENV: name} if name else {})
    out = subprocess.run([sys.executable, "-c", _BEFORE_TORCH], capture_output=True, text=True, env=env).stdout
    assert "torch loaded before the policy: False" in out
    assert f"OMP_WAIT_POLICY: {expected}" in out
