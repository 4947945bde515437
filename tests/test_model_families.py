"""Every model family users fine-tune, on tiny random models with lively weights (tests/helpers.FAMILIES): a soft
prompt trains (2 steps), evaluates, exports with verification, its export evaluates to the same predictions, and a
request served over HTTP writes what `softtool generate` writes. Unsupported models are refused in one line."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from helpers import FAMILIES, error_line, run_cli, save_tiny_family, write_translation_data

pytestmark = pytest.mark.slow

SENTENCES = ["A man in a red jacket rides a bicycle down a busy street.", "Two dogs play.", "A girl reads a book."]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    targets = ["Ein Mann fährt Rad.", "Zwei Hunde spielen.", "Ein Mädchen liest."]
    return write_translation_data(tmp_path_factory.mktemp("family-data"), SENTENCES, targets)


def predictions(folder: Path) -> list[str]:
    return [json.loads(line)["prediction"] for line in (folder / "predictions.jsonl").read_text().splitlines()]


def served(adapter: Path, prompt: str, max_tokens: int) -> str:
    """One completion through `softtool serve`'s app in this process (its HTTP routes, engine thread and all)."""
    from fastapi.testclient import TestClient

    from softtool.serve.app import ServerState, create_app
    from softtool.serve.options import ServeOptions
    from softtool.serve.registry import load

    state = ServerState(ServeOptions(slots=2, max_length=128, max_tokens=32), load([str(adapter)], None, None))
    with TestClient(create_app(state)) as client:
        reply = client.post("/v1/completions", json={"model": adapter.name, "prompt": prompt, "max_tokens": max_tokens})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_trains_evaluates_exports_and_serves(family, data, smollm2_tokenizer, tmp_path):
    model = save_tiny_family(tmp_path / "model", smollm2_tokenizer, family)
    adapter = tmp_path / "adapter"
    args = ["train", "--task", "translation", "--data", data, "--model", model, "--num-virtual-tokens", 4]
    assert run_cli([*args, "--max-steps", 2, "--eval-every", 0, "-o", adapter, "-q"]).code == 0
    assert run_cli(["eval", adapter, "--data", data, "--max-new-tokens", 12, "-o", tmp_path / "eval", "-q"]).code == 0
    assert run_cli(["export", adapter, "-o", tmp_path / "export"]).code == 0  # verified against transformers
    record = json.loads((tmp_path / "export" / "softtool_export.json").read_text())
    assert record["verification"]["passed"] and record["verification"]["greedy_agreement"] == 1.0
    out = tmp_path / "export-eval"
    assert run_cli(["eval", tmp_path / "export", "--data", data, "--max-new-tokens", 12, "-o", out, "-q"]).code == 0
    assert predictions(out) == predictions(tmp_path / "eval")
    assert len(set(predictions(out))) > 1  # lively: the rows differ, so agreeing means something

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert run_cli(["generate", adapter, SENTENCES[0], "--raw", "--max-new-tokens", 10, "-o", "-"]).code == 0
    assert served(adapter, SENTENCES[0], 10).strip() == json.loads(text.getvalue())["output"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_the_gqa_form_gives_the_traced_forms_tokens(family, smollm2_tokenizer, tmp_path):
    """The GroupQueryAttention form (export/gqa.py: q/k/v biases for Qwen2, per-head q/k norms for Qwen3, Mistral's
    window as local_window_size) against the traced form, on the CPU, fp32: both verify against transformers and
    decode the same tokens."""
    import torch

    from helpers import save_tiny_adapter
    from softtool.export.onnx import ExportOptions, export_adapters
    from softtool.runtime import load_generator
    from softtool.search import SearchOptions

    model = save_tiny_family(tmp_path / "model", smollm2_tokenizer, family)
    torch.manual_seed(1)
    adapter = save_tiny_adapter(tmp_path / "adapter", model, torch.randn(4, 64) * 0.2)
    outputs = {}
    for form in ("traced", "gqa"):
        meta = export_adapters([str(adapter)], tmp_path / form, ExportOptions(form=form))
        assert meta.kv_layout == ("gqa" if form == "gqa" else "slots") and meta.verification["passed"]
        generator = load_generator(str(tmp_path / form), "onnx")
        options = SearchOptions(max_new_tokens=24, eos_token_ids=[2], pad_token_id=2)
        outputs[form] = generator.generate([generator.encode({"source": s}) for s in SENTENCES], None, options)
    assert outputs["gqa"] == outputs["traced"]
    assert len({tuple(o[0]) for o in outputs["gqa"]}) == len(SENTENCES)


def test_the_sliding_window_binds_in_the_mistral_of_the_matrix(smollm2_tokenizer, tmp_path):
    """The verified Mistral export is only a check of the window if its rows outgrow it."""
    from softtool.models import load_model

    model = load_model(str(save_tiny_family(tmp_path / "m", smollm2_tokenizer, "mistral")))
    longest = max(len(smollm2_tokenizer(f"English: {s}\nGerman:")["input_ids"]) for s in SENTENCES)
    assert 4 + longest > model.config.sliding_window


@pytest.mark.parametrize(
    ("config", "model", "says"),
    [
        ("T5Config", "T5ForConditionalGeneration", "it is not a decoder-only language model"),
        ("MambaConfig", "MambaForCausalLM", "model type 'mamba' has linear_attention layers"),
    ],
)
def test_an_unsupported_family_is_one_line_naming_what_is_supported(smollm2_tokenizer, tmp_path, capsys, config, model,
                                                                     says):  # fmt: skip
    import transformers

    from helpers import save_tiny_model

    shape = {"T5Config": dict(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16),
             "MambaConfig": dict(hidden_size=32, num_hidden_layers=1, state_size=8)}[config]  # fmt: skip
    folder = save_tiny_model(tmp_path / "m", smollm2_tokenizer, getattr(transformers, model),
                             getattr(transformers, config), **shape)  # fmt: skip
    data = write_translation_data(tmp_path / "data")
    code, _, err = run_cli(["train", "--task", "translation", "--data", data, "--model", folder, "-o", tmp_path / "o"],
                           capsys)  # fmt: skip
    line = error_line(code, err)
    assert says in line and "tested: llama, qwen2" in line and "docs/models.md" in line
    assert not (tmp_path / "o").exists()
    shutil.rmtree(folder)
