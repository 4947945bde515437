"""Gemma 3 (`gemma3-270m`): what differs from Llama-style models, checked on a tiny random Gemma3 and, in the
slow tests, on the real model.

The tiny config has what makes Gemma 3 different: token embeddings scaled by sqrt(hidden) inside the embedding
module, sliding-window layers next to a global one (a window of 4, so it binds in every test sequence),
query/key norms, an attention scale that is not head_dim**-0.5, final logit softcapping, and a vocabulary over
65,536 (so export emits top-k by default, as for the real 262,144).
"""

from __future__ import annotations

import pytest
import torch

from helpers import hf_generate_rows, loss_and_grad, save_tiny_model, training_features
from softtool.models import load_model
from softtool.prompts.embedding import merge_embeddings
from softtool.prompts.encoder import PromptConfig, build_prompt_module, initial_table
from softtool.prompts.template import Template
from softtool.runtime.torch_backend import TorchGenerator
from softtool.search import SearchOptions

PREFIX = "[P:6]English: {source}\nGerman:"
SPLIT = "[P:4]English: {source}[P:2]German:"
# Longer than the window of 4 and of different lengths, so rows are padded and the window binds.
SOURCES = [
    "A man in a red jacket rides a bicycle down a busy street.",
    "Two dogs.",
    "A woman in a blue coat waits for the bus next to the river.",
]
WINDOW = 4
VOCAB = 70_000  # above export's LARGE_VOCAB; ids past the tokenizer's 49,152 are never produced by it
EOS = 2


def _options(**kw):
    return SearchOptions(max_new_tokens=kw.pop("max_new_tokens", 10), eos_token_ids=[EOS], pad_token_id=EOS, **kw)


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Gemma3 with SmolLM2's tokenizer, saved as a normal model folder."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return save_tiny_model(
        tmp_path_factory.mktemp("tiny-gemma3"),
        smollm2_tokenizer,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,  # scaling 24**-0.5, not head_dim**-0.5
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=WINDOW,
        final_logit_softcapping=30.0,
        max_position_embeddings=512,
        initializer_range=0.2,  # wide weights: greedy outputs depend on the input and rows diverge
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def gemma(tiny_gemma_dir):
    return load_model(str(tiny_gemma_dir))


def _generator(model, tokenizer, template, seed=0):
    n = Template.parse(template).num_virtual_tokens
    table = initial_table(PromptConfig(num_virtual_tokens=n), model.get_input_embeddings(), seed=seed)
    return TorchGenerator(model, tokenizer, Template.parse(template), table)


def test_a_text_initialized_prompt_reproduces_the_texts_logits(gemma, smollm2_tokenizer):
    text = "Translate English to German:"
    text_ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(text_ids)
    prompt = build_prompt_module(
        PromptConfig(num_virtual_tokens=n, init="text", init_text=text), gemma, smollm2_tokenizer
    )
    table = prompt()
    source = smollm2_tokenizer(" A dog runs on the beach.", add_special_tokens=False)["input_ids"]
    virtual = torch.tensor([[VOCAB + j for j in range(n)] + source])
    with torch.no_grad():
        want = gemma(input_ids=torch.tensor([text_ids + source])).logits
        got = gemma(inputs_embeds=merge_embeddings(gemma, virtual, table, VOCAB)).logits
        # The same rows without the embedding's sqrt(hidden) scale: what a prompt drawn from the raw weights gives.
        raw = gemma.get_input_embeddings().weight[torch.tensor(text_ids)]
        unscaled = gemma(inputs_embeds=merge_embeddings(gemma, virtual, raw, VOCAB)).logits
    assert torch.equal(got, want)
    assert not torch.allclose(unscaled, want, atol=1e-2)


def test_sliding_layers_see_only_the_last_window_of_positions(gemma):
    from softtool.runtime.slot_model import slot_masks

    masks = slot_masks(gemma.config, torch.tensor([[3, 4, 5, 6, 7]]), capacity=10, dtype=torch.float32)
    assert set(masks) == {"full_attention", "sliding_attention"}
    full, sliding = (masks[k][0, 0] == 0 for k in ("full_attention", "sliding_attention"))
    assert full[4].nonzero().flatten().tolist() == list(range(8))  # position 7 sees 0..7
    assert sliding[4].nonzero().flatten().tolist() == [4, 5, 6, 7]  # the last WINDOW of them
    assert sliding[0].nonzero().flatten().tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("template", [PREFIX, SPLIT])
