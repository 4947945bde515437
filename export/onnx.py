"""`softtool export`: trace the prompted model into ONNX, convert it (fp16, int8), verify it, write the folder.

The folder needs nothing else to run (its contract is softtool.export_meta.ExportMeta):
    model.onnx (+ model.onnx.data when large)   the graph: softtool.runtime.slot_model.SlotLM, traced (form
                                                "traced"), or the GroupQueryAttention decoder of export/gqa.py
                                                that ONNX Runtime captures as a CUDA graph (form "gqa"), or the
                                                traced graph with [B, 1, V] logits for onnxruntime-genai (form
                                                "genai", with genai_config.json: export/genai.py)
    prompt_table.safetensors                    {"prompt_table": [tasks*N, H]}: every task's prompt, in task order
    tokenizer files                             the base model's tokenizer
    config.json, generation_config.json         the base model's transformers config and generation defaults
    softtool_export.json                        ExportMeta (written last, after verification passed)

Nothing is deleted that softtool did not write: the export is built in a temporary folder beside the target
and swapped in only after it verified, so a failure leaves an existing export untouched; an existing target
is replaced only when it is itself an export (`--overwrite`) and never when it holds one of the inputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from softtool.errors import SofttoolError
from softtool.export_meta import SCORE_TOP_K, TARGET_INPUT, TARGET_OUTPUTS, ExportMeta, ExportTask
from softtool.fileio import atomic_write_bytes
from softtool.runtime.session import resolve_device

OPSET = 17
# Above this many bytes of weights the graph keeps them in model.onnx.data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30
DTYPES = ("fp32", "fp16", "int8")
FORMS = ("auto", "traced", "gqa", "genai")
# A wide vocabulary (Gemma 3: 262,144) makes full logits the largest thing a step moves to the host and the
# search reads (1 MiB per row in float32); above LARGE_VOCAB the graph emits only the top AUTO_TOP_K by default.
# 64 candidates keep beam search exact up to 32 beams with one EOS id (docs/search.md, step_topk); sampling
# and the repetition processors then see only those 64.
LARGE_VOCAB = 65536
AUTO_TOP_K = 64


@dataclass
class ExportOptions:
    """How to export a soft prompt (the fields are `softtool export` options)."""

    device: str = field(
        default="cpu",
        metadata={"help": "Device the graph is built and verified for: cpu or cuda.", "choices": ("cpu", "cuda")},
    )
    dtype: str = field(
        default="fp32",
        metadata={"help": "Weights: fp32, fp16 (for CUDA) or int8 (8-bit weights, for the CPU).", "choices": DTYPES},
    )
    form: str = field(
        default="auto",
        metadata={
            "help": "Graph form: traced (the model as PyTorch runs it, any device and dtype), gqa (a decoder around "
            "ONNX Runtime's GroupQueryAttention whose decode step is captured as a CUDA graph; llama, qwen2, "
            "qwen3 and mistral models, fp16 on cuda), genai (the traced graph with logits [batch, 1, vocab] and a genai_config.json, "
            "for onnxruntime-genai; softtool runs it too), auto (gqa for --device cuda --dtype fp16 on llama "
            "models, the family run on a GPU so far, else traced).",
            "choices": FORMS,
        },
    )
    prompt_table_input: bool = field(
        default=False,
        metadata={"help": "Make the prompt table a graph input instead of a constant, so new tasks need no re-export."},
    )
    top_k: int = field(
        default=-1,
        metadata={
            "help": "Emit the top-k log-probs and ids instead of full logits (0: full logits; -1: "
            f"{AUTO_TOP_K} when the vocabulary has more than {LARGE_VOCAB:,} tokens, else full logits).",
            "min": -1,
        },
    )
    int8_method: str = field(
        default="weight-only",
        metadata={
            "help": "int8 scheme: weight-only (MatMulNBits, close to fp32) or dynamic (quantize_dynamic).",
            "choices": ("weight-only", "dynamic"),
        },
    )
    strict_device: bool = field(
        default=False, metadata={"help": "Fail instead of falling back to CPU when CUDA is missing."}
    )
    model: str | None = field(default=None, metadata={"help": "Base model to use instead of the adapter's base_model."})
    verify: bool = field(default=True, metadata={"help": "Check the exported graph against PyTorch before finishing."})
    verify_steps: int = field(
        default=32, metadata={"help": "Greedy decode steps compared during verification.", "min": 1}
    )
    opset: int = field(default=OPSET, metadata={"help": "ONNX opset of the graph.", "min": 14})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing export in the output folder."})

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be fp32, fp16 or int8, got {self.dtype!r}")
        if self.dtype == "int8" and self.device == "cuda":
            raise ValueError("int8 is dynamic quantization for the CPU; use fp16 for cuda")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.form == "gqa" and self.dtype == "int8":
            raise ValueError("the gqa form has no int8 variant; use --form traced for int8")
        if self.form == "gqa" and self.device == "cuda" and self.dtype != "fp16":
            raise ValueError("GroupQueryAttention runs in fp16 on cuda; pass --dtype fp16 with --form gqa")
        if self.form == "genai":
            from softtool.export.genai import check_options

            check_options(self.prompt_table_input, self.top_k)
        if self.int8_method not in ("weight-only", "dynamic"):
            raise ValueError(f"int8_method must be weight-only or dynamic, got {self.int8_method!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 0 (or -1: by vocabulary size), got {self.top_k}")
        if self.verify_steps < 1:
            raise ValueError(f"verify_steps must be >= 1, got {self.verify_steps}")
        if self.opset < 14:
            raise ValueError(f"opset must be >= 14, got {self.opset}")


def resolve_top_k(top_k: int, vocab_size: int) -> int:
    """The graph's top-k: as given, or for -1 AUTO_TOP_K above LARGE_VOCAB tokens and full logits (0) below."""
    if top_k >= 0:
        return top_k
    return AUTO_TOP_K if vocab_size > LARGE_VOCAB else 0


