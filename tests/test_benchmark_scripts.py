"""benchmarks/'s scripts as code: each one's main(argv) runs on a tiny input (the tiny random Llama, a few inline
sentences) and writes the file it promises, with the keys its readers (docs, tables, other scripts) use. No timing
is asserted: the numbers are only measured, by hand, on a quiet machine."""

from __future__ import annotations

import csv
import gzip
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import load_benchmark, run_cli, save_tiny_adapter, write_translation_data

REPO = Path(__file__).resolve().parents[1]

SOURCES = ["A man rides a bike.", "Two dogs play in the snow near a tree.", "A girl.", "The cat sleeps on a warm bed."]
TARGETS = ["Ein Mann fährt Rad.", "Zwei Hunde spielen im Schnee.", "Ein Mädchen.", "Die Katze schläft."]


def _scripts() -> list[Path]:
    """benchmarks/'s scripts: its shell scripts and the Python files run as programs (a module without a __main__
    block is a library its scripts import)."""
    folder = REPO / "benchmarks"
    python = [p for p in folder.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()]
    return sorted([*python, *folder.glob("*.sh")])


def test_every_benchmark_script_is_run_by_a_test():
    tests = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    for script in _scripts():
        ways = rf'"{re.escape(script.name)}"|load_benchmark\("{script.stem}"\)|^\s*import {script.stem}\b'
        assert re.search(ways, tests, re.M), f"benchmarks/{script.name} is run by no test"


@pytest.mark.parametrize("script", [p.name for p in _scripts() if p.suffix == ".py"])
def test_a_benchmark_script_imports_without_running_and_its_main_takes_argv(script):
    # A script that did its work at import would parse pytest's arguments here, and fail.
    module = load_benchmark(script.removesuffix(".py"))
    assert list(inspect.signature(module.main).parameters) == ["argv"], script
    assert (REPO / "benchmarks" / script).read_text().rstrip().endswith(("SystemExit(main())", "sys.exit(main())"))


@pytest.fixture(scope="module")
def lively_prompt(lively_model_dir, tmp_path_factory):
    """A random 3-token translation prompt for the lively tiny model (its outputs differ from row to row)."""
    torch.manual_seed(0)
    return save_tiny_adapter(tmp_path_factory.mktemp("prompt") / "de", lively_model_dir, torch.randn(3, 32) * 0.2)


@pytest.fixture(scope="module")
def lively_export(lively_prompt, tmp_path_factory):
    """lively_prompt exported to ONNX (fp32, the slot graph)."""
    out = tmp_path_factory.mktemp("export") / "de-onnx"
    assert run_cli(["export", str(lively_prompt), "-o", str(out), "--verify-steps", "2"]).code == 0
    return out


