"""Shared fixtures: a tiny random Llama (built from a config, no downloads), the real SmolLM2-135M,
and the real data sets in ../shared/data (tests that need them skip when the folder is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import save_tiny_llama

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SOFTTOOL_DATA", REPO.parent / "shared" / "data"))


LANE_MARKS = ("slow", "e2e", "data", "distributed", "cuda")  # the marks that pick a test's lane (Makefile)
_durations: dict[str, list] = {}  # nodeid -> [seconds, lane marks], for --durations-file


def pytest_addoption(parser):
    parser.addoption(
        "--durations-file",
        metavar="PATH",
        help="write each test's time (setup + call + teardown) and lane marks, slowest first, then each file's total, "
        "to PATH (make test writes build/test-durations.txt)",
    )


def pytest_configure(config):
    # Tests run on 2 cores next to other work; more torch threads than cores only adds contention.
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    for item in items:
        _durations[item.nodeid] = [0.0, [m for m in LANE_MARKS if item.get_closest_marker(m)]]


def pytest_runtest_logreport(report):
    # A module fixture's setup counts towards the first test that uses it, as it counts towards a lane's time.
    if report.nodeid in _durations:
        _durations[report.nodeid][0] += report.duration


def pytest_sessionfinish(session):
    path = session.config.getoption("durations_file")
    if not path:
        return
    ran = {nodeid: v for nodeid, v in _durations.items() if v[0] > 0}
    per_file: dict[str, float] = {}
    for nodeid, (seconds, _) in ran.items():
        name = nodeid.split("::")[0]
        per_file[name] = per_file.get(name, 0.0) + seconds
    total = sum(seconds for seconds, _ in ran.values())
    lines = [f"# {len(ran)} tests, {total:.1f} s in all: seconds, lane marks, test, slowest first"]
    for nodeid, (seconds, marks) in sorted(ran.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{seconds:8.2f}  {','.join(marks) or '-':<18} {nodeid}")
    lines.append("# per file")
    lines += [f"{seconds:8.2f}  {name}" for name, seconds in sorted(per_file.items(), key=lambda kv: -kv[1])]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real data sets; skips the test when it is absent (a user's machine)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (set SOFTTOOL_DATA to run these tests)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from softtool.models import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A small random Llama with SmolLM2's tokenizer, saved as a normal model folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer)


@pytest.fixture(scope="session")
def lively_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """Like tiny_model_dir but with weights drawn wide (std 0.2): its greedy outputs depend on the input and
    differ from row to row, where the default init (std 0.02) emits one token everywhere. For tests whose
    meaning needs rows that diverge or end at different steps."""
    return save_tiny_llama(tmp_path_factory.mktemp("lively-llama"), smollm2_tokenizer, initializer_range=0.2)


@pytest.fixture(scope="session")
def gqa_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """Like lively_model_dir, with heads 16 wide and two key/value heads, as GroupQueryAttention needs."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("gqa-llama"),
        smollm2_tokenizer,
        initializer_range=0.2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """tiny_model_dir loaded (shared by the session: read it, do not change it)."""
    from softtool.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, frozen, float32 (loaded once per session)."""
    from softtool.models import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)