def test_torch_backend_greedy_equals_transformers_generate(gemma, smollm2_tokenizer, template):
    gen = _generator(gemma, smollm2_tokenizer, template)
    rows = [gen.encode({"source": s}) for s in SOURCES]
    got = gen.generate(rows, None, _options(max_new_tokens=12))
    assert got == hf_generate_rows(gemma, gen, rows, EOS, max_new_tokens=12)
    assert len({tuple(item[0]) for item in got}) > 1  # the rows really differ


def test_plain_model_greedy_equals_transformers_generate_on_token_ids(gemma, smollm2_tokenizer):
    """No prompt rows at all: the slot model over token ids against generate(input_ids=...)."""
    gen = TorchGenerator(gemma, smollm2_tokenizer, Template.parse("{source}"))
    rows = [gen.encode({"source": s}) for s in SOURCES]
    got = gen.generate(rows, None, _options(max_new_tokens=12))
    for row, item in zip(rows, got, strict=True):
        ids = torch.tensor([gen.row_ids([row], [0])[0]])
        seq = gemma.generate(input_ids=ids, do_sample=False, max_new_tokens=12, eos_token_id=[EOS], pad_token_id=EOS)
        seq = seq[0, ids.shape[1] :].tolist()
        assert item == [seq[: seq.index(EOS)] if EOS in seq else seq]


TRAIN_TARGETS = [" Ein Mann fährt Rad.", " Zwei Hunde.", " Eine Frau wartet auf den Bus."]


def test_training_loss_is_the_models_own_loss_on_both_paths(gemma, smollm2_tokenizer):
    """The naive path's loss equals the cross-entropy of the model's own (softcapped) logits on the same
    embeddings, and the shared-prefix path (the prompt's cache broadcast to the batch; the prompt is longer than
    the window) gives the same loss and prompt gradient."""
    from softtool.training.batching import IGNORE, collate

    template = Template.parse(PREFIX)
    feats = training_features(smollm2_tokenizer, template, VOCAB, SOURCES, TRAIN_TARGETS)
    table = initial_table(PromptConfig(num_virtual_tokens=6), gemma.get_input_embeddings(), seed=3)
    naive_loss, naive_grad = loss_and_grad(gemma, feats, table, 0, VOCAB, EOS)
    cached_loss, cached_grad = loss_and_grad(gemma, feats, table, 6, VOCAB, EOS)
    batch = collate(feats, EOS)
    with torch.no_grad():
        logits = gemma(
            inputs_embeds=merge_embeddings(gemma, batch.input_ids, table, VOCAB), attention_mask=batch.attention_mask
        ).logits
    own = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE
    )
    assert naive_loss == pytest.approx(own.item(), rel=1e-5)
    assert cached_loss == pytest.approx(naive_loss, rel=1e-5)
    assert torch.allclose(cached_grad, naive_grad, rtol=1e-4, atol=1e-5 * naive_grad.abs().max().item())
    assert naive_grad.abs().sum() > 0


@pytest.mark.parametrize("method,template", [("prompt", PREFIX), ("ptuning", SPLIT)])
def test_training_lowers_the_dev_loss(tmp_path, tiny_gemma_dir, method, template):
    from helpers import write_translation_data
    from softtool.training import DataOptions, TrainOptions, train_prompt

    data = write_translation_data(tmp_path / "data")
    summary = train_prompt(
        DataOptions(task="translation", data=str(data), task_options={"src": "en", "tgt": "de"}),
        PromptConfig(method=method, template=template),
        TrainOptions(
            max_steps=12, batch_size=3, lr=0.1, warmup_steps=0, eval_every=6, eval_limit=3, checkpoint_every=0
        ),
        tmp_path / "out",
        model_name=str(tiny_gemma_dir),
        progress=False,
    )
    dev = [row["dev_loss"] for row in summary.result.state.history if row["kind"] == "eval"]
    assert dev[-1] < dev[0]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, gemma, smollm2_tokenizer, tiny_gemma_dir):
    """fp32 exports of a prefix and a split prompt (default options: top-k for this vocabulary), and int8."""
    from softtool.adapter import Adapter, AdapterMeta, save_adapter
    from softtool.export.onnx import ExportOptions, export_adapters

    root = tmp_path_factory.mktemp("gemma-onnx")
    metas = {}
    for name, template in (("prefix", PREFIX), ("split", SPLIT)):
        gen = _generator(gemma, smollm2_tokenizer, template, seed=1)
        meta = AdapterMeta(str(tiny_gemma_dir), gen.num_virtual, 32, VOCAB, template)
        adapter = save_adapter(root / f"{name}-adapter", Adapter(gen.table.clone(), meta))
        metas[name] = export_adapters([adapter], root / name, ExportOptions(verify_steps=8))
    metas["int8"] = export_adapters(
        [root / "prefix-adapter"], root / "int8", ExportOptions(dtype="int8", verify_steps=8)
    )
    return root, metas


