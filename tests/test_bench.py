"""`softtool bench` on the smoke workload and the tiny random model: the harness runs every backend,
writes a result with the promised keys, and backends that compute the same thing give the same tokens.
No timing is asserted (speed is only measured, in benchmarks/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "benchmarks" / "configs" / "smoke.json"


@pytest.fixture(scope="module")
def smoke_result(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench_smoke.json"
    cache = out.parent / "cache"
    code = run_cli(
        [
            "bench",
            "--config",
            str(SMOKE),
            "--model",
            str(tiny_model_dir),
            "--cache-dir",
            str(cache),
            "--output",
            str(out),
            # one process for all backends: a fresh process per backend is tested on its own below
            "--no-isolate",
        ]
    ).code
    assert code == 0
    return out, json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_bench_writes_json_with_machine_and_backend_keys(smoke_result):
    path, result = smoke_result
    machine = result["machine"]
    for key in ("cpu_model", "logical_cores", "gpu", "versions", "git_commit", "threads"):
        assert key in machine
    assert machine["versions"]["torch"] and machine["versions"]["transformers"]
    assert result["command"].startswith("softtool bench")
    names = [b["name"] for b in result["backends"]]
    assert names == json.loads(SMOKE.read_text())["backends"]
    for b in result["backends"]:
        # Every requested backend runs here: a skipped one is a failure, not a pass with fewer rows.
        assert b["status"] == "ok", f"{b['name']} was {b['status']}: {b.get('reason')}"
        for key in ("tokens_per_s", "examples_per_s", "speedup_vs_peft", "speedup_vs_hf", "ttft_s", "peak_rss_mb"):
            assert b[key] is not None and b[key] > 0, key
        assert len(b["outputs"]) == result["workload"]["examples"] == 6
    assert result["workload"]["untrained_prompt"] is True and any("untrained" in n for n in result["notes"])
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_backends_with_the_same_prompt_generate_the_same_tokens(smoke_result):
    _, result = smoke_result
    ok = {b["name"]: b for b in result["backends"] if b["status"] == "ok"}
    prompted = [name for name in ("peft", "torch", "onnx") if name in ok]
    for name in prompted[1:]:
        assert ok[name]["outputs"] == ok[prompted[0]]["outputs"], f"{name} differs from {prompted[0]}"
        assert ok[name]["identical_share"] == 1.0
    # The hf row runs the same texts without the soft prompt: 4 virtual tokens fewer per row.
    assert ok["hf"]["input_tokens"] == ok["peft"]["input_tokens"] - 4 * 6


def _generate_after_prompt(model, tokenizer, table, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate on [prompt table; embedded ids], cut before the first EOS (PEFT's layout)."""
    import torch

    ids = torch.tensor([ids])
    embeds = torch.cat([table.unsqueeze(0), model.get_input_embeddings()(ids)], dim=1)
    with torch.inference_mode():
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0].tolist()
    eos = tokenizer.eos_token_id
    return out[: out.index(eos)] if eos in out else out


@pytest.mark.slow
def test_peft_backend_generates_what_the_prompt_prepended_by_hand_generates(tiny_model_dir, smoke_result):
    """The anchor itself is wired right: PEFT's generate equals transformers' generate on [prompt; text] embeddings."""

    from softtool.adapter import load_adapter
    from softtool.models import load_model

    _, result = smoke_result
    peft_row = next(b for b in result["backends"] if b["name"] == "peft")
    adapter = load_adapter(result["workload"]["adapter"])
    model = load_model(str(tiny_model_dir))
    from softtool.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    template = adapter.meta.template.split("]", 1)[1]
    for text, expected in zip(json.loads(SMOKE.read_text())["inputs"][:2], peft_row["outputs"][:2], strict=True):
        pieces = [tokenizer(template.format(source=text), add_special_tokens=False)["input_ids"]]
        assert _generate_after_prompt(model, tokenizer, adapter.prompt_table, pieces[0], 8) == expected