def write_multi30k(folder, splits=("train", "val", "test_2016_flickr")):
    """`folder` in Multi30k's own layout: SPLIT.en.gz and SPLIT.de.gz, SOURCES and TARGETS."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        for lang, lines in (("en", SOURCES), ("de", TARGETS)):
            with gzip.open(folder / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
    return folder


# -- compare_outputs.py -----------------------------------------------------------------------------------------
def _bench_result(path, outputs: dict[str, list[list[int]]]):
    backends = [{"name": name, "status": "ok", "outputs": rows} for name, rows in outputs.items()]
    path.write_text(json.dumps({"backends": [*backends, {"name": "hf-cb", "status": "skipped"}]}))
    return path


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_compare_outputs_lists_each_differing_bench_row_with_its_first_differing_step(tmp_path):
    script = load_benchmark("compare_outputs")
    a = _bench_result(tmp_path / "a.json", {"torch": [[5, 6, 7], [5, 6]], "onnx": [[5, 6, 7], [5, 6]]})
    b = _bench_result(tmp_path / "b.json", {"torch": [[5, 6, 7], [5, 9, 9]], "onnx": [[5, 6, 7], [5, 6]]})
    out = tmp_path / "same.json"
    assert script.main([str(a), str(b), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "bench" and result["commit"]
    assert set(result["pairs"]) == {"torch vs torch", "onnx vs onnx"}  # the skipped row is no pair
    assert result["pairs"]["torch vs torch"] == {
        "rows": 2, "identical": 1, "identical_share": 0.5, "differ": [{"row": 1, "first_differing_step": 1}]
    }  # fmt: skip
    assert result["pairs"]["onnx vs onnx"]["identical_share"] == 1.0
    assert script.main([str(a), str(b), "--pair", "onnx", "torch", "--output", str(out)]) == 0
    assert list(json.loads(out.read_text())["pairs"]) == ["onnx vs torch"]
    assert script.main([str(a), str(b), "--pair", "hf-cb", "torch"]) == 1  # skipped in a: nothing to compare


def test_compare_outputs_compares_two_eval_folders_prediction_by_prediction_and_metric_by_metric(
    tmp_path, lively_model_dir, lively_prompt
):
    script = load_benchmark("compare_outputs")
    data = write_translation_data(tmp_path / "data", SOURCES, TARGETS, splits=("val",))
    code = run_cli(["eval", str(lively_prompt), "--data", str(data), "--output", str(tmp_path / "eval"),
                    "--max-new-tokens", "4", "--baseline", "--quiet"]).code  # fmt: skip
    assert code == 0
    same = tmp_path / "again"
    same.mkdir()
    for name in ("predictions.jsonl", "metrics.json"):
        shutil.copy(tmp_path / "eval" / name, same)
    out = tmp_path / "cmp.json"
    assert script.main([str(tmp_path / "eval"), str(same), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "eval" and result["predictions"]["identical"] == result["predictions"]["rows"] == 4
    assert result["metrics"]["bleu"]["difference"] == 0 and "bleu_signature" not in result["metrics"]

    # The soft prompt against the instruction prompt: both predictions of each differing example are listed.
    assert script.main([str(tmp_path / "eval"), str(tmp_path / "eval" / "baseline"), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    rows, base = (_jsonl(tmp_path / "eval" / sub / "predictions.jsonl") for sub in ("", "baseline"))
    differ = [i for i in range(4) if rows[i]["prediction"] != base[i]["prediction"]]
    assert differ and [d["row"] for d in result["predictions"]["differ"]] == differ
    first = result["predictions"]["differ"][0]
    assert (first["a"], first["b"]) == (rows[differ[0]]["prediction"], base[differ[0]]["prediction"])

    # Evals of different examples are not compared.
    (same / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    assert script.main([str(tmp_path / "eval"), str(same)]) == 1


# -- profile_decode.py ------------------------------------------------------------------------------------------
def _profile_decode(tmp_path, prompt, *args: str) -> dict:
    out = tmp_path / "profile.json"
    data = write_multi30k(tmp_path / "multi30k")
    argv = ["--adapter", str(prompt), "--data", str(data), "--limit", "4", "--slots", "2", "--max-new-tokens", "4",
            "--threads", "1", "--json", str(out), *args]  # fmt: skip
    assert load_benchmark("profile_decode").main(argv) == 0
    return json.loads(out.read_text())


def test_profile_decode_splits_each_backends_decode_into_prefill_decode_steps_and_search(
    tmp_path, lively_prompt, lively_export
):
    record = _profile_decode(tmp_path, lively_prompt, "--backends", "hf,torch,onnx", "--onnx-dir", str(lively_export))
    results = record["results"]
    assert list(results) == ["hf", "torch", "onnx"]
    assert set(results["hf"]["parts"]) == {"forward"}
    for name in ("torch", "onnx"):
        parts = results[name]["parts"]
        assert set(parts) == {"prefill", "decode_step", "search_step"}, name
        assert parts["prefill"]["rows"] == 4, name  # every sentence entered a slot once
        assert results[name]["useful_tokens"] == results["hf"]["useful_tokens"], name
    assert record["machine"]["versions"]["torch"] and record["args"]["slots"] == 2


@pytest.mark.slow  # dynamo traces the forward again for new shapes: 15-25 s on the tiny model
def test_profile_decode_times_the_compiled_forwards_first_call_and_checks_its_outputs(tmp_path, lively_prompt):
    # The eager backend runs dynamo's tracing without inductor's code generation: the row's path, in seconds.
    record = _profile_decode(
        tmp_path, lively_prompt, "--backends", "torch,torch-compiled", "--compile-backend", "eager"
    )
    compiled = record["results"]["torch-compiled"]
    assert compiled["first_call_s"] > 0 and compiled["outputs_equal_to_torch"] is True
    assert compiled["parts"]["prefill"]["rows"] == 4


# -- ort_profile.py ---------------------------------------------------------------------------------------------
def test_ort_profile_sums_a_softtool_sessions_profile_by_operator_type(tmp_path, monkeypatch, lively_export):
    from softtool.runtime.onnx_backend import OnnxGenerator
    from softtool.search import SearchOptions

    # SOFTTOOL_ORT_PROFILE, as the script's docstring runs it, on a session of softtool's own.
    monkeypatch.setenv("SOFTTOOL_ORT_PROFILE", str(tmp_path / "ort"))
    gen = OnnxGenerator.from_export_dir(lively_export, threads=1)
    rows = [gen.encode({"source": s}) for s in SOURCES]
    gen.generate(rows, None, SearchOptions(max_new_tokens=3, eos_token_ids=[2], pad_token_id=2))
    profile = gen.session.end_profiling()
    assert profile.startswith(str(tmp_path / "ort"))

    out = tmp_path / "ops.json"
    assert load_benchmark("ort_profile").main([profile, "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["machine"]["git_commit"]
    (summary,) = record["profiles"]
    assert summary["model_runs"] >= 3  # a prefill and a step per new token
    ops = {op["op"]: op for op in summary["ops"]}
    assert "MatMul" in ops and abs(sum(op["share"] for op in summary["ops"]) - 1) < 1e-9
    assert summary["kernel_ms_total"] == pytest.approx(sum(op["ms"] for op in summary["ops"]))


# -- profile_static_step.py -------------------------------------------------------------------------------------
def test_profile_static_step_times_a_step_per_slot_bucket_for_each_backend_on_the_cpu(tmp_path, tiny_model_dir):
    # On the CPU only the whole step is timed (no CUDA events): the script's path without the device split.
    out = tmp_path / "static.json"
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--slots", "4", "--capacity", "16", "--repeats", "2",
            "--output", str(out)]  # fmt: skip
    assert load_benchmark("profile_static_step").main(args) == 0
    result = json.loads(out.read_text())
    assert (result["device"], result["dtype"], result["slots"]) == ("cpu", "float32", 4)
    assert set(result["backends"]) == {"torch", "onnx"} and result["export_form"]
    for name, backend in result["backends"].items():
        buckets = [row["bucket"] for row in backend["buckets"]]
        assert buckets == sorted(buckets) and buckets[-1] == 4, name
        assert all(row["step_ms"] > 0 and "device_ms" not in row for row in backend["buckets"]), name


# -- export_bench.py --------------------------------------------------------------------------------------------
@pytest.mark.slow  # two exports, each verified, and a timed generate of each
def test_export_bench_records_each_exports_size_parity_and_speed_beside_torch(tmp_path, tiny_model_dir):
    out = tmp_path / "export.json"
    args = ["--model", str(tiny_model_dir), "--dtypes", "fp32,int8", "--batch", "2", "--max-new-tokens", "4",
            "--repeats", "1", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert load_benchmark("export_bench").main(args) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python benchmarks/export_bench.py --model") and result["commit"]
    assert set(result["exports"]) == {"fp32", "int8"} and set(result["generation"]) == {
        "torch",
        "onnx-fp32",
        "onnx-int8",
    }
    fp32 = result["exports"]["fp32"]
    assert fp32["model_bytes"] > 0 and result["exports"]["int8"]["model_bytes"] > 0
    assert fp32["verification"]["greedy_agreement"] == 1.0
    assert result["generation"]["onnx-fp32"]["sequences_equal_to_torch"] == "2/2"


# -- data_stats.py ----------------------------------------------------------------------------------------------
def write_squad(folder, splits=("train", "dev")):
    """SQuAD's JSON layout: one paragraph, a question per source sentence, the first word as its answer."""
    qas = [{"id": f"q{i}", "question": f"What is in '{s}'?", "answers": [{"text": s.split()[0]}]}
           for i, s in enumerate(SOURCES)]  # fmt: skip
    record = {"data": [{"title": "T", "paragraphs": [{"context": " ".join(SOURCES), "qas": qas}]}]}
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (folder / f"{split}.json").write_text(json.dumps(record))
    return folder


