"""The decode loop (softtool.runtime.decode): continuous batching against static batches on both backends,
slot reuse, streaming, and the ONNX backend's in-place cache through IO binding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softtool.runtime.decode import EngineOptions, greedy_only
from softtool.search import SearchOptions

TEMPLATE = "[P:4]English: {source}\nGerman:"
SOURCES = [
    "A dog runs on the beach.",
    "Two children are playing football in a park near the river.",
    "Hello.",
    "A man in a red jacket rides a bicycle down a busy street in the old town.",
    "Five people.",
    "The sun sets.",
    "A woman reads a book on a bench while her dog sleeps at her feet.",
    "Rain.",
    "Three boys jump into a lake.",
]


@pytest.fixture(scope="module")
def tiny(lively_model_dir):
    from softtool.models import load_model

    return load_model(str(lively_model_dir))


@pytest.fixture(scope="module")
def torch_gen(tiny, smollm2_tokenizer):
    from softtool.prompts.template import Template
    from softtool.runtime.torch_backend import TorchGenerator

    torch.manual_seed(0)
    table = tiny.get_input_embeddings().weight[torch.randint(0, 5000, (4,))] * 3
    return TorchGenerator(tiny, smollm2_tokenizer, Template.parse(TEMPLATE), table)


@pytest.fixture(scope="module")
def onnx_gen(tmp_path_factory, torch_gen, lively_model_dir):
    from softtool.adapter import Adapter, AdapterMeta, save_adapter
    from softtool.export.onnx import ExportOptions, export_adapters
    from softtool.runtime.onnx_backend import OnnxGenerator

    root = tmp_path_factory.mktemp("decode")
    meta = AdapterMeta(
        base_model=str(lively_model_dir),
        num_virtual_tokens=4,
        token_dim=torch_gen.table.shape[1],
        vocab_size=torch_gen.vocab_size,
        template=TEMPLATE,
    )
    adapter = save_adapter(root / "adapter", Adapter(torch_gen.table.clone(), meta))
    export_adapters([adapter], root / "onnx", ExportOptions(verify_steps=4))
    return OnnxGenerator.from_export_dir(root / "onnx", threads=1)


def _eos_that_ends_rows(gen, rows) -> int:
    """A token the model emits early in some rows but not all: using it as EOS makes rows end at different steps."""
    plain = gen.generate(rows, None, SearchOptions(max_new_tokens=12, eos_token_ids=[], pad_token_id=2))
    counts: dict[int, int] = {}
    for item in plain:
        for t in set(item[0][:6]):
            counts[t] = counts.get(t, 0) + 1
    # The token present early in the most rows without being in all of them.
    return max((t for t, c in counts.items() if c < len(rows)), key=lambda t: counts[t])


def _compare(continuous, static):
    """Share of identical rows, and for each differing row its first differing step (printed on failure)."""
    diffs = []
    for i, (a, b) in enumerate(zip(continuous, static, strict=True)):
        if a != b:
            step = next(
                (k for k, (x, y) in enumerate(zip(a[0], b[0], strict=False)) if x != y), min(map(len, (a[0], b[0])))
            )
            diffs.append(f"row {i}: first difference at step {step}")
    return 1 - len(diffs) / len(static), diffs


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_continuous_batching_gives_the_static_batches_greedy_outputs(backend, torch_gen, onnx_gen):
    gen = torch_gen if backend == "torch" else onnx_gen
    rows = [gen.encode({"source": s}) for s in SOURCES * 3]
    eos = _eos_that_ends_rows(gen, rows)
    options = SearchOptions(max_new_tokens=16, eos_token_ids=[eos], pad_token_id=2)
    static = gen.generate(rows, None, options, EngineOptions(slots=4, continuous=False))
    continuous = gen.generate(rows, None, options, EngineOptions(slots=4))
    lengths = {len(item[0]) for item in static}
    assert len(lengths) > 2, "rows must end at different steps for the test to mean anything"
    share, diffs = _compare(continuous, static)
    assert share >= 0.99, diffs


def test_continuous_sampling_gives_the_static_samples(torch_gen):
    rows = [torch_gen.encode({"source": s}) for s in SOURCES]
    options = SearchOptions(
        max_new_tokens=10, eos_token_ids=[2], pad_token_id=2, do_sample=True, temperature=0.8, top_k=20, seed=7
    )
    static = torch_gen.generate(rows, None, options, EngineOptions(slots=3, continuous=False))
    continuous = torch_gen.generate(rows, None, options, EngineOptions(slots=3))
    share, diffs = _compare(continuous, static)
    assert share >= 0.99, diffs
    greedy = torch_gen.generate(rows, None, SearchOptions(max_new_tokens=10, eos_token_ids=[2], pad_token_id=2))
    assert continuous != greedy  # really sampled


class _WatchedSearch:
    """The engine's SlotSearch, checking after every admission that no slot stays free while rows wait."""

    def __init__(self, search):
        self.search = search
        self.admissions = 0

    def admit(self):
        admitted = self.search.admit()
        self.admissions += len(admitted)
        assert self.search.num_pending() == 0 or self.search.num_active() == self.search.num_slots()
        return admitted

    def __getattr__(self, name):
        return getattr(self.search, name)


