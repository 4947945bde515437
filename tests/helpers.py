"""What several test files share: running `softtool` in this process and reading its one-line errors, the tiny
random Llama, a parallel en/de data folder, a translation soft prompt for that model, and benchmarks/'s scripts
loaded as modules."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

# Runs a docs script as a user would, with softtool made unimportable: it must not need it.
NO_SOFTTOOL = "import runpy, sys; sys.modules['softtool'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0])"


def docs_example(section: str, doc: str = "export.md") -> str:
    """The python block under a `## section` heading of docs/DOC."""
    text = (Path(__file__).resolve().parents[1] / "docs" / doc).read_text()
    match = re.search(rf"\n## {re.escape(section)}\n.*?```python\n(.*?)```", text, re.S)
    assert match, f"docs/{doc} has no python block under '{section}'"
    return match.group(1)


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


def run_cli(args, capsys=None) -> CliResult:
    """Run `softtool ARGS` in this process; (exit status, stdout, stderr), the streams only when given capsys."""
    from softtool.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    captured = capsys.readouterr() if capsys is not None else None
    return CliResult(code, captured.out if captured else "", captured.err if captured else "")


def error_line(code: int, err: str) -> str:
    """The single `error: ...` line; fails on a traceback, a status other than 2, or several error lines."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def user_error(code: int, err: str) -> str:
    """The one line that says what is wrong: softtool's `error: ...` or click's usage `Error: ...`."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(("error: ", "Error: "))]
    assert len(lines) == 1, err
    if lines[0].startswith("Error: "):  # click's usage error: Usage / Try ... --help / Error
        assert err.startswith("Usage: softtool "), err
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (to check that a command changed nothing)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def wait_for_line(child: subprocess.Popen, expected: str) -> None:
    """Read the child's stdout (text mode) until a line equal to `expected`; fail with its stderr if it exits first.

    For tests that stop a child at a controlled point (it prints `expected`, then waits to be killed).
    """
    seen = []
    for line in child.stdout:
        if line.strip() == expected:
            return
        seen.append(line)
    child.wait()
    raise AssertionError(
        f"the child exited ({child.returncode}) before {expected!r}: {seen[-5:]} {child.stderr.read()[-3000:]}"
    )


# The random Llama the C++ search is held to transformers' generate() with: its vocabulary and pad token.
PARITY_VOCAB = 97
PARITY_PAD = 0


def parity_llama():
    """A seeded random Llama (vocabulary 97, no EOS, wide weights), in eval mode: test_search_parity's model and
    the one tests/cpp/make_golden.py records ctest's golden files with."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=PARITY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # spread-out logits: no near-ties that float rounding could flip
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=PARITY_PAD,
    )
    return LlamaForCausalLM(config).eval()


# The tiny random Llama's shapes (hidden 32, 2 layers, GQA 4/2); the vocabulary is SmolLM2's tokenizer's.
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


