"""The ONNX Runtime backend against transformers' generate on the same merged embeddings (tiny model, then SmolLM2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softtool.errors import SofttoolError
from softtool.search import SearchOptions

pytest.importorskip("softtool._core", reason="the ONNX backend drives the compiled search core")

PREFIX = "[P:6]English: {source}\nGerman:"
SPLIT = "[P:4]Context: {context}[P:2]Question: {question} Answer:"
SENTENCES = ["A dog runs on the beach.", "Two children are playing football in a park near the river.", "Hello."]


def _adapter(path, model, template, seed, n=6):
    from softtool.adapter import Adapter, AdapterMeta, save_adapter

    torch.manual_seed(seed)
    hidden = model.config.hidden_size
    meta = AdapterMeta(
        base_model=model.name_or_path,
        num_virtual_tokens=n,
        token_dim=hidden,
        vocab_size=model.config.vocab_size,
        template=template,
    )
    # Scaled like real embeddings so the prompt actually steers the random model.
    table = torch.randn(n, hidden) * model.get_input_embeddings().weight.std()
    return save_adapter(path, Adapter(table, meta), model.config)


@pytest.fixture(scope="session")
def exports(tmp_path_factory, tiny_model):
    """A prefix export, a split (P-tuning) export, and a two-task export with the table as a graph input."""
    from softtool.export.onnx import ExportOptions, export_adapters

    root = tmp_path_factory.mktemp("onnx-backend")
    a = _adapter(root / "a", tiny_model, PREFIX, seed=1)
    b = _adapter(root / "b", tiny_model, PREFIX, seed=2)
    split = _adapter(root / "split", tiny_model, SPLIT, seed=3)
    fast = ExportOptions(verify_steps=4)
    export_adapters([a], root / "prefix", fast)
    export_adapters([split], root / "split-onnx", fast)
    export_adapters([a, b], root / "multi", ExportOptions(prompt_table_input=True, verify_steps=4))
    export_adapters([a], root / "topk", ExportOptions(top_k=8, verify_steps=4))
    return root


def hf_generate(model, table, gen, rows, task_ids, options: SearchOptions):
    """transformers' generate on inputs_embeds with the prompt rows substituted (the independent reference)."""
    from softtool.prompts.template import assemble_ids

    v = model.config.vocab_size
    ids = [assemble_ids(gen.template, row, v, t) for row, t in zip(rows, task_ids, strict=True)]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), options.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    virtual = input_ids >= v
    emb = model.get_input_embeddings()(torch.where(virtual, 0, input_ids)).clone()
    emb[virtual] = torch.as_tensor(table)[(input_ids - v)[virtual]]
    out = model.generate(
        inputs_embeds=emb,
        attention_mask=mask,
        max_new_tokens=options.max_new_tokens,
        num_beams=options.num_beams,
        num_return_sequences=options.num_return_sequences,
        length_penalty=options.length_penalty,
        early_stopping=options.early_stopping,
        do_sample=False,
        eos_token_id=list(options.eos_token_ids),
        pad_token_id=options.pad_token_id,
    )
    k = options.num_return_sequences
    seqs = [row[: row.index(2)] if 2 in row else row for row in out.tolist()]  # EOS (id 2) and the padding after it
    return [seqs[i * k : (i + 1) * k] for i in range(len(ids))]


def _rows(gen, fields_list):
    return [gen.encode(f) for f in fields_list]


def _options(**kw):
    return SearchOptions(max_new_tokens=kw.pop("max_new_tokens", 10), eos_token_ids=[2], pad_token_id=2, **kw)


def test_greedy_tokens_equal_transformers_generate(exports, tiny_model):
    from softtool.runtime import load_generator

    gen = load_generator(exports / "prefix", backend="onnx")
    rows = _rows(gen, [{"source": s} for s in SENTENCES])
    options = _options()
    got = gen.generate(rows, None, options)
    assert got == hf_generate(tiny_model, gen.table, gen, rows, [0, 0, 0], options)
    assert all(len(item[0]) > 0 for item in got)


def test_beam_search_results_equal_transformers_generate(exports, tiny_model):
    from softtool.runtime.onnx_backend import OnnxGenerator

    gen = OnnxGenerator.from_export_dir(exports / "prefix")
    rows = _rows(gen, [{"source": s} for s in SENTENCES[:2]])
    options = _options(num_beams=3, num_return_sequences=2, length_penalty=1.2)
    got = gen.generate(rows, [0, 0], options)
    assert got == hf_generate(tiny_model, gen.table, gen, rows, [0, 0], options)
    assert got[0][0] != got[0][1]  # two different beams came back


def test_prompt_kv_precompute_gives_the_logits_of_feeding_the_prompt(exports):
    from softtool.runtime.onnx_backend import OnnxGenerator

    shared = OnnxGenerator.from_export_dir(exports / "prefix")
    full = OnnxGenerator.from_export_dir(exports / "prefix", precompute_prompt=False)
    assert shared.shares_prefix and not full.shares_prefix
    rows = _rows(shared, [{"source": s} for s in SENTENCES])
    np.testing.assert_allclose(shared.last_logits(rows), full.last_logits(rows), atol=1e-5, rtol=0)
    options = _options(max_new_tokens=12)
    assert shared.generate(rows, None, options) == full.generate(rows, None, options)