def test_a_finished_rows_slot_takes_the_next_row_at_once(torch_gen):
    from softtool.runtime.decode import Engine

    rows = [torch_gen.row_ids([torch_gen.encode({"source": s})], [0])[0] for s in SOURCES]
    eos = _eos_that_ends_rows(torch_gen, [torch_gen.encode({"source": s}) for s in SOURCES])
    options = SearchOptions(max_new_tokens=12, eos_token_ids=[eos], pad_token_id=2)
    engine = Engine(torch_gen, options, slots=2, capacity=max(map(len, rows)) + 13)
    engine.search = watched = _WatchedSearch(engine.search)
    items = [engine.submit(row) for row in rows]
    hosted: dict[int, list[int]] = {0: [], 1: []}
    streamed: dict[int, list[int]] = {i: [] for i in items}
    finished = {}
    while not engine.done:
        emitted, done = engine.step()
        for item, token in emitted:
            streamed[item].append(token)
        finished.update(done)
        for slot in (0, 1):
            item = engine.search.slot_item(slot)
            if item >= 0 and (not hosted[slot] or hosted[slot][-1] != item):
                hosted[slot].append(item)
    assert sorted(finished) == items and watched.admissions == len(items)
    assert len(hosted[0]) > 1 and len(hosted[1]) > 1  # both slots were reused
    lengths = {len(hyp.tokens) for hyp in finished.values()}
    assert len(lengths) > 1, "rows must end at different steps for the test to mean anything"
    for item, hyp in finished.items():
        # The stream is the hypothesis, plus the EOS when the row stopped on it.
        assert streamed[item][: len(hyp.tokens)] == list(hyp.tokens)
        assert streamed[item][len(hyp.tokens) :] in ([], [eos])
    static = torch_gen.generate(
        [torch_gen.encode({"source": s}) for s in SOURCES], None, options, EngineOptions(continuous=False)
    )
    assert [[list(finished[i].tokens)] for i in items] == static


def test_onnx_backend_writes_the_cache_in_place_through_io_binding(onnx_gen):
    rows = [onnx_gen.encode({"source": s}) for s in SOURCES[:3]]
    ids = onnx_gen.row_ids(rows, [0, 0, 0])
    onnx_gen.reserve(4, 40)
    before = [t.data_ptr() for t in onnx_gen.kv]
    onnx_gen.prefill([2, 0, 1], ids, [0, 0, 0])
    assert [t.data_ptr() for t in onnx_gen.kv] == before  # the same buffers, written by ONNX Runtime
    keys = onnx_gen.kv[0]
    for slot, row in zip([2, 0, 1], ids, strict=True):
        written = keys[slot].abs().sum(dim=(0, 2))  # per position
        assert bool((written[: len(row)] > 0).all()) and not bool(written[len(row) : -1].any())
    assert not bool(keys[3].any())  # the slot nobody used is untouched
    onnx_gen.step(np.asarray([7, 7, 7]), np.asarray([len(ids[2]), len(ids[0]), len(ids[1])]))
    assert bool(keys[0, :, len(ids[2])].any())  # the step wrote slot 0's next position in place


def test_onnx_and_torch_backends_decode_the_same_rows_in_the_same_slots(torch_gen, onnx_gen):
    rows = [torch_gen.encode({"source": s}) for s in SOURCES]
    options = SearchOptions(max_new_tokens=12, eos_token_ids=[2], pad_token_id=2)
    assert onnx_gen.generate(rows, None, options, EngineOptions(slots=3)) == torch_gen.generate(
        rows, None, options, EngineOptions(slots=3)
    )


@pytest.mark.slow
def test_continuous_batching_on_smollm2_equals_static_batches(smollm2, smollm2_tokenizer, shared_data):
    import gzip

    from softtool.prompts.encoder import PromptConfig, initial_table
    from softtool.prompts.template import Template
    from softtool.runtime.torch_backend import TorchGenerator

    with gzip.open(shared_data / "multi30k" / "val.en.gz", "rt") as fh:
        sources = [next(fh).strip() for _ in range(24)]
    table = initial_table(PromptConfig(num_virtual_tokens=8), smollm2.get_input_embeddings())
    gen = TorchGenerator(smollm2, smollm2_tokenizer, Template.parse("[P:8]English: {source}\nGerman:"), table)
    rows = [gen.encode({"source": s}) for s in sources]
    newline = smollm2_tokenizer("\n", add_special_tokens=False)["input_ids"][-1]  # ends rows at different steps
    options = SearchOptions(max_new_tokens=24, eos_token_ids=[smollm2_tokenizer.eos_token_id, newline], pad_token_id=2)
    static = gen.generate(rows, None, options, EngineOptions(slots=8, continuous=False))
    continuous = gen.generate(rows, None, options, EngineOptions(slots=8))
    share, diffs = _compare(continuous, static)
    assert share >= 0.99, diffs


def test_rows_with_choices_get_more_than_their_greedy_choice():
    # A row constrained to choices takes its best allowed token, often not the arg-max, so the static step must
    # hand the search its full head (logits or top-k), not only the greedy id.
    assert greedy_only(SearchOptions(eos_token_ids=[2]))
    assert not greedy_only(SearchOptions(eos_token_ids=[2], choices=[[5], [6, 7]]))