AUTO_GQA_MODEL_TYPES = ("llama",)


def resolve_form(options: ExportOptions, model, device: str, tasks: tuple[str, ...] = ()) -> str:
    """The graph form to write: as given, or for auto gqa on cuda in fp16 where the model allows, else traced. A
    classify task ranks its labels with the graph's target scoring, which the gqa form lacks: auto then writes the
    traced form, and --form gqa is refused."""
    from softtool.export.gqa import gqa_unsupported

    if options.form in ("traced", "genai"):
        return options.form
    reason = gqa_unsupported(model)
    if "classify" in tasks:
        reason = "a classify task scores its labels in the graph, which only the traced form does"
    if options.form == "gqa":
        if reason:
            raise SofttoolError(f"--form gqa does not cover this model: {reason}; use --form traced")
        return "gqa"
    # auto picks the form only for the families whose gqa graph ran on a GPU (llama); qwen2, qwen3 and mistral are
    # written with --form gqa, checked on the CPU only so far (docs/models.md).
    auto = reason is None and model.config.model_type in AUTO_GQA_MODEL_TYPES
    return "gqa" if device == "cuda" and options.dtype == "fp16" and auto else "traced"


def _load_tasks(adapter_dirs: list[str], model_override: str | None):
    from softtool.adapter import load_adapter

    if not adapter_dirs:
        raise SofttoolError("give at least one adapter folder to export")
    adapters = [load_adapter(d) for d in adapter_dirs]
    first = adapters[0].meta
    base = model_override or first.base_model
    if not base:
        raise SofttoolError(f"{adapter_dirs[0]} does not name its base model; pass --model")
    for path, adapter in zip(adapter_dirs[1:], adapters[1:], strict=True):
        if adapter.meta.num_virtual_tokens != first.num_virtual_tokens:
            raise SofttoolError(
                f"{path} has {adapter.meta.num_virtual_tokens} virtual tokens but {adapter_dirs[0]} has "
                f"{first.num_virtual_tokens}; tasks exported together need the same number"
            )
    return adapters, base