def write_cnndm(folder, splits=("train", "dev")):
    """CNN/DailyMail's CSV layout (id, article, highlights): each source sentence ten times as an article."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            rows = [[f"a{i}", " ".join([s] * 10), t] for i, (s, t) in enumerate(zip(SOURCES, TARGETS, strict=True))]
            csv.writer(f).writerows([["id", "article", "highlights"], *rows])
    return folder


def test_data_stats_reads_and_encodes_every_split_of_every_data_set(tmp_path):
    data = tmp_path / "data"
    write_squad(data / "squad"), write_cnndm(data / "cnn_dailymail"), write_multi30k(data / "multi30k")
    out = tmp_path / "stats.json"
    assert load_benchmark("data_stats").main(["--data", str(data), "--max-length", "64", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python benchmarks/data_stats.py") and result["max_length"] == 64
    splits = [(row["task"], row["split"]) for row in result["splits"]]
    assert splits == [("squad", "train"), ("squad", "dev"), ("squad-qg", "dev"), ("cnndm", "train"), ("cnndm", "dev"),
                      ("translation", "train"), ("translation", "val"), ("translation", "test_2016_flickr")]  # fmt: skip
    for row in result["splits"]:
        assert row["examples"] == 4 and row["input_tokens"]["max"] >= row["input_tokens"]["p50"] > 0, row
    cnndm = next(row for row in result["splits"] if row["task"] == "cnndm")
    assert (
        cnndm["long_field"] == "article" and cnndm["truncated_at_max_length"] > 0
    )  # 10 sentences do not fit in 64 tokens


# -- distributed_memory.py --------------------------------------------------------------------------------------
def test_distributed_memory_computes_every_layouts_bytes_per_gpu_on_the_meta_device(tmp_path):
    out = tmp_path / "memory.json"
    args = ["--seq", "16", "--targets", "4", "--batch", "2", "--batch", "4", "--gpus", "2", "--output", str(out)]
    assert load_benchmark("distributed_memory").main(args) == 0
    record = json.loads(out.read_text())
    assert record["computed_not_measured"] and record["command"].endswith("--gpus 2 --output " + str(out))
    assert record["model"]["parameters"] > 6.7e9  # Llama-2-7B's shapes, built on the meta device: no memory used
    assert sorted(map(int, record["activation_bytes_by_batch"])) == [1, 2, 4]  # each batch and its half per rank
    rows = {(r["global_batch"], r["layout"]): r for r in record["rows"]}
    assert len(rows) == 8
    one, ddp = rows[(4, "1 GPU")], rows[(4, "DDP, 2 ranks")]
    assert ddp["weights"] == one["weights"] and ddp["activations"] < one["activations"]
    assert rows[(4, "--fsdp, 2 ranks")]["weights"] < one["weights"]


# -- bench_search.py --------------------------------------------------------------------------------------------
def test_bench_search_times_one_beam_step_of_the_core_and_of_transformers_after_checking_they_agree(
    tmp_path, lively_model_dir
):
    write_multi30k(tmp_path / "data" / "multi30k")
    out = tmp_path / "search_step.json"
    args = ["--model", str(lively_model_dir), "--data", str(tmp_path / "data"), "--batch", "2", "--beams", "2",
            "--step", "2", "--reps", "2", "--warmup", "1", "--torch-threads", "1", "--output", str(out)]  # fmt: skip
    assert load_benchmark("bench_search").main(args) == 0
    report = json.loads(out.read_text())
    assert report["shape"] == {"batch": 2, "num_beams": 2, "rows": 4, "vocab": 49152}
    assert report["command"].startswith(".venv/bin/python benchmarks/bench_search.py --model")
    for name in ("plain", "processors"):
        result = report["results"][name]
        assert result["identical_outputs"] is True, name
        assert {"transformers_1t_ms", "core_1t_ms"} <= set(result["median_ms"]), name
        assert all(len(samples) == 2 for samples in result["samples_ms"].values()), name


# -- shared_machine.py ------------------------------------------------------------------------------------------
@pytest.mark.slow  # three `softtool eval` processes, two of them side by side
def test_shared_machine_times_evals_alone_and_in_pairs_and_relates_them_to_the_eval_alone(tmp_path, tiny_model_dir):
    out = tmp_path / "shared.json"
    args = ["--model", str(tiny_model_dir), "--virtual-tokens", "3", "--data", str(write_multi30k(tmp_path / "m30k")),
            "--limit", "2", "--backends", "torch", "--variants", "balanced", "--scenarios", "alone,pair",
            "--repeats", "1", "--timeout", "120", "--workdir", str(tmp_path / "work"), "--output", str(out)]  # fmt: skip
    assert load_benchmark("shared_machine").main(args) == 0
    record = json.loads(out.read_text())
    assert record["command"].startswith("python") and "benchmarks/shared_machine.py --model" in record["command"]
    assert [(r["scenario"], len(r["runs"])) for r in record["runs"]] == [("alone", 1), ("pair", 2)]
    assert all(
        run["exit"] == 0 and run["wall_s"] > 0 and run["tokens_per_s"] for r in record["runs"] for run in r["runs"]
    )
    ratios = record["summary"]["torch"]["balanced"]
    assert set(ratios) == {"alone", "pair[0]", "pair[1]"} and ratios["alone"]["x_alone"] == 1.0
    assert not (tmp_path / "work" / "onnx").exists()  # no export unless the onnx backend is measured


# -- serve_load.py ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # a server and the engine alone, each in a process of its own
def test_serve_load_drives_a_server_and_the_engine_alone_to_the_same_texts(tmp_path, lively_prompt):
    out = tmp_path / "serve_load.json"
    args = [str(lively_prompt), "--data", str(write_multi30k(tmp_path / "m30k")), "--clients", "1,16",
            "--requests", "8", "--max-tokens", "4", "--slots", "4", "--max-length", "64", "--threads", "1",
            "--soak", "0", "--no-peer", "--mix-seconds", "1", "--repeats", "1", "--output", str(out)]  # fmt: skip
    assert load_benchmark("serve_load").main(args) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "serve_load" and result["tasks"] == ["de"] and result["serve_exit"] == 0
    assert [row["name"] for row in result["serve"]] == ["serve@1", "serve@16"]
    assert all(row["errors"] == 0 and row["generated_tokens"] > 0 for row in result["serve"])
    assert result["direct"]["requests"] == 64 and result["mix"]["mixed"][0] > 0
    summary = result["summary"]
    done, total = map(int, summary["serve16_texts_equal_direct"].split("/"))
    assert done == total > 0  # greedy: the server writes what the engine alone writes
    assert summary["errors"]["met"] and "ratio" in summary["serve16_vs_direct"]
    assert "soak" not in result and "peer" not in result


# -- quality_table.py -------------------------------------------------------------------------------------------
def test_quality_table_renders_a_row_per_committed_quality_result_with_its_winner_in_bold(capsys):
    results = sorted((REPO / "benchmarks" / "results").glob("quality_*_*.json"))
    assert results
    assert load_benchmark("quality_table").main([str(p) for p in results]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| task (held-out examples) | model | metric | zero-shot |") and len(lines) == 2 + len(
        results
    )
    for path, line in zip(results, lines[2:], strict=True):
        result = json.loads(path.read_text())
        assert line.startswith(f"| {result['task']} (") and line.endswith(f"| {result['commit']} |"), path.name
        assert "**" in line, path.name  # the best score, in bold


# -- run_all.py -------------------------------------------------------------------------------------------------
@pytest.mark.slow  # two `softtool bench` processes
def test_run_all_benches_each_config_and_the_training_then_renders_the_docs_tables(tmp_path, tiny_model_dir):
    (tmp_path / "docs").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("# Bench\n\n<!-- render:bench:start -->\nold\n<!-- render:bench:end -->\n\nAfter.\n")
    results = tmp_path / "results"
    args = ["--configs", "smoke", "--train-config", "smoke", "--results", str(results), "--root", str(tmp_path), "--",
            "--model", str(tiny_model_dir), "--backends", "hf,torch", "--no-isolate", "--no-limits",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert load_benchmark("run_all").main(args) == 0
    generation = json.loads((results / "bench_smoke.json").read_text())
    assert [b["name"] for b in generation["backends"]] == ["hf", "torch"]
    assert all(b["status"] == "ok" for b in generation["backends"])
    assert json.loads((results / "bench_train_smoke.json").read_text())["kind"] == "train"
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- render:bench:end -->\n\nAfter.\n")
    assert "`bench_smoke.json`" in text and "`bench_train_smoke.json`" in text  # a row of each, naming its file


# -- quality.py and study.py ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quality_run(tmp_path_factory, tiny_model_dir):
    """quality.py's four stages for translation on the tiny model: one rate per method, 2 steps, 2 dev examples to
    select on and the next 2 held out. Returns (its arguments, the results folder)."""
    root = tmp_path_factory.mktemp("quality")
    write_multi30k(root / "data" / "multi30k")
    args = ["--task", "translation", "--model", str(tiny_model_dir), "--data", str(root / "data"),
            "--grid", "prompt=0.1", "--grid", "ptuning=0.01", "--steps", "2", "--batch-size", "2", "--max-length", "64",
            "--eval-every", "1", "--curve-limit", "2", "--select-limit", "2", "--test-limit", "2", "--shots", "1",
            "--eval-batch-size", "2", "--eval-max-length", "160", "--threads", "1", "--runs", str(root / "runs"),
            "--output", str(root / "results"), "--quiet"]  # fmt: skip
    assert load_benchmark("quality").main(args) == 0
    return args, root / "results"


@pytest.mark.slow  # trains two prompts and scores them and the discrete prompts
def test_quality_selects_each_methods_rate_on_dev_chooses_a_decoding_and_scores_the_winners_held_out(
    quality_run, tiny_model_dir
):
    args, results = quality_run
    result = json.loads((results / f"quality_translation_{tiny_model_dir.name}.json").read_text())
    assert result["command"].endswith("benchmarks/quality.py " + " ".join(args))  # study.py reads flags back
    assert result["budget"]["test"] == {"split": "dev", "offset": 2, "limit": 2}
    assert {m: [r["lr"] for r in rows] for m, rows in result["grid"].items()} == {"prompt": [0.1], "ptuning": [0.01]}
    assert all(row["curve"] and row["select"]["n"] == 2 for rows in result["grid"].values() for row in rows)
    assert len(result["decode"]) == 4 and set(result["decoding_chosen"]) == {
        "no_repeat_ngram_size",
        "repetition_penalty",
    }
    assert {"prompt", "ptuning", "baseline", "zero_shot", "few_shot"} <= set(result["test"])
    assert result["test"]["prompt"]["n"] == 2 and result["test"]["prompt"]["lr"] == 0.1
    assert (results / f"quality_translation_{tiny_model_dir.name}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # trains a prompt on top of quality_run
@pytest.mark.filterwarnings("ignore:Attempting to set identical low and high xlims")  # a random model scores 0
def test_study_trains_one_run_at_quality_budget_reports_it_and_renders_its_table(
    quality_run, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    args, results = quality_run
    study = load_benchmark("study")
    monkeypatch.setattr(study, "RESULTS", results)  # where the quality budget is read from
    common = ["--task", "translation", "--model", str(tiny_model_dir), "--data", args[args.index("--data") + 1],
              "--threads", "1", "--runs", str(tmp_path / "runs"), "--output", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    assert study.main(["init", "--run", "vocab", *common]) == 0  # one run: trained, scored at step 0 and held out
    assert not (tmp_path / "out").exists()
    assert study.main(["init", "--report", *common]) == 0
    path = tmp_path / "out" / f"study_init_translation_{tiny_model_dir.name}.json"
    record = json.loads(path.read_text())
    assert record["budget"]["steps"] == 2 and record["budget"]["eval_max_length"] == 160  # from quality's command
    assert [r["name"] for r in record["runs"]] == ["vocab"] and record["not_run"] == ["text", "random"]
    (vocab,) = record["runs"]
    assert vocab["steps"] == 2 and vocab["held_out"]["n"] == 2 and vocab["step0"]["n"] == 2
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert study.main(["table", str(path)]) == 0
    assert "vocab" in capsys.readouterr().out


@pytest.mark.slow  # six runs and their scores
def test_the_default_study_chooses_on_dev_and_scores_n20_and_the_chosen_n100_once_untouched(
    quality_run, tiny_model_dir, tmp_path, monkeypatch
):
    args, results = quality_run
    study = load_benchmark("study")
    monkeypatch.setattr(study, "RESULTS", results)
    common = [
        "--task",
        "translation",
        "--model",
        str(tiny_model_dir),
        "--data",
        args[args.index("--data") + 1],
        "--threads",
        "1",
        "--runs",
        str(tmp_path / "runs"),
        "--output",
        str(tmp_path / "out"),
        "--quiet",
        "--untouched",
        "3:1",
        "--eval-max-length",
        "320",
    ]  # fmt: skip (room for 100 virtual tokens)
    assert study.main(["default", *common]) == 0
    record = json.loads((tmp_path / "out" / f"study_default_translation_{tiny_model_dir.name}.json").read_text())
    runs = {r["name"]: r for r in record["runs"]}
    assert {r["max_length"] for r in runs.values()} == {256, 336, 400} and not record["not_run"]
    means = record["choice"]["dev_mean"]
    assert set(means) == {"N=20, max length 256", "N=100, max length 336", "N=100, max length 400"}
    assert means["N=20, max length 256"] == pytest.approx(
        (runs["n20-len256"]["held_out"]["bleu"] + runs["n20-len256-s1"]["held_out"]["bleu"]) / 2
    )
    assert record["choice"]["best"] == max(means, key=means.get)
    untouched = record["untouched"]
    assert (untouched["offset"], untouched["limit"]) == (3, 1)
    chosen = record["choice"]["n100"]
    assert set(untouched["mean"]) == {"N=20, max length 256", chosen}
    assert all(scores["n"] == 1 for scores in untouched["runs"].values()) and len(untouched["runs"]) == 4


# -- the shell scripts ------------------------------------------------------------------------------------------
@pytest.mark.slow  # four softtool processes, two of them under torchrun
def test_gpu_distributed_check_passes_as_a_cpu_dry_run_with_gloo(tmp_path, tiny_model_dir):
    """DEVICE=cpu: the script's own path on the CPU; with no data folder it writes a few sentence pairs."""
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "MODEL": str(tiny_model_dir),
           "DATA": str(tmp_path / "none"), "STEPS": "2", "OUT": str(tmp_path)}  # fmt: skip
    script = REPO / "benchmarks" / "gpu_distributed_check.sh"
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "gpu_distributed_check.json").read_text())
    assert [s["name"] for s in record["steps"]] == ["env", "train_plain", "train_nccl", "eval_plain", "eval_nccl"]
    assert record["device"] == "cpu" and record["passed"] is True, (tmp_path / "gpu_distributed_check.log").read_text()


