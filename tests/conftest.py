"""Shared fixtures: a tiny random Llama (built from a config, no downloads), the real SmolLM2-135M,
and the real data sets in ../shared/data (tests that need them skip when the folder is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import save_tiny_llama

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SOFTTOOL_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    # Tests run on 2 cores next to other work; more torch threads than cores only adds contention.
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


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
def tiny_model(tiny_model_dir):
    """tiny_model_dir loaded (shared by the session: read it, do not change it)."""
    from softtool.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, frozen, float32 (loaded once per session)."""
    from softtool.models import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)
