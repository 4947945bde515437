"""The PyTorch backend: the decode loop over its slot cache with the C++ search gives token for token what
transformers' generate gives on the same merged embeddings."""

from __future__ import annotations

import pytest
import torch

from helpers import hf_generate_rows
from softtool.models import load_model
from softtool.prompts.template import Template
from softtool.runtime.torch_backend import TorchGenerator
from softtool.search import SearchOptions

SOURCES = ["A man rides a bike.", "Two dogs.", "A woman in a blue coat waits for the bus."]


def _generator(model, tokenizer, template, **kw):
    torch.manual_seed(0)
    n = Template.parse(template).num_virtual_tokens
    table = model.get_input_embeddings().weight[torch.randint(0, 5000, (n,))] * 3
    return TorchGenerator(model, tokenizer, Template.parse(template), table, **kw)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.mark.parametrize("template", ["[P:5]English: {source}\nGerman:", "[P:3]English: {source}[P:2]German:"])
def test_greedy_equals_transformers_generate(tiny, smollm2_tokenizer, template):
    generator = _generator(tiny, smollm2_tokenizer, template)
    rows = [generator.encode({"source": s}) for s in SOURCES]
    got = generator.generate(rows, None, SearchOptions(max_new_tokens=12, eos_token_ids=[2], pad_token_id=2))
    assert got == hf_generate_rows(tiny, generator, rows, max_new_tokens=12)
    assert all(len(item[0]) > 0 for item in got)


def test_beam_search_equals_transformers_generate(tiny, smollm2_tokenizer):
    generator = _generator(tiny, smollm2_tokenizer, "[P:4]English: {source}\nGerman:")
    rows = [generator.encode({"source": s}) for s in SOURCES]
    options = SearchOptions(max_new_tokens=8, eos_token_ids=[2], pad_token_id=2, num_beams=3, num_return_sequences=2)
    got = generator.generate(rows, None, options)
    assert got == hf_generate_rows(tiny, generator, rows, max_new_tokens=8, num_beams=3, num_return_sequences=2)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_top_k_head_gives_the_full_logits_tokens(lively_model_dir, smollm2_tokenizer, num_beams):
    """What a GPU does by default (only k candidates per row leave the device), run here on the CPU: greedy and
    beam search over the top 8 equal the search over all logits."""
    model = load_model(str(lively_model_dir))
    full = _generator(model, smollm2_tokenizer, "[P:4]English: {source}\nGerman:")
    top = _generator(model, smollm2_tokenizer, "[P:4]English: {source}\nGerman:", top_k=8)
    assert (full.top_k, top.top_k) == (0, 8)  # the CPU default is full logits
    rows = [full.encode({"source": s}) for s in SOURCES]
    options = SearchOptions(max_new_tokens=10, eos_token_ids=[2], pad_token_id=2, num_beams=num_beams)
    got = top.generate(rows, None, options)
    assert got == full.generate(rows, None, options) and len({tuple(item[0]) for item in got}) > 1


def test_the_prefix_cache_is_computed_once_per_prompt(tiny, smollm2_tokenizer):
    generator = _generator(tiny, smollm2_tokenizer, "[P:4]English: {source}\nGerman:")
    options = SearchOptions(max_new_tokens=4, eos_token_ids=[2], pad_token_id=2)
    rows = [generator.encode({"source": s}) for s in SOURCES]
    first = generator.generate(rows, None, options)
    cached = generator._prefix[0]
    assert generator.generate(rows, None, options) == first
    assert generator._prefix[0] is cached
    generator.set_prompt(generator.table * 2)  # a new prompt must not reuse the old keys/values
    assert generator._prefix is None


@pytest.mark.slow
def test_greedy_equals_transformers_generate_on_smollm2(smollm2, smollm2_tokenizer):
    generator = _generator(smollm2, smollm2_tokenizer, "[P:4]English: {source}\nGerman:")
    rows = [generator.encode({"source": s}) for s in SOURCES[:2]]
    got = generator.generate(rows, None, SearchOptions(max_new_tokens=4, eos_token_ids=[2], pad_token_id=2))
    assert got == hf_generate_rows(smollm2, generator, rows, max_new_tokens=4)


def test_several_adapters_share_one_generator_and_a_mixed_batch_equals_each_alone(tmp_path, lively_model_dir):
    """Tasks with different templates in one generator: each row uses its own task's prompt and template."""
    from softtool.adapter import Adapter, AdapterMeta, save_adapter

    model = load_model(str(lively_model_dir))
    embed = model.get_input_embeddings().weight
    paths = []
    for k, template in enumerate(["[P:4]English: {source}\nGerman:", "[P:4]Summarize: {source}\nSummary:"]):
        torch.manual_seed(k)
        meta = AdapterMeta(str(lively_model_dir), 4, embed.shape[1], embed.shape[0], template)
        paths.append(save_adapter(tmp_path / f"task{k}", Adapter(embed[torch.randint(0, 5000, (4,))] * 2, meta)))
    both = TorchGenerator.from_adapters(paths)
    assert both.num_tasks == 2 and both.shares_prefix
    options = SearchOptions(max_new_tokens=8, eos_token_ids=[2], pad_token_id=2)
    tasks = [0, 1, 1, 0, 1]
    rows = [both.encode({"source": s}, task=t) for s, t in zip(SOURCES + SOURCES[:2], tasks, strict=True)]
    mixed = both.generate(rows, tasks, options)
    alone = [TorchGenerator.from_adapter(p, model=model, tokenizer=both.tokenizer) for p in paths]
    assert mixed == [alone[t].generate([row], None, options)[0] for row, t in zip(rows, tasks, strict=True)]
    assert rows[0] != both.encode({"source": SOURCES[0]}, task=1)  # the templates really differ


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_a_compile_mode_that_captures_graphs_of_its_own_is_refused(tiny, smollm2_tokenizer, mode):
    """softtool captures the static step itself; torch.compile's own CUDA graphs would capture inside that capture."""
    with pytest.raises(ValueError, match="captures CUDA graphs of its own"):
        _generator(tiny, smollm2_tokenizer, "[P:5]English: {source}\nGerman:", compile_mode=mode)
