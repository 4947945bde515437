"""An export folder read by tools other than softtool: transformers' config files are there, and the example in
docs/export.md, which uses only onnxruntime, numpy and tokenizers, generates the tokens softtool generates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import NO_SOFTTOOL, docs_example
from softtool.adapter import Adapter, AdapterMeta, save_adapter

N = 4
TEMPLATE = "[P:4]English: {source}\nGerman:"
SENTENCES = ["A man rides a bike down the street.", "Two dogs play in the snow."]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_model_dir):
    from softtool.export.onnx import ExportOptions, export_adapters
    from softtool.models import load_model

    root = tmp_path_factory.mktemp("interop-export")
    model = load_model(str(tiny_model_dir))
    torch.manual_seed(3)
    table = model.get_input_embeddings().weight[torch.randint(0, 5000, (N,))] * 4
    meta = AdapterMeta(
        base_model=str(tiny_model_dir), num_virtual_tokens=N, token_dim=32, vocab_size=49152, template=TEMPLATE
    )
    adapter = save_adapter(root / "de", Adapter(table, meta), model.config)
    export_adapters([adapter], root / "onnx", ExportOptions(verify_steps=4))
    return root / "onnx"


def test_the_export_folder_has_the_base_model_s_config_and_generation_config(export_dir, tiny_model_dir):
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(export_dir)
    base = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == base.model_type == "llama"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (49152, 32, 2)
    generation = GenerationConfig.from_pretrained(export_dir)
    assert generation.eos_token_id == base.eos_token_id
    meta = json.loads((export_dir / "softtool_export.json").read_text())
    assert meta["vocab_size"] == config.vocab_size and meta["num_layers"] == config.num_hidden_layers


def test_the_export_folder_and_its_files_are_readable_by_others(export_dir):
    assert export_dir.stat().st_mode & 0o055 == 0o055  # others may list and enter it (mkdtemp gives 0700)
    for path in export_dir.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, path.name


def test_the_onnxruntime_only_example_in_docs_generates_softtool_s_tokens(tmp_path, export_dir):
    from softtool.runtime.onnx_backend import OnnxGenerator
    from softtool.search import SearchOptions

    script = tmp_path / "run_export.py"
    script.write_text(docs_example("Running an export without softtool"))
    generator = OnnxGenerator.from_export_dir(export_dir)
    meta = generator.export_meta
    options = SearchOptions(max_new_tokens=32, eos_token_ids=list(meta.eos_token_ids), pad_token_id=meta.pad_token_id)
    for sentence in SENTENCES:
        proc = subprocess.run(
            [sys.executable, "-c", NO_SOFTTOOL, str(script), str(export_dir), sentence],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        tokens = json.loads(proc.stdout.splitlines()[0])
        want = generator.generate([generator.encode({"source": sentence})], [0], options)[0][0]
        assert tokens == list(want) and tokens
