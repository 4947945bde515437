"""Which code a result in the checkout's benchmarks/results/ came from: the uncommitted diff a run starts with.

The README cites those files as evidence, and a commit ending in -dirty names code nobody can check out. So a run
that writes there from a tree with uncommitted changes is refused unless allowed (`softtool bench --allow-dirty`,
and benchmarks/provenance.py for the study and quality scripts); an allowed one stores the diff beside its result,
with the diff's sha256 in the result, so the code that ran is the commit plus that patch. Changes under
benchmarks/results/ do not count: they are what the benchmarks write, not the code that computed them. Outside a
git checkout (an installed package, a copy sent to another machine) there is nothing to check.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

RESULTS = "benchmarks/results"  # relative to the checkout
CHECKOUT = Path(__file__).resolve().parents[3]  # python/softtool/bench/provenance.py -> the checkout


def tree_diff(root: Path | None = None) -> bytes | None:
    """The uncommitted changes to tracked files (`git diff HEAD`, binary-safe) outside benchmarks/results/, b"" on
    a clean tree, None without git. root: the checkout (by default this package's)."""
    try:
        return subprocess.run(
            ["git", "diff", "HEAD", "--binary", "--", ".", f":(exclude){RESULTS}"],
            cwd=root or CHECKOUT, capture_output=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def writes_results(output: str | Path, root: Path | None = None) -> bool:
    """Whether `output` (a folder or a file) lies in the checkout's benchmarks/results/."""
    return Path(output).resolve().is_relative_to(((root or CHECKOUT) / RESULTS).resolve())


def changed_files(diff: bytes) -> list[str]:
    return [
        line.split(" b/", 1)[1] for line in diff.decode(errors="replace").splitlines() if line.startswith("diff --git ")
    ]


def refusal(diff: bytes, flag: str = "--allow-dirty") -> str:
    """The one-line reason a dirty tree may not write into benchmarks/results/."""
    files = changed_files(diff)
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return (
        f"uncommitted changes ({shown}): a result in {RESULTS}/ must name the code it ran. Commit them, write "
        f"elsewhere with --output, or pass {flag} to store the diff beside the result"
    )


def diff_record(result: str | Path, diff: bytes) -> dict:
    """The result's record of the diff that `write_diff` stores beside it: its file name and sha256."""
    return {"file": Path(result).with_suffix(".diff").name, "sha256": hashlib.sha256(diff).hexdigest()}


def write_diff(result: str | Path, diff: bytes) -> Path:
    """Store `diff` beside the result at `result` (<result>.diff)."""
    path = Path(result).with_suffix(".diff")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(diff)
    return path