def _model_facts(model, tokenizer) -> dict[str, Any]:
    config = model.config
    heads = int(config.num_attention_heads)
    eos = getattr(model.generation_config, "eos_token_id", None) or config.eos_token_id or tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return {
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
        "hidden_size": int(config.hidden_size),
        "num_layers": int(config.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "eos_token_ids": eos_ids,
        "pad_token_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]),
    }


@contextlib.contextmanager
def traceable_experts(model):
    """A mixture-of-experts model routes with transformers' batched_mm experts while it is traced: each token's k
    experts are gathered and applied with batched matmuls, ops ONNX has, where the default grouped_mm counts tokens
    per expert with aten::histc (no ONNX op) and the eager loop's experts would be baked in from the trace's
    sample. The same experts, the same weights; only the order of the additions differs."""
    config = model.config
    previous = getattr(config, "_experts_implementation", None)
    if previous is None or not is_mixture_of_experts(config):
        yield
        return
    config._experts_implementation = "batched_mm"
    try:
        yield
    finally:
        config._experts_implementation = previous


def is_mixture_of_experts(config) -> bool:
    return bool(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))


def _trace(wrapper, facts: dict[str, Any], path: Path, options: ExportOptions, table) -> tuple[list, list]:
    """Trace SlotLM with the TorchScript exporter (fast, exact on eager attention); returns (inputs, outputs)."""
    import torch

    from softtool.runtime.slot_model import io_names

    batch, _seq, capacity = 2, 5, 12
    v = facts["vocab_size"]
    input_ids = torch.tensor([[v, v + 1, 5, 6, 7], [0, 0, v, 9, 10]], dtype=torch.long)
    # Row 0 continues at positions 2..6; row 1 is left-padded: its padding writes to the scratch column.
    position_ids = torch.tensor([[2, 3, 4, 5, 6], [capacity - 1, capacity - 1, 0, 1, 2]], dtype=torch.long)
    kv_shape = (batch, facts["num_kv_heads"], capacity, facts["head_dim"])
    past = [torch.zeros(kv_shape) for _ in range(2 * facts["num_layers"])]
    table_args = (table,) if options.prompt_table_input else ()
    # Scoring targets: fewer than the sequence, so the traced slice keeps its length dynamic.
    target_ids = torch.tensor([[v, 6, 7], [0, 9, 10]], dtype=torch.long).clamp(max=v - 1)
    args = (input_ids, position_ids, *table_args, *past, target_ids)
    inputs, outputs = io_names(
        facts["num_layers"], table_as_input=options.prompt_table_input, top_k=options.top_k, targets=True
    )
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"}}
    dynamic["prompt_table"] = {0: "table_rows"}
    for name in inputs + outputs:
        if name.startswith(("past_key_values", "present")):
            dynamic[name] = {0: "batch", 2: "capacity"}
    for name in ("logits", "topk_values", "topk_indices"):
        dynamic[name] = {0: "batch"}
    for name in ("target_ids", *TARGET_OUTPUTS):
        dynamic[name] = {0: "batch", 1: "targets"}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, but it traces this model exactly and in
        # seconds; the tracer's notes on Python values in transformers' code do not apply with an explicit mask.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={k: d for k, d in dynamic.items() if k in inputs or k in outputs},
            opset_version=options.opset,
            dynamo=False,
            do_constant_folding=True,
        )
    _default_no_targets(path)
    return inputs, outputs


def _default_no_targets(path: Path) -> None:
    """Give the graph's target_ids input a default, an empty [1, 0], so a caller that scores nothing (any
    onnxruntime user who feeds only input_ids, position_ids and the cache) need not feed it. ONNX Runtime treats
    an initializer that is also a graph input as an overridable default, never as a constant."""
    import numpy as np

    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 0), dtype=np.int64), TARGET_INPUT))
    onnx.save_model(proto, str(path))


