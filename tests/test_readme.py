"""The README's search-core example is code users copy: it must run and decode what it promises."""

import re

from conftest import REPO


def _readme_snippet(section: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"## {re.escape(section)}.*?```python\n(.*?)```", text, re.S)
    assert match, f"README has no python block under '{section}'"
    return match.group(1)


def test_readme_search_example_runs_and_decodes_two_sentences(capsys, smollm2):
    namespace: dict = {}
    exec(compile(_readme_snippet("The search core in Python"), "README.md", "exec"), namespace)
    hyps = namespace["s"].finalize()
    assert len(hyps) == 2 and all(len(h[0].tokens) > 0 for h in hyps)
    assert "Two dogs" in capsys.readouterr().out