def test_study_pair_runs_a_study_command_pinned_to_a_core_logs_it_and_passes_its_failure_on(tmp_path):
    script = REPO / "benchmarks" / "study_pair.sh"
    env = {**os.environ, "PYTHON": sys.executable, "STUDY_LOGS": str(tmp_path)}
    published = REPO / "benchmarks" / "results" / "study_length_squad_smollm2-135m.json"

    def pair(*commands: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script), *commands], env=env, capture_output=True, text=True, timeout=120)

    assert pair(f"table {published}").returncode == 0  # study.py's table takes --threads and --quiet too
    (log,) = tmp_path.glob("table_*.log")
    first, *table = log.read_text().splitlines()
    assert first.endswith(f"core 0: study.py table {published}") and "N=100" in "\n".join(table)
    assert pair(f"table {tmp_path / 'missing.json'}").returncode == 1
    refused = pair()
    assert refused.returncode == 2 and refused.stderr.startswith("usage: study_pair.sh")


@pytest.mark.slow  # export_bench.py in a process of its own
def test_gpu_check_exports_and_measures_through_export_bench_as_a_cpu_dry_run(tmp_path, tiny_model_dir):
    """DEVICE=cpu: the script's path without the GPU and provider checks; export_bench.py writes its record."""
    out = tmp_path / "export.json"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "DTYPES": "fp32", "MODEL": str(tiny_model_dir),
           "SIZES": "--batch 2 --max-new-tokens 4 --repeats 1 --threads 1", "OUT": str(out)}  # fmt: skip
    script = REPO / "benchmarks" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["model"] == str(tiny_model_dir) and list(result["exports"]) == ["fp32"]
    assert result["generation"]["onnx-fp32"]["sequences_equal_to_torch"] == "2/2"