@pytest.mark.slow
def test_each_backend_can_run_in_a_fresh_process_with_its_own_peak_memory(tiny_model_dir, tmp_path):
    out = tmp_path / "bench_isolated.json"
    args = ["bench", "--config", str(SMOKE), "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path)]
    assert run_cli([*args, "--backends", "hf", "--no-limits", "--output", str(out)]).code == 0
    (row,) = json.loads(out.read_text())["backends"]
    assert row["status"] == "ok" and row["peak_rss_isolated"] is True and row["peak_rss_mb"] > 0


@pytest.mark.slow
def test_make_table_renders_a_row_per_backend(smoke_result, tmp_path):
    path, result = smoke_result
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- render:bench:start -->\nold\n<!-- render:bench:end -->\nafter\n")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import make_table
    finally:
        sys.path.pop(0)
    assert make_table.main([str(path), "--update", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("after")
    for b in result["backends"]:
        assert f"| {b['name']} |" in text


@pytest.mark.slow
def test_train_bench_softtool_and_peft_losses_agree(tiny_model_dir, tmp_path):
    out = tmp_path / "bench_train.json"
    code = run_cli(
        ["bench", "--config", str(SMOKE), "--train", "--model", str(tiny_model_dir), "--output", str(out)]
    ).code
    assert code == 0
    result = json.loads(out.read_text())
    rows = {b["name"]: b for b in result["backends"]}
    assert set(rows) == {"peft", "softtool-naive", "softtool"}
    for name in ("softtool-naive", "softtool"):
        assert rows[name]["status"] == "ok"
        assert rows[name]["losses_agree"] is True
        assert rows[name]["max_loss_diff_vs_peft"] < 1e-3 * rows["peft"]["final_loss"]
        assert rows[name]["samples_per_s"] > 0 and rows[name]["speedup_vs_peft"] > 0
    # Training moved the prompt: the loss changed between the first and the last step.
    assert rows["softtool"]["losses"][0] != rows["softtool"]["losses"][-1]


def test_bad_bench_options_are_one_line_user_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"task": "translation", "inputs": ["x"], "batch_size": 0}))
    assert run_cli(["bench", "--config", str(bad)]).code == 2
    assert capsys.readouterr().err.strip().startswith("error:")
    bad.write_text(json.dumps({"task": "translation", "inputs": ["x"], "no_such_option": 1}))
    assert run_cli(["bench", "--config", str(bad)]).code == 2
    assert "no_such_option" in capsys.readouterr().err
    assert run_cli(["bench", "--config", str(tmp_path / "missing.json")]).code == 2
    assert run_cli(["bench", "--task", "translation", "--backends", "peft,tensorrt", "--data", "x"]).code == 2
    assert run_cli(["bench", "--config", str(SMOKE), "--device", "gpu"]).code == 2
    assert "device must be cpu, cuda or cuda:N" in capsys.readouterr().err
    assert run_cli(["bench", "--config", str(SMOKE), "--dtype", "float16"]).code == 2
    assert "float16 on the CPU" in capsys.readouterr().err


