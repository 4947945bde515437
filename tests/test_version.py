"""One version: `softtool --version`, the installed package's metadata and the changelog's newest release all
read `softtool.__version__`, which pyproject.toml does not repeat."""

from __future__ import annotations

import re
from importlib import metadata

import pytest

import softtool
from conftest import REPO
from helpers import run_cli


def test_softtool_version_prints_the_package_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"softtool, version {softtool.__version__}"
    assert softtool.__version__ == "0.2.0"


def test_pyproject_reads_the_version_from_the_package_and_the_installed_metadata_agrees():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and pyproject["project"]["dynamic"] == ["version"]
    source = pyproject["tool"]["scikit-build"]["metadata"]["version"]
    assert source["provider"] == "scikit_build_core.metadata.regex"
    assert (REPO / source["input"]).resolve() == (REPO / "python" / "softtool" / "__init__.py").resolve()
    assert metadata.version("softtool") == softtool.__version__  # what pip installed (make setup reinstalls)


def test_the_changelog_s_newest_release_is_this_version():
    text = (REPO / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", text, re.M)
    assert releases and releases[0] == softtool.__version__