def test_export_verifies_and_emits_the_top_k_for_a_large_vocabulary(exports):
    from softtool.export.onnx import AUTO_TOP_K

    _, metas = exports
    for name in ("prefix", "split", "int8"):
        meta = metas[name]
        assert meta.verification["passed"], (name, meta.verification)
        assert meta.top_k == AUTO_TOP_K and meta.outputs[:2] == ("topk_values", "topk_indices")
    assert metas["prefix"].verification["greedy_agreement"] == 1.0
    assert metas["prefix"].verification["max_abs_logit_diff"] < 1e-3


@pytest.mark.parametrize("name,template", [("prefix", PREFIX), ("split", SPLIT)])
def test_onnx_greedy_equals_torch_greedy(exports, gemma, smollm2_tokenizer, name, template):
    from softtool.runtime.onnx_backend import OnnxGenerator

    onnx_gen = OnnxGenerator.from_export_dir(exports[0] / name, threads=1)
    torch_gen = _generator(gemma, smollm2_tokenizer, template, seed=1)
    rows = [torch_gen.encode({"source": s}) for s in SOURCES]
    assert [onnx_gen.encode({"source": s}) for s in SOURCES] == rows
    options = _options(max_new_tokens=12)
    got = onnx_gen.generate(rows, None, options)
    assert got == torch_gen.generate(rows, None, options)
    assert got == hf_generate_rows(gemma, torch_gen, rows, EOS, max_new_tokens=12)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_continuous_batching_gives_the_static_batches_outputs(exports, gemma, smollm2_tokenizer, backend):
    from softtool.runtime.decode import EngineOptions
    from softtool.runtime.onnx_backend import OnnxGenerator

    if backend == "onnx":
        gen = OnnxGenerator.from_export_dir(exports[0] / "prefix", threads=1)
    else:
        gen = _generator(gemma, smollm2_tokenizer, PREFIX, seed=1)
    rows = [gen.encode({"source": s}) for s in SOURCES * 2]
    # As EOS a token that the first row emits after a few steps and the others do not: rows end at different
    # steps, so continuous batching hands a freed slot to the next row while the others still decode.
    plain = gen.generate(rows[:3], None, SearchOptions(max_new_tokens=10, eos_token_ids=[], pad_token_id=EOS))
    eos = next(t for t in plain[0][0][1:] if all(t not in item[0] for item in plain[1:]))
    options = SearchOptions(max_new_tokens=10, eos_token_ids=[eos], pad_token_id=EOS)
    continuous = gen.generate(rows, None, options, EngineOptions(slots=2))
    static = gen.generate(rows, None, options, EngineOptions(slots=2, continuous=False))
    assert len({len(item[0]) for item in static}) > 1
    assert continuous == static


def test_gemma3_270m_is_a_named_model_with_its_hub_id(tmp_path, monkeypatch):
    from softtool.models import EMBEDDED_MODELS, base_model_ref, embedded_model_dir

    monkeypatch.setenv("SOFTTOOL_CACHE", str(tmp_path))
    assert {"smollm2-135m", "gemma3-270m"} <= set(EMBEDDED_MODELS)
    ref = base_model_ref("gemma3-270m")
    assert ref.hub_id == "google/gemma-3-270m"
    assert (
        ref.local_path == str(embedded_model_dir("gemma3-270m").resolve()) == str(tmp_path / "models" / "gemma3-270m")
    )


# -- the real model (converted once into $SOFTTOOL_CACHE/models/gemma3-270m) -----------------------------------

