"""Where a result in benchmarks/results/ came from: its commit, the uncommitted diff it ran with, and the library
versions, shared by benchmarks/study.py and benchmarks/quality.py.

The README cites those files as evidence, and a commit ending in -dirty names code nobody can check out. So the
scripts call `check_tree` when they start (the code that runs, read before hours of training): from a tree with
uncommitted changes they refuse to write into benchmarks/results/ unless --allow-dirty. With it, `write_diff`
stores the diff beside the result (<result>.diff) and `stamp` records its sha256 in the result, so the code that
ran is the commit plus that patch. As with git_commit's -dirty, untracked files do not count.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from softtool.bench import provenance as _provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = _provenance.RESULTS  # relative to the checkout
# The libraries a study or quality number depends on; peft only where a run uses PEFT's own P-tuning.
PACKAGES = ("softtool", "torch", "transformers", "onnxruntime")


def tree_diff(root: Path = ROOT) -> bytes | None:
    """The uncommitted changes to tracked files outside benchmarks/results/ (softtool.bench.provenance's rule:
    those files are what these scripts write, quality.py rewriting its JSON after every stage), b"" when clean."""
    return _provenance.tree_diff(root)


def writes_results(output: str | Path, root: Path = ROOT) -> bool:
    """Whether `output` (a folder or a file) lies in the checkout's benchmarks/results/."""
    return _provenance.writes_results(output, root)


@dataclass(frozen=True)
class Tree:
    """The code a run started from."""

    commit: str  # the short commit, -dirty when `diff` is not empty
    diff: bytes  # tree_diff at the start

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.diff).hexdigest() if self.diff else None


def check_tree(output: str | Path, allow_dirty: bool, root: Path = ROOT) -> Tree:
    """Before a run that writes into `output`: the code it runs. Exits with the reason when the tree is dirty,
    `output` lies in benchmarks/results/ (only that folder holds evidence) and allow_dirty is off."""
    diff = tree_diff(root)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        head = None
    if diff is None or head is None:  # a copy without git history (see git_commit)
        return Tree(os.environ.get("SOFTTOOL_GIT_COMMIT", "unknown"), b"")
    if diff and writes_results(output, root) and not allow_dirty:
        raise SystemExit(f"error: {_provenance.refusal(diff)}")
    return Tree(head + ("-dirty" if diff else ""), diff)


def versions(*extra: str) -> dict[str, str | None]:
    """The installed versions of PACKAGES and `extra` (None where one is not installed)."""
    out: dict[str, str | None] = {}
    for package in (*PACKAGES, *extra):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def stamp(result: str | Path, tree: Tree, *extra: str) -> dict:
    """The provenance keys of the result JSON at `result`: the commit, the library versions (PACKAGES and `extra`)
    and, for a dirty tree, the name and sha256 of the diff that `write_diff` stores beside it."""
    record: dict = {"commit": tree.commit, "versions": versions(*extra)}
    if tree.diff:
        name = Path(result).with_suffix(".diff").name
        record["uncommitted_diff"] = {"file": name, "sha256": tree.sha256}
    return record


def write_diff(result: str | Path, tree: Tree) -> Path | None:
    """Store a dirty tree's diff beside the result at `result` (<result>.diff); nothing for a clean tree."""
    if not tree.diff:
        return None
    path = Path(result).with_suffix(".diff")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tree.diff)
    return path