def save_tiny_model(path: Path, tokenizer, model_class, config_class, **config: Any) -> Path:
    """A `model_class` built from `config_class(**config)` with `tokenizer`'s vocabulary (unless `config` sets
    one) and special tokens, seeded (the same weights every time), saved with the tokenizer as a normal model
    folder at `path`."""
    import torch

    torch.manual_seed(0)
    specials = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    model_class(config_class(**{"vocab_size": len(tokenizer), **specials, **config})).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_llama(path: Path, tokenizer, **config: Any) -> Path:
    """A TINY_LLAMA (save_tiny_model) at `path`; `config` overrides LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_tiny_model(path, tokenizer, LlamaForCausalLM, LlamaConfig, **{**TINY_LLAMA, **config})


# The model families of the matrix (tests/test_model_families.py): transformers' config and model class names and
# what each needs beyond the shared tiny shape. Widths stay 64 with 4 heads (2 key/value heads where the family
# has grouped-query attention), 2 layers, a 16-wide head where the family sets its own.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),  # q/k norms
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 12}),  # the window binds: rows run longer
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),  # fused qkv and gate/up
    "phi": ("PhiConfig", "PhiForCausalLM", {}),  # partial rotary, LayerNorm, GELU, a biased head
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 12}),  # soft-capping
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 12}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),  # norms after attention and MLP, q/k norms
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),  # embedding, residual, attention and logit multipliers
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}),  # parallel residual
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),  # biases, LayerNorm
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"num_key_value_heads": None, "n_positions": 512}),  # absolute positions
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    ),
}
FAMILY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,  # lively: greedy rows differ from input to input
)


def save_tiny_family(path: Path, tokenizer, family: str) -> Path:
    """A tiny random model of `family` (FAMILIES) with lively weights, saved with `tokenizer` at `path`: besides the
    wide initializer, every bias and every norm weight is drawn at random (transformers starts them at 0 and 1, which
    would leave q/k/v biases and q/k norms untested), seeded."""
    import torch
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    config = {**FAMILY_SHAPE, **extra}
    config = {k: v for k, v in config.items() if v is not None}
    save_tiny_model(path, tokenizer, getattr(transformers, model_name), getattr(transformers, config_name), **config)
    model = getattr(transformers, model_name).from_pretrained(path)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(path)
    return path


# Three short en/de sentence pairs: write_translation_data's default.
SOURCES = ["A man rides a bike.", "Two dogs play.", "A girl reads."]
TARGETS = ["Ein Mann fährt Rad.", "Zwei Hunde spielen.", "Ein Mädchen liest."]


def write_translation_data(folder: Path, sources=SOURCES, targets=TARGETS, splits=("train", "dev")) -> Path:
    """`folder` with SPLIT.en and SPLIT.de for each split, one sentence a line (the Multi30k layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (folder / f"{split}.en").write_text("\n".join(sources) + "\n")
        (folder / f"{split}.de").write_text("\n".join(targets) + "\n")
    return folder


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module, for a test to call its main(argv). The scripts are not a package: their
    folder goes first on sys.path, as running one puts it there, so a script's imports of its siblings resolve."""
    import importlib

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def save_tiny_adapter(
    path: Path, model_dir: Path, table, template: str | None = None, task="translation", decoding: dict | None = None
):
    """Save `table` [n, hidden] as a soft prompt for the tiny model (SmolLM2's 49,152-token vocabulary): by default
    en->de translation with the template `[P:n]English: {source}\nGerman:`, and the task's decoding defaults
    `decoding` (none by default). Returns the adapter folder."""
    from softtool.adapter import Adapter, AdapterMeta, save_adapter

    n, hidden = table.shape
    meta = AdapterMeta(
        base_model=str(model_dir),
        num_virtual_tokens=n,
        token_dim=hidden,
        vocab_size=49152,
        template=template or f"[P:{n}]English: {{source}}\nGerman:",
        task=task,
        task_options={"src": "en", "tgt": "de"} if task == "translation" else {},
        decoding=dict(decoding or {}),
    )
    return save_adapter(path, Adapter(table, meta))


def hf_generate_rows(model, generator, rows, eos: int = 2, **generate_kwargs) -> list[list[list[int]]]:
    """transformers' generate, one row at a time (no padding), on the embeddings `generator`'s template and
    prompt table define: per row, its returned sequences, each cut before its first `eos`."""
    import torch

    from softtool.prompts.embedding import merge_embeddings

    out = []
    for row in rows:
        ids = torch.tensor([generator.row_ids([row], [0])[0]])
        embeds = merge_embeddings(model, ids, generator.table, generator.vocab_size)
        sequences = model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            eos_token_id=[eos],
            pad_token_id=eos,
            **generate_kwargs,
        ).tolist()
        out.append([seq[: seq.index(eos)] if eos in seq else seq for seq in sequences])
    return out


def training_features(tokenizer, template, vocab: int, sources, targets) -> list:
    """Training features of (source, target) pairs under `template`, the target ending in EOS."""
    from softtool.training.batching import make_feature

    feats = []
    for src, tgt in zip(sources, targets, strict=True):
        pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in template.render({"source": src})]
        target = tokenizer(tgt, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        feats.append(make_feature(template, pieces, target, vocab))
    return feats


def loss_and_grad(model, feats, table, prefix_tokens: int, vocab: int, pad: int = 2):
    """The mean loss of `feats` and its gradient with respect to the prompt table (a copy)."""
    from softtool.training.batching import collate
    from softtool.training.forward import batch_loss

    table = table.clone().requires_grad_(True)
    loss, n = batch_loss(model, collate(feats, pad, prefix_tokens), table, vocab)
    (loss / n).backward()
    return (loss / n).item(), table.grad


def reference_logprobs(model, table, vocab_size: int, ids):
    """Log-probs [len(ids), V] of plain transformers over one row of ids in the V + t*N + j convention (prompt rows
    substituted as embeddings, no cache, float32): row p is the distribution of the token after position p."""
    import torch

    from softtool.prompts.embedding import merge_embeddings

    row = torch.tensor([list(ids)])
    with torch.no_grad():
        logits = model(inputs_embeds=merge_embeddings(model, row, table, vocab_size)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def format_2_copy(export, dest):
    """`export` as softtool wrote it before format 3: the same graph without the target scoring (onnx's
    extract_model keeps what the head and the cache need) and a format-2 record."""
    import json
    import shutil

    import onnx.utils

    shutil.copytree(export, dest)
    record = json.loads((dest / "softtool_export.json").read_text())
    inputs = [name for name in record["inputs"] if name != "target_ids"]
    outputs = [name for name in record["outputs"] if not name.startswith("target_")]
    onnx.utils.extract_model(str(export / "model.onnx"), str(dest / "model.onnx"), inputs, outputs)
    del record["target_top_k"]
    record.update(format=2, inputs=inputs, outputs=outputs)
    (dest / "softtool_export.json").write_text(json.dumps(record))
    return dest


class Server:
    """A `softtool serve` child process on a free localhost port, one thread; `url` is set once it accepts
    connections (test_serve.py, test_serve_logprobs.py)."""

    def __init__(self, args: list[str], log: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "softtool", "serve", *map(str, args), "--port", "0", "--threads", "1"],
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),  # noqa: SIM115 - closed with the process
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline()
        match = re.search(r"at (http://\S+)/v1", line)
        if not match:
            self.proc.kill()
            raise AssertionError(f"the server did not start: {line!r} {log.read_text()[-3000:]}")
        self.url = match.group(1)

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"{self.url}/metrics").text

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode
