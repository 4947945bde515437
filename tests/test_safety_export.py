"""Loading an export checks what it loads: softtool_export.json against the graph (logits width, top-k, KV
heads and head size, layer count), the prompt table (finite, its shape) and the tokenizer; each mismatch is
one SofttoolError naming the file, never a wrong answer. And kill -9 during an export leaves the previous
export in place and loadable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import tree_digest, wait_for_line
from softtool.errors import SofttoolError
from softtool.export_meta import ExportMeta
from test_export import make_adapter


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_model_dir):
    from softtool.export.onnx import ExportOptions, export_adapters

    root = tmp_path_factory.mktemp("safety-export")
    adapter = make_adapter(root / "adapter", tiny_model_dir)
    export_adapters([adapter], root / "onnx", ExportOptions(verify_steps=2))
    return root / "onnx"


def _copy(export, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(export, folder)
    return folder


def _edit_meta(folder, **changes):
    path = folder / ExportMeta.FILE
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _load(folder):
    from softtool.runtime.onnx_backend import OnnxGenerator

    return OnnxGenerator.from_export_dir(folder)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"vocab_size": 49153}, "vocab_size is 49153 but the graph's logits are 49152 wide"),
        ({"vocab_size": 1000}, "vocab_size is 1000 but the graph's logits are 49152 wide"),
        ({"num_layers": 3}, "num_layers is 3 but the graph takes 4 past key/value inputs"),
        ({"num_kv_heads": 4}, "num_kv_heads is 4 but the graph's past_key_values.0.key has 2"),
        ({"head_dim": 16}, "head_dim is 16 but the graph's past_key_values.0.key has 8"),
        ({"hidden_size": 64}, "prompt_table.safetensors has shape (6, 32), not (6, 64)"),
        ({"num_virtual_tokens": 5}, "num_virtual_tokens is 5 but the template"),
        ({"top_k": 5}, "top_k is 5 but the graph has no topk_values output"),
        ({"eos_token_ids": [60000]}, "eos/pad token ids [60000, 2] are not all below vocab_size 49152"),
    ],
)
def test_metadata_that_disagrees_with_the_graph_is_refused_naming_the_file(export, tmp_path, changes, expected):
    folder = _copy(export, tmp_path)
    _edit_meta(folder, **changes)
    with pytest.raises(SofttoolError, match="re-run softtool export") as info:
        _load(folder)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(export):
    from softtool.runtime.session import create_session, graph_inputs

    meta = ExportMeta.read(export)
    session = create_session(export / ExportMeta.MODEL_FILE, threads=1)
    shapes = [{i.name: i.shape for i in group} for group in (graph_inputs(session), session.get_outputs())]
    table = (meta.num_virtual_tokens, meta.hidden_size)
    meta.check_contents("x.json", *shapes, table, 49152)  # as exported
    with pytest.raises(SofttoolError, match="the tokenizer has 49200 tokens, more than vocab_size 49152"):
        meta.check_contents("x.json", *shapes, table, 49200)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_prompt_table_is_refused_at_load(export, tmp_path, value):
    folder = _copy(export, tmp_path)
    path = folder / ExportMeta.TABLE_FILE
    table = load_file(str(path))[ExportMeta.TABLE_KEY]
    table[1, 3] = value
    save_file({ExportMeta.TABLE_KEY: table}, str(path))
    with pytest.raises(SofttoolError, match="prompt_table.safetensors holds NaN or infinite values"):
        _load(folder)


def test_missing_or_broken_tokenizer_files_are_one_line(export, tmp_path):
    folder = _copy(export, tmp_path)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(SofttoolError, match="tokenizer files are broken") as info:
        _load(folder)
    assert "\n" not in str(info.value)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(SofttoolError, match="has no tokenizer"):
        _load(folder)


def test_the_untouched_export_loads(export):
    assert _load(export).vocab_size == 49152


# -- kill -9 during an export --------------------------------------------------------------------------------

# An export that stops inside the build (after tracing, at verification), says so, and waits to be killed.
_KILLED_EXPORT = """
import sys, time
import softtool.export.verify as verify
from softtool.cli import main

def verify_export(*args, **kwargs):
    print("building", flush=True)
    time.sleep(600)
verify.verify_export = verify_export
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_9_during_an_export_leaves_the_previous_export_loadable(export, tmp_path, tiny_model_dir):
    folder = _copy(export, tmp_path)
    before = tree_digest(folder)
    adapter = make_adapter(tmp_path / "other", tiny_model_dir, seed=3)
    script = tmp_path / "killed_export.py"
    script.write_text(_KILLED_EXPORT)
    cmd = [sys.executable, str(script), "export", str(adapter), "-o", str(folder), "--overwrite"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(child, "building")
        building = [p for p in tmp_path.iterdir() if p.name.startswith(".copy.building-")]
        assert building and (building[0] / ExportMeta.MODEL_FILE).is_file()  # the new graph is half made
        child.kill()  # SIGKILL
    finally:
        child.kill()
        child.wait()
    assert tree_digest(folder) == before
    assert _load(folder).vocab_size == 49152
