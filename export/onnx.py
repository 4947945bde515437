"""`softtool export`: trace the prompted model into ONNX, convert it (fp16, int8), verify it, write the folder.

The folder needs nothing else to run:
    model.onnx (+ model.onnx.data when large)   the graph (see softtool.export.graph for its inputs/outputs)
    prompt_table.safetensors                    {"prompt_table": [tasks*N, H]}: every task's prompt, in task order
    tokenizer files                             the base model's tokenizer
    softtool_export.json                        what the runtime needs (written last, after verification passed)
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softtool.errors import SofttoolError

MODEL_FILE = "model.onnx"
TABLE_FILE = "prompt_table.safetensors"
META_FILE = "softtool_export.json"
TABLE_KEY = "prompt_table"
FORMAT_VERSION = 1
OPSET = 17
# Above this many bytes of weights the graph keeps them in model.onnx.data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass
class ExportOptions:
    """How to export a soft prompt (the fields are `softtool export` options)."""

    device: str = field(
        default="cpu",
        metadata={"help": "Device the graph is built and verified for: cpu or cuda.", "choices": ("cpu", "cuda")},
    )
    dtype: str = field(
        default="fp32",
        metadata={
            "help": "Weights: fp32, fp16 (for CUDA) or int8 (8-bit weights, for the CPU).",
            "choices": ("fp32", "fp16", "int8"),
        },
    )
    prompt_table_input: bool = field(
        default=False,
        metadata={"help": "Make the prompt table a graph input instead of a constant, so new tasks need no re-export."},
    )
    top_k: int = field(
        default=0,
        metadata={"help": "Emit the top-k log-probs and ids instead of full logits (0: full logits).", "min": 0},
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
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in ("fp32", "fp16", "int8"):
            raise ValueError(f"dtype must be fp32, fp16 or int8, got {self.dtype!r}")
        if self.dtype == "int8" and self.device == "cuda":
            raise ValueError("int8 is dynamic quantization for the CPU; use fp16 for cuda")
        if self.int8_method not in ("weight-only", "dynamic"):
            raise ValueError(f"int8_method must be weight-only or dynamic, got {self.int8_method!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.verify_steps < 1:
            raise ValueError(f"verify_steps must be >= 1, got {self.verify_steps}")


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


def _trace(wrapper, facts: dict[str, Any], path: Path, table_as_input: bool, top_k: int, table) -> None:
    """Trace the wrapper with the TorchScript exporter (fast, exact on Llama-style eager attention)."""
    import torch

    from softtool.export.graph import io_names

    batch, seq, past_len = 2, 5, 3
    v = facts["vocab_size"]
    input_ids = torch.tensor([[v, v + 1, 5, 6, 7], [8, v, 9, 10, 11]], dtype=torch.long)
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    position_ids = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    beam_idx = torch.arange(batch, dtype=torch.long)
    kv_shape = (batch, facts["num_kv_heads"], past_len, facts["head_dim"])
    past = [torch.zeros(kv_shape) for _ in range(2 * facts["num_layers"])]
    args = (input_ids, attention_mask, position_ids, beam_idx) + ((table,) if table_as_input else ()) + tuple(past)
    inputs, outputs = io_names(facts["num_layers"], table_as_input=table_as_input, top_k=top_k)
    dynamic = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"},
        "beam_idx": {0: "batch"},
        "prompt_table": {0: "table_rows"},
    }
    for name in inputs[4:]:
        if name != "prompt_table":
            dynamic[name] = {0: "past_batch", 2: "past"}
    for name in outputs:
        dynamic[name] = {0: "batch", 2: "total"} if name.startswith("present") else {0: "batch"}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, but it traces this model exactly and in
        # seconds; the tracer's notes on Python bools in transformers' code do not apply with an explicit mask.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={k: d for k, d in dynamic.items() if k in inputs or k in outputs},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )


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


def export_adapters(
    adapter_dirs: list[str], out_dir: str | os.PathLike, options: ExportOptions | None = None, progress=None
) -> dict[str, Any]:
    """Export one or more prompts (tasks, in order) of the same base model into `out_dir`; returns the metadata.

    Verification failures raise SofttoolError after the graph is written but before softtool_export.json is,
    so a folder that failed verification never loads.
    """
    import torch
    from safetensors.torch import save_file

    from softtool import __version__
    from softtool.adapter import atomic_write_json, check_compatible
    from softtool.export.graph import PromptedLM
    from softtool.export.verify import verify_export
    from softtool.models import load_model, load_tokenizer

    options = options or ExportOptions()
    say = progress or (lambda msg: None)
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not options.overwrite:
            raise SofttoolError(f"output folder {out} is not empty; pass --overwrite or choose another -o")
        shutil.rmtree(out)
    adapters, base = _load_tasks([str(d) for d in adapter_dirs], options.model)
    device = resolve_device(options.device, options.strict_device)

    say(f"loading {base}")
    model = load_model(base)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # explicit additive mask; the graph must not depend on sdpa paths
    tokenizer = load_tokenizer(base)
    for adapter in adapters:
        check_compatible(adapter, model)
    facts = _model_facts(model, tokenizer)
    table = torch.cat([a.prompt_table.float() for a in adapters], dim=0)
    n = adapters[0].meta.num_virtual_tokens

    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    wrapper = PromptedLM(
        model, table, facts["vocab_size"], table_as_input=options.prompt_table_input, top_k=options.top_k
    )
    say("tracing the graph")
    _trace(wrapper, facts, model_path, options.prompt_table_input, options.top_k, table)
    if _is_large(model_path) and not model_path.with_name(MODEL_FILE + ".data").exists():
        import onnx

        _save_onnx(onnx.load(str(model_path)), model_path, large=True)
    if options.dtype != "fp32":
        say(f"converting to {options.dtype}")
        _convert(
            model_path, options.dtype, ["logits", "topk_values", "topk_indices", "prompt_table"], options.int8_method
        )
    save_file({TABLE_KEY: table.contiguous()}, str(out / TABLE_FILE))
    tokenizer.save_pretrained(out)
    export_seconds = time.perf_counter() - start

    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "softtool_version": __version__,
        "base_model": base,
        **facts,
        "num_virtual_tokens": n,
        "num_tasks": len(adapters),
        "tasks": [
            {
                "name": Path(d).name,
                "task": a.meta.task,
                "template": a.meta.template,
                "method": a.meta.method,
                "task_options": a.meta.task_options,
            }
            for d, a in zip(adapter_dirs, adapters, strict=True)
        ],
        "template": adapters[0].meta.template,
        "task": adapters[0].meta.task,
        "task_options": adapters[0].meta.task_options,
        "dtype": options.dtype,
        "int8_method": options.int8_method if options.dtype == "int8" else None,
        "device": device,
        "opset": OPSET,
        "prompt_table_input": options.prompt_table_input,
        "top_k": options.top_k,
        "export_seconds": round(export_seconds, 2),
    }
    if options.verify:
        say("verifying against PyTorch")
        report = verify_export(out, model, table, meta, device=device, steps=options.verify_steps)
        meta["verification"] = report
        if not report["passed"]:
            raise SofttoolError(f"export verification failed for {out}: {report['failure']}")
    atomic_write_json(out / META_FILE, meta)
    return meta


def resolve_device(device: str, strict: bool) -> str:
    """'cuda' when asked for and ONNX Runtime has the CUDA provider; else 'cpu' (a warning) or an error if strict."""
    if device == "cpu":
        return "cpu"
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return "cuda"
    message = (
        "CUDA was requested but ONNX Runtime has no CUDA provider here "
        "(install softtool[gpu] on a machine with an NVIDIA GPU)"
    )
    if strict:
        raise SofttoolError(f"--device cuda: {message}; drop --strict-device to fall back to the CPU")
    warnings.warn(f"{message}; falling back to the CPU", RuntimeWarning, stacklevel=3)
    return "cpu"


def read_export_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an export folder, refusing folders with missing files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SofttoolError(f"export folder not found: {folder}")
    for name in (META_FILE, MODEL_FILE, TABLE_FILE):
        if not (folder / name).is_file():
            hint = " (did its export fail verification?)" if name == META_FILE else ""
            raise SofttoolError(f"{folder} is not a complete export: {name} is missing{hint}; re-run softtool export")
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SofttoolError(f"{folder / META_FILE} is not valid JSON ({exc}); re-run softtool export") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise SofttoolError(
            f"{folder / META_FILE} has format {meta.get('format')}; this softtool reads "
            f"{FORMAT_VERSION}; re-run softtool export"
        )
    return meta
