"""What several test files share: running `softtool` in this process and reading its one-line errors."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import NamedTuple


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


def run_cli(args, capsys=None) -> CliResult:
    """Run `softtool ARGS` in this process; (exit status, stdout, stderr), the streams only when given capsys."""
    from softtool.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    captured = capsys.readouterr() if capsys is not None else None
    return CliResult(code, captured.out if captured else "", captured.err if captured else "")


def error_line(code: int, err: str) -> str:
    """The single `error: ...` line; fails on a traceback, a status other than 2, or several error lines."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def user_error(code: int, err: str) -> str:
    """The one line that says what is wrong: softtool's `error: ...` or click's usage `Error: ...`."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(("error: ", "Error: "))]
    assert len(lines) == 1, err
    if lines[0].startswith("Error: "):  # click's usage error: Usage / Try ... --help / Error
        assert err.startswith("Usage: softtool "), err
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (to check that a command changed nothing)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def wait_for_line(child: subprocess.Popen, expected: str) -> None:
    """Read the child's stdout (text mode) until a line equal to `expected`; fail with its stderr if it exits first.

    For tests that stop a child at a controlled point (it prints `expected`, then waits to be killed).
    """
    seen = []
    for line in child.stdout:
        if line.strip() == expected:
            return
        seen.append(line)
    child.wait()
    raise AssertionError(
        f"the child exited ({child.returncode}) before {expected!r}: {seen[-5:]} {child.stderr.read()[-3000:]}"
    )