def test_mixed_task_batch_equals_each_task_alone(exports):
    from softtool.runtime.onnx_backend import OnnxGenerator

    gen = OnnxGenerator.from_export_dir(exports / "multi")
    assert gen.num_tasks == 2
    rows = _rows(gen, [{"source": s} for s in SENTENCES])
    options = _options(max_new_tokens=12)
    mixed = gen.generate(rows, [0, 1, 1], options)
    alone = [gen.generate([row], [task], options)[0] for row, task in zip(rows, [0, 1, 1], strict=True)]
    assert mixed == alone
    # Tokens of a random model barely depend on the prompt, so compare the logits too.
    mixed_logits = gen.last_logits(rows, [0, 1, 1])
    alone_logits = np.concatenate([gen.last_logits([row], [task]) for row, task in zip(rows, [0, 1, 1], strict=True)])
    np.testing.assert_allclose(mixed_logits, alone_logits, atol=1e-5, rtol=0)
    other_task = gen.last_logits(rows, [1, 0, 0])
    assert np.abs(other_task - mixed_logits).max() > 1e-3  # each row really read its own task's prompt


def test_tasks_added_at_run_time_need_no_re_export(exports):
    from softtool.runtime.onnx_backend import OnnxGenerator

    gen = OnnxGenerator.from_export_dir(exports / "multi")
    second = gen.table[6:12].copy()
    task = gen.add_task(second)  # the same prompt as task 1, now also task 2
    assert task == 2
    rows = _rows(gen, [{"source": SENTENCES[1]}])
    assert gen.generate(rows, [2], _options()) == gen.generate(rows, [1], _options())
    baked = OnnxGenerator.from_export_dir(exports / "prefix")
    with pytest.raises(SofttoolError, match="--prompt-table-input"):
        baked.add_task(second)


def test_ptuning_split_template_generation_equals_transformers(exports, tiny_model):
    from softtool.runtime.onnx_backend import OnnxGenerator

    gen = OnnxGenerator.from_export_dir(exports / "split-onnx")
    assert not gen.shares_prefix  # virtual tokens inside the text: nothing to share
    rows = _rows(gen, [{"context": s, "question": "Who is there?"} for s in SENTENCES])
    options = _options()
    assert gen.generate(rows, None, options) == hf_generate(tiny_model, gen.table, gen, rows, [0, 0, 0], options)


def test_topk_graph_decodes_like_the_full_logits_graph(exports):
    from softtool.runtime.onnx_backend import OnnxGenerator

    full = OnnxGenerator.from_export_dir(exports / "prefix")
    topk = OnnxGenerator.from_export_dir(exports / "topk")
    rows = _rows(full, [{"source": s} for s in SENTENCES])
    assert topk.generate(rows, None, _options()) == full.generate(rows, None, _options())


def test_generate_cli_on_an_export_folder_uses_the_onnx_backend(exports, capsys):
    from softtool.cli import main
    from softtool.runtime.onnx_backend import OnnxGenerator

    gen = OnnxGenerator.from_export_dir(exports / "prefix")
    main(["generate", str(exports / "prefix"), SENTENCES[0], "--max-new-tokens", "6"])
    printed = capsys.readouterr().out.strip()
    tokens = gen.generate([gen.encode({"source": SENTENCES[0]})], None, _options(max_new_tokens=6))[0][0]
    assert printed == gen.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert printed


def test_task_id_outside_the_table_is_refused(exports):
    from softtool.runtime.onnx_backend import OnnxGenerator

    gen = OnnxGenerator.from_export_dir(exports / "multi")
    rows = _rows(gen, [{"source": "Hi."}])
    with pytest.raises(SofttoolError, match="task id 2 is outside the 2 task"):
        gen.generate(rows, [2], _options())
    with pytest.raises(SofttoolError, match="task id -1"):
        gen.generate(rows, [-1], _options())


def test_token_ids_outside_the_id_range_are_refused(exports):
    from softtool.runtime.onnx_backend import OnnxGenerator

    gen = OnnxGenerator.from_export_dir(exports / "multi")
    v = gen.vocab_size
    with pytest.raises(SofttoolError, match="token id 49152 is outside the vocabulary"):
        gen.generate([[[5, v]]], [0], _options())
    with pytest.raises(SofttoolError, match="token id -3"):
        gen.generate([[[-3]]], [0], _options())


@pytest.mark.slow
def test_smollm2_export_greedy_tokens_equal_pytorch(tmp_path, smollm2):
    """The real model: export (measured in benchmarks/results/export_smollm2.json) and greedy parity."""
    from softtool.adapter import Adapter, AdapterMeta, save_adapter
    from softtool.export.onnx import ExportOptions, export_adapters
    from softtool.runtime.onnx_backend import OnnxGenerator

    # A vocabulary-initialised prompt (the default init), so the model produces sensible text.
    rows = torch.randint(0, 49152, (8,), generator=torch.Generator().manual_seed(0))
    meta = AdapterMeta(
        base_model="smollm2-135m",
        num_virtual_tokens=8,
        token_dim=576,
        vocab_size=49152,
        template="[P:8]Translate English to German.\nEnglish: {source}\nGerman:",
    )
    table = smollm2.get_input_embeddings().weight[rows].clone()
    adapter = save_adapter(tmp_path / "ad", Adapter(table, meta), smollm2.config)
    report = export_adapters([adapter], tmp_path / "onnx", ExportOptions(verify_steps=4)).verification
    assert report["passed"] and report["max_abs_logit_diff"] < 1e-3
    gen = OnnxGenerator.from_export_dir(tmp_path / "onnx")
    rows = _rows(gen, [{"source": s} for s in SENTENCES[:2]])
    options = _options(max_new_tokens=12)
    got = gen.generate(rows, None, options)
    assert got == hf_generate(smollm2, gen.table, gen, rows, [0, 0], options)
    assert all(len(item[0]) > 0 for item in got)