def test_bfloat16_bench_runs_the_torch_backends_in_bfloat16(tiny_model_dir, tmp_path):
    out = tmp_path / "bench_bf16.json"
    args = ["bench", "--config", str(SMOKE), "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path)]
    assert (
        run_cli([*args, "--backends", "hf,torch", "--dtype", "bfloat16", "--no-isolate", "--output", str(out)]).code
        == 0
    )
    result = json.loads(out.read_text())
    assert result["options"]["dtype"] == "bfloat16"
    assert [b["status"] for b in result["backends"]] == ["ok", "ok"]
    # The bandwidth bound reads the weights as loaded: 2 bytes per parameter in bfloat16.
    assert result["limits"]["weight_bytes"] == 2 * result["limits"]["params"]


def test_cuda_bench_refuses_to_time_onnx_on_the_cpu(tiny_model_dir, tmp_path):
    """Without ONNX Runtime's CUDA provider a --device cuda bench skips the onnx rows with the reason,
    instead of quietly measuring the CPU provider as if it were the GPU."""
    import onnxruntime as ort

    from softtool.bench.backends import BackendUnavailable, export_on_the_fly
    from softtool.bench.options import BenchOptions

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    options = BenchOptions(task="translation", inputs=["x"], device="cuda", model=str(tiny_model_dir))
    with pytest.raises(BackendUnavailable, match="no CUDA provider"):
        export_on_the_fly(options, tmp_path, "fp32")
    with pytest.raises(BackendUnavailable, match="for the CPU provider"):
        export_on_the_fly(options, tmp_path, "int8")


@pytest.mark.slow
def test_peft_anchor_on_smollm2_generates_what_the_prompt_prepended_by_hand_generates(smollm2, tmp_path):
    """On the real model (where a tiny random one only repeats a token): PEFT's uncached generate, the
    `peft` row, equals transformers' generate on [prompt; text] embeddings, token for token."""

    from softtool.bench.backends import PeftBackend
    from softtool.bench.options import BenchOptions
    from softtool.bench.workload import build_workload
    from softtool.models import DEFAULT_MODEL, load_tokenizer

    options = BenchOptions(
        inputs=["Two young guys with shaggy hair look at their hands."], max_new_tokens=10, cache_dir=str(tmp_path)
    )
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    workload = build_workload(options, smollm2, tokenizer)
    backend = PeftBackend(options, workload)
    backend.model = __import__("peft").PeftModel.from_pretrained(smollm2, str(workload.adapter_dir))
    (got,) = backend.generate(range(1), 10)
    from softtool.adapter import load_adapter

    table = load_adapter(workload.adapter_dir).prompt_table
    expected = _generate_after_prompt(smollm2, tokenizer, table, workload.text_rows[0], 10)
    assert got == expected and len(set(got)) > 1


def test_row_steps_count_every_row_until_its_batch_ends():
    """A batch steps until its longest row is done, so a row that stopped early still costs those steps."""
    from softtool.bench.measure import row_steps_per_s

    options = {"num_beams": 1, "batch_size": 2, "max_new_tokens": 8, "repeats": 1}
    # Batch 1: rows of 3 and 7 tokens (both stopped: 8 steps with the EOS, capped at 8). Batch 2: one row
    # that ran to the limit (8 tokens, no EOS step).
    result = {"status": "ok", "outputs": [[1] * 3, [1] * 7, [1] * 8], "timed_s": 2.0}
    assert row_steps_per_s(result, options) == (2 * 8 + 1 * 8) / 2.0
    result["outputs"] = [[1] * 3, [1] * 4, [1] * 1]
    assert row_steps_per_s(result, options) == (2 * 5 + 1 * 2) / 2.0
    assert row_steps_per_s(result, {**options, "num_beams": 4}) is None


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_the_bench_thread_count_reaches_onnx_runtime(smoke_result, tiny_model_dir, threads):
    from softtool.bench.backends import OnnxBackend
    from softtool.bench.options import BenchOptions
    from softtool.runtime.session import session_threads

    _, result = smoke_result
    options = BenchOptions(
        model=str(tiny_model_dir), inputs=["A dog."], onnx_dir=result["options"]["onnx_dir"], threads=threads
    )
    backend = OnnxBackend(options, workload=None)
    backend.load()
    assert session_threads(backend.generator.session) == threads


class _Captured(Exception):
    pass


def _capture(*args, **kwargs):
    raise _Captured(args[0])


def test_command_line_flags_override_the_config_with_real_types(monkeypatch):
    import softtool.bench.train
    import softtool.cli.bench

    monkeypatch.setattr(softtool.cli.bench, "_run", _capture)
    with pytest.raises(_Captured) as caught:
        run_cli(["bench", "--config", str(SMOKE), "--batch-size", "3", "--backends", "hf,torch", "--no-isolate"])
    options = caught.value.args[0]
    config = json.loads(SMOKE.read_text())
    assert (options.batch_size, options.backends, options.isolate) == (3, ["hf", "torch"], False)
    assert options.limit == config["limit"] and options.max_new_tokens == config["max_new_tokens"]

    monkeypatch.setattr(softtool.bench.train, "run_train_bench", _capture)
    with pytest.raises(_Captured) as caught:
        run_cli(["bench", "--config", str(SMOKE), "--train", "--num-virtual-tokens", "4,8", "--lr", "0.1"])
    options = caught.value.args[0]
    assert (options.num_virtual_tokens, options.lr) == ([4, 8], 0.1)
    assert options.steps == config["train"]["steps"]


@pytest.mark.slow
def test_the_gpu_bench_script_runs_end_to_end_as_a_cpu_dry_run(tiny_model_dir, tmp_path, shared_data):
    """benchmarks/gpu_bench.sh with DEVICE=cpu: every step runs and writes its result, every row ok."""
    import os
    import subprocess

    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "DEVICE": "cpu",
        "DTYPE": "float32",
        "MODEL": str(tiny_model_dir),
        "DATA": str(shared_data / "multi30k"),
        "RESULTS": str(tmp_path),
        "EXTRA": f"--limit 4 --peft-limit 2 --no-limits --cache-dir {tmp_path / 'cache'}",
        "TRAIN_EXTRA": "--steps 1 --warmup 0 --num-virtual-tokens 4",
        # The script's own steps, not every peer: PEFT's and hf-cb's rows are tested in this file's other tests.
        "BACKENDS": "hf,torch,onnx",
        "THREADS": "2",
    }
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_bench.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": exit 0 after") == 4, proc.stdout[-3000:]
    for name in ("translation", "translation_b1", "translation_beam4", "train_translation"):
        result = json.loads((tmp_path / f"bench_{name}_cuda.json").read_text())
        assert all(b["status"] == "ok" for b in result["backends"]), (name, result["backends"])