def _save_onnx(model_proto, path: Path, large: bool) -> None:
    import onnx

    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    if large:
        onnx.save_model(
            model_proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model_proto, str(path))


def _is_large(path: Path) -> bool:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0) > EXTERNAL_DATA_BYTES


def _convert(path: Path, dtype: str, keep_fp32: list[str], int8_method: str) -> None:
    """Rewrite the fp32 graph at `path` in place as fp16 or int8."""
    import onnx

    if dtype == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = onnx.load(str(path))
        # Logits and the prompt table stay float32 at the boundary; the KV cache is fp16 end to end.
        proto = convert_float_to_float16(proto, keep_io_types=keep_fp32, disable_shape_infer=True)
        _save_onnx(proto, path, _is_large(path))
    elif dtype == "int8":
        from softtool.export.quantize import quantize_int8

        quantize_int8(path, int8_method)


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a folder only its owner can enter; an export gets a plain mkdir's mode (0755 by default)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


def _save_model_files(folder: Path, model, tokenizer) -> None:
    """What other tools read from a model folder: the tokenizer, and the base model's config.json and
    generation_config.json (architecture, sizes, special tokens, default generation settings)."""
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _check_target(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse to replace anything softtool did not write, or anything the export reads."""
    target = out.resolve()
    for src in inputs:
        src = src.resolve()
        if target == src or target in src.parents:
            raise SofttoolError(
                f"-o {out} would replace the input {src}; write the export to a folder outside its inputs"
            )
    if out.exists() and not out.is_dir():
        raise SofttoolError(f"-o {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not ExportMeta.is_export(out):
            raise SofttoolError(
                f"-o {out} is a folder that holds files softtool did not write (no {ExportMeta.FILE}); "
                "softtool only replaces an earlier export: choose an empty or new folder"
            )
        if not overwrite:
            raise SofttoolError(f"-o {out} already holds an export; pass --overwrite to replace it")


def _recover(out: Path) -> None:
    """Clean up after an export that was killed: remove its half-built folder, and if it died between the two
    renames of the swap (the old export moved aside, the new one not yet in place) put the old one back."""
    if not out.parent.is_dir():
        return
    for building in out.parent.glob(f".{out.name}.building-*"):
        shutil.rmtree(building, ignore_errors=True)
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        kept = old / "export"
        if not out.exists() and ExportMeta.is_export(kept):
            os.replace(kept, out)
        shutil.rmtree(old, ignore_errors=True)


def _swap_in(tmp: Path, out: Path) -> None:
    """Move the finished export into place; the old one (an export, checked) goes only after the new one is there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "export")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_adapters(
    adapter_dirs: list[str], out_dir: str | os.PathLike, options: ExportOptions | None = None, progress=None
) -> ExportMeta:
    """Export one or more prompts (tasks, in order) of the same base model into `out_dir`; returns the metadata.

    The export is built in a temporary folder beside `out_dir` and moved into place only after it verified;
    a failure raises SofttoolError and leaves `out_dir` as it was.
    """
    options = options or ExportOptions()
    say = progress or (lambda msg: None)
    out = Path(out_dir)
    _recover(out)
    _check_target(out, [Path(d) for d in adapter_dirs], options.overwrite)
    adapters, base = _load_tasks([str(d) for d in adapter_dirs], options.model)
    device = resolve_device(options.device, options.strict_device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    _make_readable(tmp)
    try:
        meta = _build(adapters, [str(d) for d in adapter_dirs], base, tmp, device, options, say)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _build(adapters, adapter_dirs, base, folder: Path, device: str, options: ExportOptions, say) -> ExportMeta:
    import torch
    from safetensors.torch import save

    from softtool import __version__
    from softtool.adapter import check_compatible
    from softtool.export.verify import verify_export
    from softtool.models import load_model, load_tokenizer
    from softtool.runtime.slot_model import SlotLM

    start = time.perf_counter()
    say(f"loading {base}")
    model = load_model(base)
    tokenizer = load_tokenizer(base)
    for adapter in adapters:
        check_compatible(adapter, model)
    facts = _model_facts(model, tokenizer)
    # The genai form always emits full logits (genai samples from them).
    top_k = 0 if options.form == "genai" else resolve_top_k(options.top_k, facts["vocab_size"])
    options = replace(options, top_k=top_k)
    table = torch.cat([a.prompt_table.float() for a in adapters], dim=0)
    if not bool(torch.isfinite(table).all()):
        bad = next(d for d, a in zip(adapter_dirs, adapters, strict=True) if not torch.isfinite(a.prompt_table).all())
        raise SofttoolError(f"{bad}: the prompt table holds NaN or infinite values; retrain it")

    model_path = folder / ExportMeta.MODEL_FILE
    form = resolve_form(options, model, device, tuple(a.meta.task for a in adapters))
    if form == "gqa":
        from softtool.export.gqa import build_gqa_graph

        say("writing the GroupQueryAttention graph")
        proto, inputs, outputs = build_gqa_graph(
            model, table, facts, dtype=options.dtype, top_k=options.top_k, table_as_input=options.prompt_table_input
        )
        _save_onnx(proto, model_path, sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES)
    else:
        wrapper = SlotLM(
            model,
            table,
            facts["vocab_size"],
            table_as_input=options.prompt_table_input,
            top_k=options.top_k,
            # int8 keeps the LM head a plain MatMul for the quantizer; otherwise the tied embedding is stored once.
            head_weight_first=options.dtype != "int8",
        )
        if form == "genai":
            from softtool.export.genai import LastTokenLogits

            wrapper = LastTokenLogits(wrapper)
        say("tracing the graph")
        with traceable_experts(model):
            inputs, outputs = _trace(wrapper, facts, model_path, options, table)
        if _is_large(model_path) and not model_path.with_name(ExportMeta.MODEL_FILE + ".data").exists():
            import onnx

            _save_onnx(onnx.load(str(model_path)), model_path, large=True)
        if options.dtype != "fp32":
            say(f"converting to {options.dtype}")
            _convert(
                model_path,
                options.dtype,
                ["logits", "topk_values", "topk_indices", "prompt_table", "target_logprobs", "target_top_values"],
                options.int8_method,
            )
    atomic_write_bytes(folder / ExportMeta.TABLE_FILE, save({ExportMeta.TABLE_KEY: table.contiguous()}))
    _save_model_files(folder, model, tokenizer)
    meta = ExportMeta(
        base_model=base,
        **facts,
        num_virtual_tokens=adapters[0].meta.num_virtual_tokens,
        tasks=tuple(
            ExportTask(
                name=Path(d).resolve().name,
                task=a.meta.task,
                template=a.meta.template,
                method=a.meta.method,
                task_options=dict(a.meta.task_options),
                decoding=dict(a.meta.decoding),
            )
            for d, a in zip(adapter_dirs, adapters, strict=True)
        ),
        dtype=options.dtype,
        device=device,
        opset=options.opset,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        kv_layout="gqa" if form == "gqa" else "slots",
        prefix_chunks=form == "gqa",
        prompt_table_input=options.prompt_table_input,
        top_k=options.top_k,
        genai=form == "genai",
        # The traced graphs score target ids (serve's echo); the gqa form does not.
        target_top_k=SCORE_TOP_K if TARGET_INPUT in inputs else 0,
        int8_method=options.int8_method if options.dtype == "int8" else None,
        softtool_version=__version__,
    )
    if meta.genai:
        from softtool.export.genai import write_genai_config

        write_genai_config(folder, meta, model.config)
    report: dict[str, Any] = {}
    if options.verify:
        say("verifying against PyTorch")
        report = verify_export(folder, model, table, meta, device=device, steps=options.verify_steps)
        if not report["passed"]:
            raise SofttoolError(f"export verification failed (nothing was written to the output): {report['failure']}")
    meta = replace(meta, verification=report, export_seconds=round(time.perf_counter() - start, 2))
    meta.write(folder)
    return meta