REAL_SOURCES = ["A dog runs on the beach.", "Two children are playing football in a park."]
REAL_TEMPLATE = "[P:{n}] English: {{source}}\nGerman:"
INSTRUCTION = "Translate English to German."


@pytest.fixture(scope="module")
def real():
    from softtool.models import load_tokenizer

    return load_model("gemma3-270m"), load_tokenizer("gemma3-270m")


def _real_generator(model, tokenizer):
    """The instruction as a text-initialized prompt (so the model sees sensible input), on Gemma's own EOS."""
    n = len(tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"])
    config = PromptConfig(num_virtual_tokens=n, init="text", init_text=INSTRUCTION)
    table = initial_table(config, model.get_input_embeddings(), tokenizer)
    return TorchGenerator(model, tokenizer, Template.parse(REAL_TEMPLATE.format(n=n)), table)


@pytest.mark.slow
def test_gemma3_270m_greedy_equals_transformers_generate(real):
    model, tokenizer = real
    gen = _real_generator(model, tokenizer)
    rows = [gen.encode({"source": s}) for s in REAL_SOURCES]
    options = SearchOptions(
        max_new_tokens=8, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id
    )
    got = gen.generate(rows, None, options)
    for row, item in zip(rows, got, strict=True):
        ids = torch.tensor([gen.row_ids([row], [0])[0]])
        seq = model.generate(
            inputs_embeds=merge_embeddings(model, ids, gen.table, gen.vocab_size),
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=8,
            eos_token_id=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )[0].tolist()
        assert item == [seq[: seq.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in seq else seq]
    assert all(item[0] for item in got)


@pytest.mark.slow
def test_gemma3_270m_export_verifies_and_onnx_equals_torch(real, tmp_path):
    from softtool.adapter import Adapter, AdapterMeta, save_adapter
    from softtool.export.onnx import AUTO_TOP_K, ExportOptions, export_adapters
    from softtool.runtime.onnx_backend import OnnxGenerator

    model, tokenizer = real
    gen = _real_generator(model, tokenizer)
    meta = AdapterMeta("gemma3-270m", gen.num_virtual, gen.table.shape[1], gen.vocab_size, str(gen.template))
    adapter = save_adapter(tmp_path / "adapter", Adapter(gen.table.clone(), meta))
    exported = export_adapters([adapter], tmp_path / "onnx", ExportOptions(verify_steps=4))
    assert exported.verification["passed"] and exported.top_k == AUTO_TOP_K
    onnx_gen = OnnxGenerator.from_export_dir(tmp_path / "onnx")
    rows = [gen.encode({"source": s}) for s in REAL_SOURCES]
    options = SearchOptions(
        max_new_tokens=6, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id
    )
    assert onnx_gen.generate(rows, None, options) == gen.generate(rows, None, options)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_the_server_answers_with_the_backends_greedy_text(exports, tmp_path, gemma, smollm2_tokenizer, backend):
    """The server's engine thread and completion service (no HTTP) on Gemma3, from the adapter (torch) and
    from its top-k export (onnx): each completion is the generator's own greedy text for that prompt."""
    import asyncio
    import time

    from softtool.serve.app import ServerState
    from softtool.serve.options import ServeOptions
    from softtool.serve.protocol import CompletionRequest
    from softtool.serve.registry import load

    root, _ = exports
    folder = root / ("prefix-adapter" if backend == "torch" else "prefix")
    loaded = load([str(folder)], None, None, threads=1)
    assert loaded.backend == backend
    state = ServerState(ServeOptions(slots=2, max_length=64, max_tokens=12), loaded)
    name = next(iter(loaded.registry.tasks))

    async def run():
        state.engine.start()
        try:
            request = CompletionRequest(model=name, prompt=SOURCES, max_tokens=8)
            prepared = state.service.prepare(request, time.perf_counter())
            state.service.admit(prepared)
            return await state.service.complete(prepared)
        finally:
            await state.engine.stop()

    out = asyncio.run(run())
    gen = _generator(gemma, smollm2_tokenizer, PREFIX, seed=1)
    tokenizer = loaded.generator.tokenizer
    want = [gen.generate([gen.encode({"source": s})], None, _options(max_new_tokens=8))[0][0] for s in SOURCES]
    assert all(want) and [c.text for c in out.choices] == [
        tokenizer.decode(ids, skip_special_tokens=True) for ids in want
    ]