def test_gpu_kit_run_names_its_phases_when_given_none_or_another(tmp_path):
    script = REPO / "benchmarks" / "gpu_kit_run.sh"
    env = {**os.environ, "MODEL": str(tmp_path), "DATA": str(tmp_path), "OUT": str(tmp_path)}
    bare = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert bare.returncode != 0 and "usage: gpu_kit_run.sh torch|onnx" in bare.stderr
    other = subprocess.run(["bash", str(script), "bench"], env=env, capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and "unknown phase bench (torch or onnx)" in other.stderr


def test_gpu_full_speed_names_its_phases_when_given_none_or_another(tmp_path):
    script = REPO / "benchmarks" / "gpu_full_speed.sh"
    env = {**os.environ, "MODEL": str(tmp_path), "DATA": str(tmp_path), "OUT": str(tmp_path)}
    bare = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert bare.returncode != 0 and "usage: gpu_full_speed.sh torch|onnx" in bare.stderr
    other = subprocess.run(["bash", str(script), "bench"], env=env, capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and "unknown phase bench (torch or onnx)" in other.stderr


# -- prefill_buckets.py -----------------------------------------------------------------------------------------
def test_prefill_buckets_chooses_aligned_lengths_from_the_data_and_counts_their_padding(tmp_path):
    data = tmp_path / "data"
    write_multi30k(data / "multi30k"), write_squad(data / "squad")
    out = tmp_path / "buckets.json"
    args = ["--data", str(data), "--count", "3", "--last", "64", "--output", str(out)]
    assert load_benchmark("prefill_buckets").main(args) == 0
    result = json.loads(out.read_text())
    chosen = result["chosen"]
    assert len(chosen) == 3 and chosen[-1] == 64 and chosen == sorted(chosen) and all(b % 8 == 0 for b in chosen)
    assert result["computed_not_measured"] and result["command"].startswith("python benchmarks/prefill_buckets.py")
    for name in ("multi30k", "squad"):
        padding = result["padding_over_real_tokens"][name]["chosen"]
        assert padding["examples"] == 4 and padding["one_row"]["exact"] == 0.0
        assert 0 <= padding["one_row"]["bucketed"] <= padding["groups_of_16"]["bucketed"], name
    assert result["row_bucket_filler_over_rows"]["5"] == 0.6  # 5 rows run in the bucket of 8


# -- gqa_chunk_probe.py -----------------------------------------------------------------------------------------
def test_gqa_chunk_probe_finds_a_chunk_after_a_cached_prefix_exact_for_one_row_and_refused_for_two(tmp_path):
    """What the gqa form's prefill rests on, on the installed onnxruntime's CPU provider: the day a version takes two
    rows' chunks over a past without query_seqlens, this fails and the one-row-per-call prefill can be revisited."""
    out = tmp_path / "probe.json"
    assert load_benchmark("gqa_chunk_probe").main(["--output", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"].values()
    cases = run["cases"]
    for name in ("1 row, prefix 8 cached, chunk of 5", "1 row, prefix 8 cached, chunk of 3 right-padded to 6"):
        assert cases[name]["accepted"] and cases[name]["max_abs_diff_outputs"] < 1e-5, name
        assert cases[name]["max_abs_diff_cache"] < 1e-5, name
    assert "batch_size must be 1" in cases["2 rows, prefix 8 cached, chunks of 5 and 5"]["error"]
    if run["knows_query_seqlens"]:
        batched = cases["query_seqlens: 2 rows, prefix 8 cached, chunks of 5 and 3 right-padded"]
        assert batched["accepted"] and batched["max_abs_diff_outputs"] < 1e-5


# -- cpu_matmul_trial.py ----------------------------------------------------------------------------------------
def test_cpu_matmul_trial_times_each_gemm_both_ways_and_the_compiled_step_with_its_tokens(tmp_path, tiny_model_dir):
    out = tmp_path / "matmul.json"
    args = ["--model", str(tiny_model_dir), "--threads", "1", "--rows", "1,2", "--repeats", "2",
            "--compile-backend", "eager", "--output", str(out)]  # fmt: skip
    assert load_benchmark("cpu_matmul_trial").main(args) == 0
    result = json.loads(out.read_text())
    assert {(r["shape"], r["m"]) for r in result["linears"]} >= {("q", 1), ("gate_up", 2)}
    assert all(r["mkl_ms"] > 0 and r["onednn_ms"] > 0 and r["max_abs_diff"] < 1e-3 for r in result["linears"])
    assert [r["m"] for r in result["layouts"]] == [1, 2]
    step = result["decode_step"]
    assert step["slots"] == 2 and step["compile_backend"] == "eager" and step["same_argmax"]
