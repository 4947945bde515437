"""The genai form (`softtool export --form genai`): onnxruntime-genai loads the folder and, with its own greedy
loop, writes the tokens `softtool generate` writes, on 16 Multi30k validation sentences; softtool's own runtime
runs the same folder; and what the form cannot carry is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import NO_SOFTTOOL, docs_example, run_cli, save_tiny_adapter, user_error
from softtool.export.genai import CONFIG_FILE

# The first 16 English sentences of Multi30k's validation split (val.en), as they are there.
SENTENCES = [
    "A group of men are loading cotton onto a truck",
    "A man sleeping in a green room on a couch.",
    "A boy wearing headphones sits on a woman's shoulders.",
    "Two men setting up a blue ice fishing hut on an iced over lake",
    "A balding man wearing a red life jacket is sitting in a small boat.",
    "A lady in a red coat, holding a bluish hand bag likely of asian descent, jumping off the ground for a snapshot.",
    "A brown dog is running after the black dog.",
    "A young boy wearing a Giants jersey swings a baseball bat at an incoming pitch.",
    "A man in a cluttered office is using the telephone",
    "A smiling woman in a peach tank top stands holding a mountain bike",
    "A young child is standing alone on some jagged rocks.",
    "A person on a snowmobile in mid jump.",
    "Three young children stand around a blue and white barrel.",
    "A woman is sitting by her dried flower display at an outside market.",
    "A female playing a song on her violin.",
    "Three people on two dirt-bikes and one four-wheeler are riding through brown grass.",
]
MAX_NEW = 24
N = 4


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, lively_model_dir):
    """A translation prompt for the lively tiny Llama (its greedy output depends on the input), with the task's
    decoding default of no repeated 3-grams, so genai's n-gram blocking is held to softtool's too."""
    from softtool.models import load_model

    model = load_model(str(lively_model_dir))
    torch.manual_seed(7)
    table = model.get_input_embeddings().weight[torch.randint(0, 5000, (N,))].detach() * 4
    root = tmp_path_factory.mktemp("genai")
    return save_tiny_adapter(root / "de", lively_model_dir, table, decoding={"no_repeat_ngram_size": 3})


@pytest.fixture(scope="module")
def genai_dir(adapter_dir):
    out = adapter_dir.parent / "de-genai"
    result = run_cli(["export", adapter_dir, "-o", out, "--form", "genai", "--verify-steps", "8"])
    assert result.code == 0
    return out


def _softtool_generate(path, tmp_path, *flags, max_new: int = MAX_NEW) -> list[list[int]]:
    """`softtool generate PATH FLAGS` on the sentences, greedy, `max_new` new tokens: the token ids it writes."""
    inputs, outputs = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inputs.write_text("\n".join(SENTENCES) + "\n")
    outputs.unlink(missing_ok=True)
    args = ["generate", path, "-i", inputs, "-o", outputs, "--max-new-tokens", max_new, "--quiet", *flags]
    assert run_cli(args).code == 0
    return [json.loads(line)["token_ids"] for line in outputs.read_text().splitlines()]


def test_the_genai_folder_has_genai_config_and_last_token_logits(genai_dir):
    import onnx

    config = json.loads((genai_dir / CONFIG_FILE).read_text())
    meta = json.loads((genai_dir / "softtool_export.json").read_text())
    assert meta["genai"] is True and meta["top_k"] == 0 and meta["kv_layout"] == "slots"
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "llama" and config["model"]["vocab_size"] == meta["vocab_size"] == 49152
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 8)
    assert "attention_mask" not in decoder["inputs"] and config["search"]["past_present_share_buffer"] is True
    assert config["search"]["no_repeat_ngram_size"] == 3  # the task's decoding default
    graph = onnx.load(str(genai_dir / "model.onnx"), load_external_data=False).graph
    logits = next(o for o in graph.output if o.name == "logits")
    dims = [d.dim_value or d.dim_param for d in logits.type.tensor_type.shape.dim]
    assert dims[1:] == [1, 49152] and isinstance(dims[0], str)  # [batch, 1, vocab]: genai's last-token logits


def test_onnxruntime_genai_greedy_loop_writes_softtool_generate_s_tokens(genai_dir, adapter_dir, tmp_path):
    # The docs' genai example, run as a user runs it: onnxruntime-genai alone, softtool unimportable.
    script = tmp_path / "run_genai.py"
    script.write_text(docs_example("Running an export with onnxruntime-genai"))
    proc = subprocess.run(
        [sys.executable, "-c", NO_SOFTTOOL, str(script), str(genai_dir), str(MAX_NEW), *SENTENCES],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    genai = [json.loads(line)["tokens"] for line in proc.stdout.splitlines()]
    # softtool on the adapter (PyTorch) and on the genai folder itself (ONNX Runtime through softtool's engine).
    torch_tokens = _softtool_generate(adapter_dir, tmp_path)
    onnx_tokens = _softtool_generate(genai_dir, tmp_path)
    assert len(genai) == len(SENTENCES) and all(genai)
    assert len({tuple(t) for t in genai}) > 1  # the rows differ: the comparison is not of one repeated output
    assert genai == onnx_tokens == torch_tokens
    # The task's n-gram blocking (from genai_config.json on genai's side) decided some of those tokens.
    assert _softtool_generate(genai_dir, tmp_path, "--no-repeat-ngram-size", "0") != onnx_tokens


def test_softtool_s_static_step_runs_the_genai_form_as_its_dynamic_step(genai_dir):
    from softtool.runtime.decode import EngineOptions
    from softtool.runtime.onnx_backend import OnnxGenerator
    from softtool.search import SearchOptions

    generator = OnnxGenerator.from_export_dir(genai_dir)
    rows = [generator.encode({"source": s}) for s in SENTENCES[:6]]
    options = SearchOptions(max_new_tokens=12, eos_token_ids=[2], pad_token_id=2)
    dynamic = generator.generate(rows, None, options, EngineOptions(slots=4, step="dynamic"))
    static = generator.generate(rows, None, options, EngineOptions(slots=4, step="static"))
    assert static == dynamic and len({tuple(r[0]) for r in dynamic}) > 1


@pytest.mark.slow
def test_onnxruntime_genai_writes_softtool_s_tokens_for_smollm2_stopping_at_eos(tmp_path, smollm2, smollm2_tokenizer):
    # SmolLM2-135M-Instruct with the instruction's own embeddings as the prompt (what --init text starts from):
    # real weights, real German-ish outputs that end with EOS before the budget.
    from softtool.adapter import Adapter, AdapterMeta, save_adapter
    from softtool.models import DEFAULT_MODEL

    ids = smollm2_tokenizer("Translate English to German.", add_special_tokens=False)["input_ids"]
    meta = AdapterMeta(
        base_model=DEFAULT_MODEL,
        num_virtual_tokens=len(ids),
        token_dim=576,
        vocab_size=49152,
        template=f"[P:{len(ids)}]\nEnglish: {{source}}\nGerman:",
        task="translation",
        task_options={"src": "en", "tgt": "de"},
        decoding={"no_repeat_ngram_size": 3},
    )
    table = smollm2.get_input_embeddings().weight[ids].detach().clone()
    adapter = save_adapter(tmp_path / "de", Adapter(table, meta), smollm2.config)
    out = tmp_path / "de-genai"
    assert run_cli(["export", adapter, "-o", out, "--form", "genai", "--verify-steps", "4"]).code == 0
    script = tmp_path / "run_genai.py"
    script.write_text(docs_example("Running an export with onnxruntime-genai"))
    proc = subprocess.run(
        [sys.executable, "-c", NO_SOFTTOOL, str(script), str(out), "32", *SENTENCES],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    genai = [json.loads(line)["tokens"] for line in proc.stdout.splitlines()]
    softtool_tokens = _softtool_generate(out, tmp_path, max_new=32)
    assert len(genai) == len(SENTENCES) and genai == softtool_tokens
    assert any(0 < len(t) < 32 for t in genai)  # some rows ended at EOS, in both loops alike


def test_the_genai_form_refuses_what_genai_cannot_feed(adapter_dir, tmp_path, capsys):
    for extra, said in ((["--prompt-table-input"], "--prompt-table-input"), (["--top-k", "8"], "--top-k")):
        result = run_cli(["export", adapter_dir, "-o", tmp_path / "x", "--form", "genai", *extra], capsys)
        assert said in user_error(result.code, result.err)
        assert not (tmp_path / "x").exists()
