"""softtool export on the tiny random Llama: the graph against plain transformers, the artifact, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from softtool.adapter import Adapter, AdapterMeta, save_adapter
from softtool.errors import SofttoolError

N = 6
PREFIX = "[P:6]English: {source}\nGerman:"
SPLIT = "[P:4]Context: {context}[P:2]Question: {question} Answer:"


def make_adapter(path, model_dir, template=PREFIX, seed=0, hidden=32, vocab=None, n=N):
    from softtool.models import load_model

    model = load_model(str(model_dir))
    torch.manual_seed(seed)
    meta = AdapterMeta(
        base_model=str(model_dir),
        num_virtual_tokens=n,
        token_dim=hidden,
        vocab_size=vocab or model.config.vocab_size,
        template=template,
    )
    return save_adapter(path, Adapter(torch.randn(n, hidden), meta), model.config)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_model_dir):
    """One fp32 export of a prefix prompt, shared by the tests that only read it."""
    from softtool.export.onnx import export_adapters

    root = tmp_path_factory.mktemp("export")
    adapter = make_adapter(root / "adapter", tiny_model_dir)
    meta = export_adapters([adapter], root / "onnx")
    return root / "onnx", adapter, meta


def reference_logits(model, table, ids, mask, vocab):
    """Plain transformers without any cache: inputs_embeds with the prompt rows substituted, last position."""
    ids_t = torch.as_tensor(ids)
    virtual = ids_t >= vocab
    emb = model.get_input_embeddings()(torch.where(virtual, 0, ids_t)).clone()
    emb[virtual] = table[(ids_t - vocab)[virtual]]
    mask_t = torch.as_tensor(mask)
    positions = (mask_t.cumsum(-1) - 1).masked_fill(mask_t == 0, 1)
    with torch.no_grad():
        return model(inputs_embeds=emb, attention_mask=mask_t, position_ids=positions).logits[:, -1].numpy()


def test_export_writes_a_self_contained_folder(tiny_export):
    from softtool.export_meta import ExportMeta

    folder, _, meta = tiny_export
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "prompt_table.safetensors", "softtool_export.json", "tokenizer.json"} <= names
    saved = ExportMeta.read(folder)
    assert saved == meta
    assert saved.num_virtual_tokens == N and saved.num_tasks == 1
    assert saved.num_layers == 2 and saved.num_kv_heads == 2 and saved.head_dim == 8
    assert saved.template == PREFIX and saved.kv_layout == "slots"
    assert saved.inputs[:2] == ("input_ids", "position_ids") and "beam_idx" not in saved.inputs
    assert saved.verification["passed"] and saved.verification["greedy_agreement"] == 1.0
    assert saved.verification["max_abs_logit_diff"] <= 1e-3


def test_an_export_of_another_format_version_is_refused_naming_the_softtool_that_wrote_it(tmp_path, tiny_export):
    from softtool import __version__
    from softtool.runtime.onnx_backend import OnnxGenerator

    folder = tmp_path / "copy"
    shutil.copytree(tiny_export[0], folder)
    data = json.loads((folder / "softtool_export.json").read_text())
    assert data["softtool_version"] == __version__
    data.update(format=1, softtool_version="0.1.0")  # what softtool 0.1.0's first exporter wrote
    (folder / "softtool_export.json").write_text(json.dumps(data))
    with pytest.raises(SofttoolError, match=r"format 1 \(written by softtool 0\.1\.0\).*re-run softtool export"):
        OnnxGenerator.from_export_dir(folder)
    del data["softtool_version"]
    (folder / "softtool_export.json").write_text(json.dumps(data))
    with pytest.raises(SofttoolError, match=r"format 1 \(no softtool version recorded\)"):
        OnnxGenerator.from_export_dir(folder)


def _slot_feeds(ids, positions, past):
    names = [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    return {"input_ids": ids, "position_ids": positions, **dict(zip(names, past, strict=True))}


def test_graph_logits_equal_transformers_at_prefill_and_each_cached_decode_step(tiny_export, tiny_model):
    """Plain onnxruntime, numpy in and out: rows of different lengths share a batch of slot buffers."""
    from softtool.export.verify import left_pad
    from softtool.runtime.onnx_backend import OnnxGenerator
    from softtool.runtime.session import create_session

    folder, _, meta = tiny_export
    gen = OnnxGenerator.from_export_dir(folder)
    v = meta.vocab_size
    table = torch.from_numpy(gen.table)
    rows = [[v + j for j in range(N)] + [100, 200, 300, 400], [v + j for j in range(N)] + [500, 600]]
    ids, mask, ref_positions = left_pad(rows, meta.pad_token_id)
    capacity = 20
    positions = np.where(mask == 1, ref_positions, capacity - 1)  # left padding goes to the scratch column
    session = create_session(folder / "model.onnx")
    past = [np.zeros((2, 2, capacity, 8), np.float32) for _ in range(4)]
    step_ids = ids
    for step in range(4):
        # The presents follow the logits; the graph's target scores (unused: no target_ids fed) come last.
        logits, *past = session.run(["logits", *meta.outputs[1:5]], _slot_feeds(step_ids, positions, past))
        want = reference_logits(tiny_model, table, ids, mask, v)
        np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0, err_msg=f"step {step}")
        step_ids = want.argmax(-1)[:, None].astype(np.int64)
        ids = np.concatenate([ids, step_ids], axis=1)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        ref_positions = ref_positions[:, -1:] + 1
        positions = ref_positions


def test_ptuning_split_template_exports_and_verifies(tmp_path, tiny_model_dir, tiny_model):
    from softtool.export.onnx import ExportOptions, export_adapters
    from softtool.runtime.session import create_session

    adapter = make_adapter(tmp_path / "ad", tiny_model_dir, template=SPLIT)
    meta = export_adapters([adapter], tmp_path / "onnx", ExportOptions(verify_steps=8))
    assert meta.verification["passed"]
    v = meta.vocab_size
    from softtool.adapter import load_adapter

    table = load_adapter(adapter).prompt_table
    # Virtual tokens in the middle of the text, as the split template places them.
    ids = np.array([[v, v + 1, v + 2, v + 3, 10, 11, 12, v + 4, v + 5, 13, 14]], dtype=np.int64)
    session = create_session(tmp_path / "onnx" / "model.onnx")
    past = [np.zeros((1, 2, ids.shape[1] + 1, 8), np.float32) for _ in range(4)]
    logits = session.run(["logits"], _slot_feeds(ids, np.arange(ids.shape[1])[None], past))[0]
    want = reference_logits(tiny_model, table, ids, np.ones_like(ids), v)
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)


def test_the_tied_embedding_is_stored_once_in_an_fp32_export(tiny_export, tiny_model):
    import onnx

    folder, _, _ = tiny_export
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    vocab, hidden = tiny_model.get_input_embeddings().weight.shape
    big = [i.name for i in graph.initializer if sorted(i.dims) == sorted([vocab, hidden])]
    assert len(big) == 1, big
    params = sum({p.data_ptr(): p.numel() for p in tiny_model.parameters()}.values())  # tied weights once
    assert (folder / "model.onnx").stat().st_size < 1.1 * 4 * params


def test_int8_and_fp16_exports_run_and_agree_on_most_greedy_tokens(tmp_path, tiny_model_dir, tiny_export):
    from softtool.export.onnx import ExportOptions, export_adapters
    from softtool.export.verify import THRESHOLDS

    adapter = make_adapter(tmp_path / "ad", tiny_model_dir)
    for dtype in ("int8", "fp16"):
        meta = export_adapters([adapter], tmp_path / dtype, ExportOptions(dtype=dtype, verify_steps=16))
        report = meta.verification
        assert report["passed"], report
        assert report["greedy_agreement"] >= THRESHOLDS[dtype][1]
        assert report["max_abs_logit_diff"] > 0  # really converted, not the fp32 graph
    import onnx

    fp32_size = (tiny_export[0] / "model.onnx").stat().st_size
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops  # the weight matrices really are 8-bit
    assert (tmp_path / "fp16" / "model.onnx").stat().st_size < 0.6 * fp32_size


def test_topk_output_gives_the_same_greedy_tokens(tmp_path, tiny_model_dir):
    from softtool.export.onnx import ExportOptions, export_adapters

    adapter = make_adapter(tmp_path / "ad", tiny_model_dir)
    meta = export_adapters([adapter], tmp_path / "onnx", ExportOptions(top_k=4, verify_steps=8))
    assert meta.verification["greedy_agreement"] == 1.0
    assert meta.verification["max_abs_logit_diff"] <= 1e-3


def test_failed_verification_exits_nonzero_saying_by_how_much(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from softtool.cli import main
    from softtool.export import verify

    adapter = make_adapter(tmp_path / "ad", tiny_model_dir)
    monkeypatch.setitem(verify.THRESHOLDS, "fp32", (-1.0, 1.0))  # no real difference can pass this
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(adapter), "-o", str(tmp_path / "onnx"), "--verify-steps", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "verification failed" in err and "max logit difference" in err and "exceeds -1" in err
    assert not (tmp_path / "onnx").exists()  # a failed export writes nothing
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")]  # and leaves no temporary folder


def test_a_failed_export_over_an_old_one_leaves_the_old_one_intact(tmp_path, tiny_model_dir, tiny_export, monkeypatch):
    from softtool.export import verify
    from softtool.export.onnx import ExportOptions, export_adapters

    folder = tmp_path / "onnx"
    shutil.copytree(tiny_export[0], folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    adapter = make_adapter(tmp_path / "ad", tiny_model_dir, seed=5)
    monkeypatch.setitem(verify.THRESHOLDS, "fp32", (-1.0, 1.0))
    with pytest.raises(SofttoolError, match="verification failed"):
        export_adapters([adapter], folder, ExportOptions(overwrite=True, verify_steps=2))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_overwrite_replaces_an_earlier_export(tmp_path, tiny_model_dir, tiny_export):
    from softtool.export.onnx import ExportOptions, export_adapters
    from softtool.export_meta import ExportMeta

    folder = tmp_path / "onnx"
    shutil.copytree(tiny_export[0], folder)
    adapter = make_adapter(tmp_path / "other", tiny_model_dir, seed=7)
    export_adapters([adapter], folder, ExportOptions(overwrite=True, verify_steps=2))
    assert ExportMeta.read(folder).tasks[0].name == "other"


@pytest.mark.parametrize("where", ["the adapter itself", "a parent of the adapter", "a folder of other files"])
def test_export_never_replaces_its_input_or_files_it_did_not_write(tmp_path, tiny_model_dir, where):
    from softtool.export.onnx import ExportOptions, export_adapters

    adapter = make_adapter(tmp_path / "runs" / "ad", tiny_model_dir)
    (adapter / "notes.txt").write_text("mine")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8")
    target = {
        "the adapter itself": adapter,
        "a parent of the adapter": tmp_path / "runs",
        "a folder of other files": photos,
    }[where]
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SofttoolError, match="would replace the input|did not write"):
        export_adapters([adapter], target, ExportOptions(overwrite=True, verify_steps=2))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot


def test_cli_export_succeeds_and_prints_the_verification(tmp_path, tiny_model_dir, capsys):
    from softtool.cli import main

    adapter = make_adapter(tmp_path / "ad", tiny_model_dir)
    main(["export", str(adapter), "-o", str(tmp_path / "onnx"), "--verify-steps", "4"])
    out = capsys.readouterr().out
    assert "exported 1 task(s)" in out and '"greedy_agreement": 1.0' in out
    # A second export into the same folder needs --overwrite.
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(adapter), "-o", str(tmp_path / "onnx"), "--verify-steps", "4"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_adapter_with_wrong_hidden_size_is_refused(tmp_path, tiny_model_dir):
    from softtool.export.onnx import export_adapters

    adapter = make_adapter(tmp_path / "ad", tiny_model_dir, hidden=48)
    with pytest.raises(SofttoolError, match="hidden size 48"):
        export_adapters([adapter], tmp_path / "onnx")


def test_adapter_with_wrong_vocab_is_refused(tmp_path, tiny_model_dir):
    from softtool.export.onnx import export_adapters

    adapter = make_adapter(tmp_path / "ad", tiny_model_dir, vocab=1000)
    with pytest.raises(SofttoolError, match="vocabulary size 1000"):
        export_adapters([adapter], tmp_path / "onnx")


def test_tasks_with_different_prompt_lengths_cannot_share_an_export(tmp_path, tiny_model_dir):
    from softtool.export.onnx import export_adapters

    a = make_adapter(tmp_path / "a", tiny_model_dir)
    b = make_adapter(tmp_path / "b", tiny_model_dir, template="[P:3]{source}", n=3)
    with pytest.raises(SofttoolError, match="same number"):
        export_adapters([a, b], tmp_path / "onnx")


@pytest.mark.parametrize("missing", ["softtool_export.json", "model.onnx", "prompt_table.safetensors"])
def test_export_folder_missing_a_file_is_refused(tmp_path, tiny_export, missing):
    from softtool.runtime.onnx_backend import OnnxGenerator

    folder = tmp_path / "copy"
    shutil.copytree(tiny_export[0], folder)
    (folder / missing).unlink()
    with pytest.raises(SofttoolError, match=f"{missing} is missing"):
        OnnxGenerator.from_export_dir(folder)


def test_onnx_file_that_fails_to_load_is_refused(tmp_path, tiny_export):
    from softtool.runtime.onnx_backend import OnnxGenerator

    folder = tmp_path / "copy"
    shutil.copytree(tiny_export[0], folder)
    (folder / "model.onnx").write_bytes(b"this is not a protobuf")
    with pytest.raises(SofttoolError, match="cannot load ONNX model"):
        OnnxGenerator.from_export_dir(folder)


def test_cuda_request_without_gpu_falls_back_with_a_warning_or_fails_when_strict(tiny_export):
    import onnxruntime as ort

    from softtool.runtime.onnx_backend import OnnxGenerator

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider; the fallback path is not reachable")
    with pytest.warns(RuntimeWarning, match="falling back to the CPU"):
        gen = OnnxGenerator.from_export_dir(tiny_export[0], device="cuda")
    assert gen.device == "cpu"
    with pytest.raises(SofttoolError, match="--strict-device"):
        OnnxGenerator.from_export_dir(tiny_export[0], device="cuda", strict_device=True)


def test_bad_export_options_are_refused_in_one_line(tmp_path, capsys):
    from softtool.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path), "-o", str(tmp_path / "o"), "--dtype", "int8", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "int8 is dynamic quantization for the CPU" in capsys.readouterr().err


def test_an_export_killed_between_its_renames_is_put_back_and_its_litter_removed(tmp_path, tiny_export):
    from softtool.export.onnx import _recover
    from softtool.export_meta import ExportMeta

    # The state a kill -9 leaves inside _swap_in: the old export moved aside, nothing at the target yet, and a
    # half-built folder of the interrupted attempt.
    old = tmp_path / ".onnx.old-abc"
    shutil.copytree(tiny_export[0], old / "export")
    (tmp_path / ".onnx.building-xyz").mkdir()
    _recover(tmp_path / "onnx")
    assert ExportMeta.read(tmp_path / "onnx") == ExportMeta.read(tiny_export[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_the_tasks_decoding_defaults_travel_into_the_export_and_its_generator(tmp_path, tiny_model_dir):
    from helpers import save_tiny_adapter
    from softtool.export.onnx import export_adapters
    from softtool.export_meta import ExportMeta
    from softtool.runtime.onnx_backend import OnnxGenerator

    decoding = {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2}
    adapter = save_tiny_adapter(tmp_path / "de", tiny_model_dir, torch.randn(3, 32) * 0.1, decoding=decoding)
    plain = save_tiny_adapter(tmp_path / "fr", tiny_model_dir, torch.randn(3, 32) * 0.1)
    export_adapters([adapter, plain], tmp_path / "onnx")
    assert [t.decoding for t in ExportMeta.read(tmp_path / "onnx").tasks] == [decoding, {}]
    generator = OnnxGenerator.from_export_dir(tmp_path / "onnx")
    assert generator.decoding(0) == decoding and generator.decoding(1) == {}
