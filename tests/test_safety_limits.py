"""Inputs are bounded: a 50,000-character line given to `softtool generate` (in a child process) is refused
in one line, or cut with --truncate, and the process stays under 2 GB; eval cuts over-long examples at
--max-length and counts them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import save_tiny_adapter

# Each test runs softtool in a child process and measures its memory: make test, not make test-fast.
pytestmark = pytest.mark.slow

LONG = "A short line.\n" + "word " * 10_000 + "\n"  # line 2: 50,000 characters
LIMIT_MB = 2048


# Runs a command and writes its peak RSS (KiB) to argv[1]. A child's ru_maxrss counts the memory of the process
# it was forked from (the hiwater mark survives fork and exec), so the measured command is forked from this
# small launcher, not from pytest.
_LAUNCHER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def _measured(args: list[str], tmp_path: Path, stdin: str = "") -> tuple[int, str, str, float]:
    """Run `softtool ARGS` in a child process; (exit status, stdout, stderr, the child's peak RSS in MB)."""
    peak = tmp_path / "peak_kib.txt"
    command = [sys.executable, "-c", _LAUNCHER, peak, sys.executable, "-m", "softtool", *args]
    result = subprocess.run([str(a) for a in command], input=stdin, capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr, int(peak.read_text()) / 1024


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    return save_tiny_adapter(tmp_path_factory.mktemp("adapter"), tiny_model_dir, torch.zeros(2, 32))


def test_a_50000_character_line_on_stdin_is_refused_in_one_line_within_2_gb(adapter, tmp_path):
    code, out, err, peak = _measured(["generate", adapter, "--max-new-tokens", "4"], tmp_path, LONG)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "stdin: line 2" in lines[0] and "--truncate" in lines[0], err
    assert "Traceback" not in err and out == ""
    assert peak < LIMIT_MB


def test_a_50000_character_line_with_truncate_is_answered_within_2_gb(adapter, tmp_path):
    args = ["generate", adapter, "--max-new-tokens", "4", "--truncate", "--output", "-"]
    code, out, err, peak = _measured(args, tmp_path, LONG)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and all(row["tokens"] == 4 for row in rows)
    assert peak < LIMIT_MB


def test_eval_cuts_an_over_long_example_at_max_length_and_counts_it(adapter, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dev.en").write_text(LONG)
    (data / "dev.de").write_text("Eine kurze Zeile.\nWort Wort.\n")
    args = ["eval", adapter, "--data", data, "--max-new-tokens", "4", "--max-length", "128", "--output", tmp_path / "e"]
    code, _, err, peak = _measured([*args, "--quiet"], tmp_path, "")
    assert code == 0, err
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["n"] == 2 and metrics["truncated"] == 1
    assert peak < LIMIT_MB