@pytest.mark.slow
def test_decoding_options_reach_every_row_and_hf_cb_that_cannot_apply_them_is_skipped(lively_model_dir, tmp_path):
    """--no-repeat-ngram-size 1 (and a repetition penalty) on the lively model, which repeats itself without
    them: PEFT's generate and softtool's torch backend apply both and still agree token for token, no row
    repeats a token, and transformers' continuous batching, which cannot apply them, is skipped with the reason.
    One row per batch: PEFT ignores position ids, so its left-padded rows drift on a model this sensitive."""
    out = tmp_path / "bench.json"
    args = ["bench", "--config", str(SMOKE), "--model", str(lively_model_dir), "--cache-dir", str(tmp_path / "c")]
    args += ["--backends", "peft,hf,hf-cb,torch", "--no-repeat-ngram-size", "1", "--repetition-penalty", "1.3"]
    args += ["--batch-size", "1"]
    run_cli([*args, "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["workload"]["decoding"] == {"no_repeat_ngram_size": 1, "repetition_penalty": 1.3}
    rows = {b["name"]: b for b in result["backends"]}
    assert rows["hf-cb"]["status"] == "skipped" and "continuous batching" in rows["hf-cb"]["reason"]
    assert rows["peft"]["status"] == rows["torch"]["status"] == rows["hf"]["status"] == "ok"
    assert rows["torch"]["outputs"] == rows["peft"]["outputs"]
    for name in ("peft", "hf", "torch"):
        assert all(len(set(tokens)) == len(tokens) for tokens in rows[name]["outputs"]), name


def test_the_100_token_config_is_the_translation_workload_with_a_trained_100_token_prompt():
    from softtool.bench.options import BenchOptions, build_options, load_config

    configs = REPO / "benchmarks" / "configs"
    p100 = build_options(BenchOptions, load_config(configs / "translation_p100.json"), "translation_p100.json")
    p20_config = {k: v for k, v in load_config(configs / "translation.json").items() if k != "train"}
    p20 = build_options(BenchOptions, p20_config, "translation.json")
    assert p100.num_virtual_tokens == 100 and p100.adapter == "runs/de-p100"
    for name in ("task", "data", "split", "limit", "batch_size", "max_new_tokens", "num_beams"):
        assert getattr(p100, name) == getattr(p20, name), name
    assert p100.backends == ["hf-embeds", "torch", "onnx"] and p100.prefill == "exact"
