"""Every bad input to every command ends the same way: exit status 2, one line saying what is wrong
(softtool's `error: ...`, or click's own usage `Error: ...` for a malformed flag), no traceback, and
every input file left exactly as it was."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import run_cli, tree_digest, user_error
from softtool.adapter import Adapter, AdapterMeta, save_adapter

SMOKE = str(Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "smoke.json")
TRAIN = ["train", "--task", "translation", "--data", "{data}", "--model", "{model}", "--max-steps", "1"]
TRAIN += ["--num-virtual-tokens", "2", "--batch-size", "2", "--device", "cpu", "--output", "{out}/run", "--quiet"]
EVAL = ["eval", "{adapter}", "--data", "{data}", "--output", "{out}/eval", "--quiet"]
GENERATE = ["generate", "{adapter}"]
EXPORT = ["export", "{adapter}", "-o", "{out}/onnx"]
BENCH = ["bench", "--config", SMOKE, "--model", "{model}"]
CNNDM = ["train", "--task", "cnndm", "--data", "{inputs}/cnn", "--model", "{model}", "--max-steps", "1", "--quiet"]

# (case, arguments, bytes on stdin or None, what the error line must contain)
CASES = [
    # train: malformed flags are click's usage errors
    ("train lr nan", [*TRAIN, "--lr", "nan"], None, "'nan' is not a finite number"),
    ("train lr inf", [*TRAIN, "--lr", "inf"], None, "'inf' is not a finite number"),
    ("train lr zero", [*TRAIN, "--lr", "0"], None, "not in the range x>0"),
    ("train epochs nan", [*TRAIN, "--epochs", "nan"], None, "'nan' is not a finite number"),
    ("train batch size zero", [*TRAIN, "--batch-size", "0"], None, "0 is not in the range x>=1"),
    ("train steps not a number", [*TRAIN, "--max-steps", "abc"], None, "'abc' is not a valid integer"),
    ("train unknown method", [*TRAIN, "--method", "lora"], None, "'lora' is not one of"),
    ("train negative threads", [*TRAIN, "--threads", "-1"], None, "-1 is not in the range x>=0"),
    ("train output is a file", [*TRAIN[:-2], "{inputs}/existing.txt", "--quiet"], None, "is a file"),
    # train: the options' own checks and the data, before any model loads
    ("train template without input", [*TRAIN, "--template", "[P:4]Translate:"], None, "{source}"),
    ("train template unknown field", [*TRAIN, "--template", "[P:4]{source} {foo}"], None, "['foo']"),
    ("train init text without text", [*TRAIN, "--init", "text"], None, "init_text"),
    ("train autocast on cpu", [*TRAIN, "--autocast", "--dtype", "bfloat16"], None, "autocast"),
    ("train unknown language", [*TRAIN, "--src", "xx"], None, "'xx' is not a known language code"),
    ("train missing data", [*TRAIN[:4], "{inputs}/nowhere", *TRAIN[5:]], None, "nowhere"),
    ("train missing split", [*TRAIN, "--train-split", "nosuch"], None, "no file for split 'nosuch'"),
    ("train missing model", [*TRAIN[:6], "{inputs}/no-model", *TRAIN[7:]], None, "no-model"),
    ("train missing columns", [*CNNDM, "--output", "{out}/cnn"], None, "missing column"),
    # eval
    ("eval limit not a number", [*EVAL, "--limit", "abc"], None, "'abc' is not a valid integer"),
    ("eval batch size zero", [*EVAL, "--batch-size", "0"], None, "0 is not in the range x>=1"),
    ("eval beams zero", [*EVAL, "--num-beams", "0"], None, "0 is not in the range x>=1"),
    ("eval temperature inf", [*EVAL, "--temperature", "inf"], None, "'inf' is not a finite number"),
    ("eval output is a file", [*EVAL[:4], "--output", "{inputs}/existing.txt"], None, "is a file"),
    ("eval sampling with beams", [*EVAL, "--do-sample", "--num-beams", "2"], None, "beam"),
    ("eval missing folder", ["eval", "{inputs}/none", *EVAL[2:]], None, "not found"),
    ("eval onnx on an adapter", [*EVAL, "--backend", "onnx"], None, "needs an export folder"),
    ("eval hidden size mismatch", ["eval", "{inputs}/adapter16", *EVAL[2:]], None, "hidden size 16"),
    # generate
    ("generate beams zero", [*GENERATE, "--num-beams", "0", "x"], None, "0 is not in the range x>=1"),
    ("generate budget negative", [*GENERATE, "--max-new-tokens", "-1", "x"], None, "-1 is not in the range"),
    ("generate budget zero", [*GENERATE, "--max-new-tokens", "0", "x"], None, "0 is not in the range x>=1"),
    ("generate top-p above one", [*GENERATE, "--top-p", "1.5", "x"], None, "not in the range 0<x<=1"),
    ("generate temperature nan", [*GENERATE, "--temperature", "nan", "x"], None, "'nan' is not a finite"),
    ("generate sampling with beams", [*GENERATE, "--do-sample", "--num-beams", "2", "x"], None, "beam"),
    ("generate budget over length", [*GENERATE, "--max-new-tokens", "600", "x"], None, "leaves no room"),
    ("generate field without value", [*GENERATE, "--field", "context", "x"], None, "NAME=VALUE"),
    ("generate text and input", [*GENERATE, "--input", "{inputs}/in.txt", "x"], None, "not both"),
    ("generate missing input", [*GENERATE, "--input", "{inputs}/none.txt"], None, "does not exist"),
    ("generate output is input", [*GENERATE, "-i", "{inputs}/in.jsonl", "-o", "{inputs}/in.jsonl"], None, "is the"),
    ("generate output is a folder", [*GENERATE, "-i", "{inputs}/in.txt", "-o", "{inputs}"], None, "is a directory"),
    ("generate binary stdin", GENERATE, b"A dog.\n\xff\xfe\x00\x01\n", "stdin: line 2 is not UTF-8"),
    ("generate very long line", [*GENERATE, "-i", "{inputs}/long.txt", "-o", "{out}/o.jsonl"], None, "line 2"),
    ("generate jsonl without field", [*GENERATE, "-i", "{inputs}/nofield.jsonl"], None, "lacks the template field"),
    ("generate jsonl not json", [*GENERATE, "-i", "{inputs}/broken.jsonl"], None, "line 2 is not valid JSON"),
    ("generate corrupt adapter", ["generate", "{inputs}/corrupt", "A dog."], None, "corrupt"),
    # export
    ("export verify steps zero", [*EXPORT, "--verify-steps", "0"], None, "0 is not in the range x>=1"),
    ("export negative top-k", [*EXPORT, "--top-k", "-1"], None, "-1 is not in the range x>=0"),
    ("export unknown dtype", [*EXPORT, "--dtype", "int4"], None, "'int4' is not one of"),
    ("export int8 on cuda", [*EXPORT, "--dtype", "int8", "--device", "cuda"], None, "int8"),
    # bench
    ("bench batch size zero", [*BENCH, "--batch-size", "0"], None, "0 is not in the range x>=1"),
    ("bench limit not a number", [*BENCH, "--limit", "abc"], None, "'abc' is not a valid integer"),
    ("bench lr nan", [*BENCH, "--train", "--lr", "nan"], None, "'nan' is not a finite number"),
    ("bench unknown backend", [*BENCH, "--backends", "peft,tensorrt"], None, "'tensorrt' is not one of"),
    ("bench prompt lengths without train", [*BENCH, "--num-virtual-tokens", "20,100"], None, "one prompt length"),
    ("bench bad device", [*BENCH, "--device", "gpu"], None, "device must be cpu, cuda or cuda:N"),
    ("bench config option", ["bench", "--config", "{inputs}/bench.json"], None, "batch_size must be at least 1"),
]


def _adapter(folder, model_dir, hidden: int = 32):
    meta = AdapterMeta(
        base_model=str(model_dir),
        num_virtual_tokens=2,
        token_dim=hidden,
        vocab_size=49152,
        template="[P:2]English: {source}\nGerman:",
        task="translation",
        task_options={"src": "en", "tgt": "de"},
    )
    return save_adapter(folder, Adapter(torch.zeros(2, hidden), meta))


def _fill(arg: str, places: dict) -> str:
    for name, path in places.items():  # not str.format: templates carry {field}s of their own
        arg = arg.replace("{" + name + "}", str(path))
    return arg


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    """Every input the cases read: data, adapters (good, wrong size, corrupt) and input files."""
    root = tmp_path_factory.mktemp("inputs")
    data = root / "data"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"{split}.en").write_text("A man rides a bike.\nTwo dogs play.\n")
        (data / f"{split}.de").write_text("Ein Mann fährt Rad.\nZwei Hunde spielen.\n")
    (root / "cnn").mkdir()
    for split in ("train", "dev"):
        (root / "cnn" / f"{split}.csv").write_text("id,text\n1,hello\n")
    _adapter(root / "adapter", tiny_model_dir)
    _adapter(root / "adapter16", tiny_model_dir, hidden=16)
    _adapter(root / "corrupt", tiny_model_dir)
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    (root / "existing.txt").write_text("keep me\n")
    (root / "in.txt").write_text("A dog runs.\n")
    (root / "in.jsonl").write_text('{"source": "A dog runs."}\n')
    (root / "long.txt").write_text("A short line.\n" + "word " * 10_000 + "\n")  # 50,000 characters
    (root / "nofield.jsonl").write_text('{"text": "A dog runs."}\n')
    (root / "broken.jsonl").write_text('{"source": "A dog runs."}\n{"source": \n')
    (root / "bench.json").write_text(json.dumps({"task": "translation", "inputs": ["x"], "batch_size": 0}))
    return root


@pytest.mark.parametrize(("args", "stdin", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_no_file(
    args, stdin, expected, inputs, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    places = {
        "data": inputs / "data",
        "model": tiny_model_dir,
        "adapter": inputs / "adapter",
        "inputs": inputs,
        "out": tmp_path,
    }
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    before = tree_digest(inputs), tree_digest(tiny_model_dir)
    started = time.perf_counter()
    result = run_cli([_fill(a, places) for a in args], capsys)
    seconds = time.perf_counter() - started
    line = user_error(result.code, result.err)
    assert expected in line
    assert (tree_digest(inputs), tree_digest(tiny_model_dir)) == before
    assert seconds < 30  # a refusal never runs a model (a 50,000-character line is refused, not generated)
