"""benchmarks/provenance.py, which study.py and quality.py call before a run: against a throwaway git repository,
a clean tree may write into benchmarks/results/, a dirty one is refused there unless allowed, and an allowed dirty
run stores its diff beside the result with the diff's sha256 in the result."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import provenance
finally:
    sys.path.pop(0)


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A repository with one commit: a script and a result already in benchmarks/results/."""
    root = tmp_path / "repo"
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "benchmarks" / "study.py").write_text("N = 20\n")
    (root / "benchmarks" / "results" / "study_length.json").write_text("{}\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "start")
    return root


def test_a_clean_tree_writes_into_the_results_with_its_commit_and_no_diff(checkout):
    results = checkout / "benchmarks" / "results"
    tree = provenance.check_tree(results, allow_dirty=False, root=checkout)
    assert tree.diff == b"" and len(tree.commit) >= 7 and not tree.commit.endswith("-dirty")
    record = provenance.stamp(results / "study_length.json", tree)
    assert "uncommitted_diff" not in record and record["commit"] == tree.commit
    assert set(record["versions"]) >= {"torch", "transformers", "onnxruntime"} and record["versions"]["torch"]
    assert provenance.write_diff(results / "study_length.json", tree) is None
    assert sorted(p.name for p in results.iterdir()) == ["study_length.json"]


def test_a_result_rewritten_by_the_scripts_themselves_does_not_make_the_tree_dirty(checkout):
    (checkout / "benchmarks" / "results" / "study_length.json").write_text('{"runs": []}\n')
    tree = provenance.check_tree(checkout / "benchmarks" / "results", allow_dirty=False, root=checkout)
    assert tree.diff == b"" and not tree.commit.endswith("-dirty")


def test_a_dirty_tree_is_refused_in_the_results_and_the_refusal_names_the_changed_file(checkout):
    (checkout / "benchmarks" / "study.py").write_text("N = 100\n")
    with pytest.raises(SystemExit, match=r"uncommitted changes \(benchmarks/study\.py\).*--allow-dirty"):
        provenance.check_tree(checkout / "benchmarks" / "results", allow_dirty=False, root=checkout)
    # A result file named directly counts as the folder; another --output is not evidence and is not refused.
    with pytest.raises(SystemExit):
        provenance.check_tree(checkout / "benchmarks" / "results" / "x.json", allow_dirty=False, root=checkout)
    elsewhere = provenance.check_tree(checkout.parent / "smoke", allow_dirty=False, root=checkout)
    assert elsewhere.commit.endswith("-dirty")


def test_an_allowed_dirty_run_stores_its_diff_beside_the_result_and_the_hash_in_it(checkout):
    (checkout / "benchmarks" / "study.py").write_text("N = 100\n")
    results = checkout / "benchmarks" / "results"
    tree = provenance.check_tree(results, allow_dirty=True, root=checkout)
    assert tree.commit.endswith("-dirty")
    result = results / "study_length.json"
    record = provenance.stamp(result, tree, "peft")
    assert provenance.write_diff(result, tree) == results / "study_length.diff"
    diff = (results / "study_length.diff").read_bytes()
    assert b"-N = 20\n+N = 100\n" in diff
    assert record["uncommitted_diff"] == {"file": "study_length.diff", "sha256": hashlib.sha256(diff).hexdigest()}
    assert "peft" in record["versions"]
    json.dumps(record)  # what the scripts put into their JSON
    # The stored diff rebuilds the code that ran: the commit plus the patch.
    _git(checkout, "checkout", "--", "benchmarks/study.py")
    assert (checkout / "benchmarks" / "study.py").read_text() == "N = 20\n"
    _git(checkout, "apply", str(results / "study_length.diff"))
    assert (checkout / "benchmarks" / "study.py").read_text() == "N = 100\n"


def test_the_bench_commit_ignores_a_rewritten_result_as_provenance_does_but_not_a_changed_script(checkout, monkeypatch):
    from softtool.bench.limits import git_commit

    monkeypatch.delenv("SOFTTOOL_GIT_COMMIT", raising=False)
    (checkout / "benchmarks" / "results" / "study_length.json").write_text('{"rewritten": true}\n')
    clean = git_commit(checkout)
    assert clean and not clean.endswith("-dirty")
    (checkout / "benchmarks" / "study.py").write_text("N = 100\n")
    assert git_commit(checkout) == clean + "-dirty"


def test_bench_refuses_a_result_from_a_dirty_tree_and_stores_its_diff_when_allowed(
    checkout, monkeypatch, tiny_model_dir, capsys
):
    from helpers import run_cli
    from softtool.bench import provenance as core

    monkeypatch.setattr(core, "CHECKOUT", checkout)  # the throwaway repository stands for the checkout
    (checkout / "benchmarks" / "study.py").write_text("N = 100\n")
    out = checkout / "benchmarks" / "results" / "bench_smoke.json"
    args = ["bench", "--config", str(REPO / "benchmarks" / "configs" / "smoke.json"), "--model", str(tiny_model_dir),
            "--backends", "torch", "--no-isolate", "--no-limits", "--cache-dir", str(checkout / "cache"),
            "--output", str(out)]  # fmt: skip
    assert run_cli(args).code == 2
    assert capsys.readouterr().err.startswith("error: uncommitted changes (benchmarks/study.py)")
    assert not out.exists()
    assert run_cli([*args, "--allow-dirty"]).code == 0
    stored = out.with_suffix(".diff").read_bytes()
    assert b"+N = 100" in stored
    record = json.loads(out.read_text())["uncommitted_diff"]
    assert record == {"file": "bench_smoke.diff", "sha256": hashlib.sha256(stored).hexdigest()}
    # elsewhere nothing is checked: a result outside benchmarks/results/ is not evidence
    assert run_cli([*args[:-1], str(checkout / "elsewhere.json")]).code == 0
    assert not (checkout / "elsewhere.diff").exists()
