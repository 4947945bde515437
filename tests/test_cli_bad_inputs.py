"""Every bad input to every command ends the same way: exit status 2, one line saying what is wrong
(softtool's `error: ...`, or click's own usage `Error: ...` for a malformed flag), no traceback, and
every input file left exactly as it was."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli, save_tiny_adapter, tree_digest, user_error

SMOKE = str(Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "smoke.json")
TRAIN = ["train", "--task", "translation", "--data", "{data}", "--model", "{model}", "--max-steps", "1"]
TRAIN += ["--num-virtual-tokens", "2", "--batch-size", "2", "--device", "cpu", "--output", "{out}/run", "--quiet"]
EVAL = ["eval", "{adapter}", "--data", "{data}", "--output", "{out}/eval", "--quiet"]
GENERATE = ["generate", "{adapter}"]
EXPORT = ["export", "{adapter}", "-o", "{out}/onnx"]
BENCH = ["bench", "--config", SMOKE, "--model", "{model}"]
# TRAIN with --output naming a prepared run in the inputs (the same options, so --resume reaches its checkpoint)
TRAIN_AT = [*TRAIN[:-2], "{inputs}/RUN", "--quiet"]
EVAL_AT = ["eval", "{inputs}/FOLDER", *EVAL[2:]]
CNNDM = ["train", "--task", "cnndm", "--data", "{inputs}/cnn", "--model", "{model}", "--max-steps", "1", "--quiet"]


def _at(args: list[str], name: str) -> list[str]:
    """`args` with the prepared run or folder NAME of the inputs in place of RUN / FOLDER."""
    return [a.replace("RUN", name).replace("FOLDER", name) for a in args]


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
    ("train init text empty", [*TRAIN, "--init", "text", "--init-text", " "], None, "init_text is empty"),
    ("train autocast on cpu", [*TRAIN, "--autocast", "--dtype", "bfloat16"], None, "autocast"),
    ("train unknown language", [*TRAIN, "--src", "xx"], None, "'xx' is not a known language code"),
    ("train missing data", [*TRAIN[:4], "{inputs}/nowhere", *TRAIN[5:]], None, "nowhere"),
    ("train missing split", [*TRAIN, "--train-split", "nosuch"], None, "no file for split 'nosuch'"),
    ("train missing model", [*TRAIN[:6], "{inputs}/no-model", *TRAIN[7:]], None, "no-model"),
    ("train missing columns", [*CNNDM, "--output", "{out}/cnn"], None, "missing column"),
    # train: the output folder and its checkpoint (softtool never unpickles, and never replaces a run unasked)
    ("train over a run", _at(TRAIN_AT, "run"), None, "already holds a training run; pass --overwrite"),
    ("train resume another run", [*_at(TRAIN_AT, "run"), "--resume", "--lr", "0.5"], None, "different run"),
    ("train resume pickled checkpoint", [*_at(TRAIN_AT, "run-pickle"), "--resume"], None, "older softtool"),
    ("train resume checkpoint missing keys", [*_at(TRAIN_AT, "run-nokeys"), "--resume"], None, "lacks ['optimizer'"),
    ("train resume corrupt checkpoint", [*_at(TRAIN_AT, "run-corrupt"), "--resume"], None, "corrupt or unreadable"),
    ("train resume without checkpoint", [*_at(TRAIN_AT, "run-stub"), "--resume"], None, "no checkpoint at"),
    ("train resume nothing", [*TRAIN, "--resume"], None, "holds no run"),
    (
        "train loss becomes nan",
        [*TRAIN, "--max-steps", "4", "--lr", "1e6", "--max-grad-norm", "0", "--dtype", "float16"],
        None,
        "no checkpoint was written before it",
    ),
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
    ("eval template without input", [*EVAL, "--template", "[P:2]Translate:"], None, "input field(s) {source}"),
    ("eval nan adapter", _at(EVAL_AT, "nan"), None, "NaN or infinite"),
    ("eval export nan table", _at(EVAL_AT, "onnx-nan"), None, "prompt_table.safetensors holds NaN"),
    ("eval export wrong vocab", _at(EVAL_AT, "onnx-vocab"), None, "vocab_size is 49153 but the graph's logits"),
    ("eval export wrong layers", _at(EVAL_AT, "onnx-layers"), None, "num_layers is 3"),
    ("eval export without metadata", _at(EVAL_AT, "onnx-nojson"), None, "model.onnx but no softtool_export.json"),
    ("eval export without tokenizer", _at(EVAL_AT, "onnx-notok"), None, "has no tokenizer"),
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
    ("generate template without input", [*GENERATE, "--template", "[P:2]Translate:", "x"], None, "are open"),
    ("generate nan adapter", ["generate", "{inputs}/nan", "A dog."], None, "NaN or infinite"),
    ("generate export nan table", ["generate", "{inputs}/onnx-nan", "A dog."], None, "holds NaN"),
    ("generate export wrong vocab", ["generate", "{inputs}/onnx-vocab", "A dog."], None, "vocab_size is 49153"),
    ("generate export wrong kv heads", ["generate", "{inputs}/onnx-kvheads", "A dog."], None, "num_kv_heads is 3"),
    ("generate export without metadata", ["generate", "{inputs}/onnx-nojson", "A dog."], None, "no softtool_export"),
    ("generate export without tokenizer", ["generate", "{inputs}/onnx-notok", "A dog."], None, "has no tokenizer"),
    ("generate export long line", ["generate", "{inputs}/onnx", "-i", "{inputs}/long.txt"], None, "line 2"),
    # export
    ("export verify steps zero", [*EXPORT, "--verify-steps", "0"], None, "0 is not in the range x>=1"),
    ("export negative top-k", [*EXPORT, "--top-k", "-2"], None, "-2 is not in the range x>=-1"),
    ("export unknown dtype", [*EXPORT, "--dtype", "int4"], None, "'int4' is not one of"),
    ("export int8 on cuda", [*EXPORT, "--dtype", "int8", "--device", "cuda"], None, "int8"),
    ("export into its adapter", ["export", "{adapter}", "-o", "{adapter}"], None, "would replace the input"),
    ("export into a parent of its adapter", ["export", "{adapter}", "-o", "{inputs}"], None, "would replace"),
    ("export into a folder of other files", ["export", "{adapter}", "-o", "{inputs}/data"], None, "did not write"),
    ("export over an export", ["export", "{adapter}", "-o", "{inputs}/onnx"], None, "pass --overwrite"),
    ("export onto a file", ["export", "{adapter}", "-o", "{inputs}/existing.txt"], None, "is a file"),
    ("export nan adapter", ["export", "{inputs}/nan", "-o", "{out}/onnx"], None, "NaN or infinite"),
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
    return save_tiny_adapter(folder, model_dir, torch.zeros(2, hidden))


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
    _nan_adapter(root / "adapter", root / "nan")
    _runs(root, {"data": data, "model": tiny_model_dir, "out": root / "trained"})
    _exports(root / "adapter", root)
    return root


def _nan_adapter(good, folder):
    shutil.copytree(good, folder)
    table = torch.zeros(2, 32)
    table[1, 5] = float("nan")
    save_file({"prompt_embeddings": table}, str(folder / "adapter_model.safetensors"))


def _runs(root, places):
    """A finished 1-step run (trained with TRAIN's options), and copies with a tampered checkpoint."""
    result = run_cli([_fill(a, places) for a in TRAIN])
    assert result.code == 0
    run = root / "trained" / "run"
    shutil.copytree(run, root / "run")
    for name in ("run-pickle", "run-nokeys", "run-corrupt", "run-stub"):
        shutil.copytree(run, root / name)
        (root / name / "checkpoints" / "last.safetensors").unlink()
    # A pickle that would create a file when loaded (the inputs' hash check sees it if it ever ran).
    (root / "run-pickle" / "checkpoints" / "last.pt").write_bytes(pickle.dumps(_CreatesAFile(root / "pwned")))
    state = json.dumps({"prompt": {}, "state": {"step": 1}})
    metadata = {"format": "softtool-checkpoint", "version": "1", "state": state}
    save_file({"x": torch.zeros(1)}, str(root / "run-nokeys" / "checkpoints" / "last.safetensors"), metadata=metadata)
    (root / "run-corrupt" / "checkpoints" / "last.safetensors").write_bytes(b"\x10\x00\x00garbage")
    for name in ("adapter_config.json", "adapter_model.safetensors", "softtool.json", "metrics.jsonl"):
        (root / "run-stub" / name).unlink(missing_ok=True)


def _exports(adapter, root):
    """An export of the adapter, and copies with tampered metadata, table or tokenizer."""
    from softtool.export.onnx import ExportOptions, export_adapters

    export_adapters([adapter], root / "onnx", ExportOptions(verify_steps=2))
    edits = {"onnx-vocab": {"vocab_size": 49153}, "onnx-layers": {"num_layers": 3}, "onnx-kvheads": {"num_kv_heads": 3}}
    for name, changes in edits.items():
        shutil.copytree(root / "onnx", root / name)
        meta = root / name / "softtool_export.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), **changes}))
    shutil.copytree(root / "onnx", root / "onnx-nan")
    table = load_file(str(root / "onnx-nan" / "prompt_table.safetensors"))["prompt_table"]
    table[0, 0] = float("nan")
    save_file({"prompt_table": table}, str(root / "onnx-nan" / "prompt_table.safetensors"))
    shutil.copytree(root / "onnx", root / "onnx-nojson")
    (root / "onnx-nojson" / "softtool_export.json").unlink()
    shutil.copytree(root / "onnx", root / "onnx-notok")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (root / "onnx-notok" / name).unlink(missing_ok=True)


class _CreatesAFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


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
