"""`softtool bench` end to end: build the workload once, run each backend (each in a fresh process by
default), then compare outputs, score them, and relate the speeds to PEFT, plain transformers and the
machine's limits. Task classify ranks labels instead (run_rank_bench; softtool.bench.rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from softtool.bench.limits import best_of, machine_info, measure_limits, model_costs
from softtool.bench.measure import row_steps_per_s, run_backend, set_threads, workload_to_json
from softtool.bench.options import BenchOptions
from softtool.bench.rank import PEER, build_rank_workload, compare_with_peer
from softtool.bench.rank_backends import run_rank_backend
from softtool.bench.workload import Workload, build_workload, get_task, main_metric, score


def _run_isolated(
    name: str, options: BenchOptions, workload: dict[str, Any], worker: str = "softtool.bench.measure"
) -> dict[str, Any]:
    """Run one backend in a fresh process: `python -m WORKER SPEC RESULT` on the workload (as JSON)."""
    with tempfile.TemporaryDirectory(prefix="softtool-bench-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"backend": name, "options": options.to_dict(), "workload": workload}))
        env = {**os.environ, "OMP_NUM_THREADS": str(options.threads), "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(
            [sys.executable, "-m", worker, str(spec), str(out)],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0 or not out.is_file():
            lines = (proc.stderr or proc.stdout or "no output").strip().splitlines()
            return {"name": name, "status": "failed", "reason": lines[-1] if lines else f"exit {proc.returncode}"}
        return json.loads(out.read_text())


def identical_share(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Share of the examples both ran (peft runs only the first few) whose outputs are identical."""
    common = min(len(outputs), len(reference))
    return sum(a == b for a, b in zip(outputs[:common], reference[:common], strict=True)) / common


class _Prepared(NamedTuple):
    """What a bench run knows before its backends run."""

    started: str
    tokenizer: Any
    workload: Any  # a Workload, or a RankWorkload for task classify
    costs: Any  # model_costs, for measure_limits
    probe: dict[str, Any]  # measure_limits' device and dtype
    limits: dict[str, Any]


def _prepare(options: BenchOptions, build) -> _Prepared:
    """Threads, the start time, the workload `build(options, model, tokenizer)` makes and the machine's limits. The
    model is dropped after: the workers load their own, and this process stays small beside them."""
    import torch

    from softtool.models import load_model, load_tokenizer

    set_threads(options.threads)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tokenizer = load_tokenizer(options.model)
    model = load_model(options.model)
    workload = build(options, model, tokenizer)
    costs = model_costs(model, bytes_per_param=getattr(torch, options.dtype).itemsize)
    probe = dict(device=options.device, dtype=options.dtype)
    limits = measure_limits(options.threads, costs, **probe) if options.limits else {}
    return _Prepared(started, tokenizer, workload, costs, probe, limits)


def run_bench(options: BenchOptions, command: str = "", progress=None) -> dict[str, Any]:
    """Run every requested backend on one workload; returns the result that `report.write_json` saves."""
    if options.task == "classify":
        return run_rank_bench(options, command, progress)

    started, tokenizer, workload, costs, probe, limits = _prepare(options, build_workload)

    results = []
    options = _with_exports(options, workload.adapter_dir, results, progress)
    for name in options.backends:
        if any(r["name"] == name for r in results):
            continue  # its export failed; already reported as skipped
        if progress:
            progress(f"running backend {name}")
        if options.isolate:
            results.append(_run_isolated(name, options, workload_to_json(workload)))
        else:
            results.append(run_backend(name, options, workload, isolated=False))

    if options.limits:
        # A second reading after the backends: on a shared machine either one may have been disturbed.
        limits = best_of(limits, measure_limits(options.threads, costs, **probe))

    task = get_task(options.task, _adapter_task_options(workload))
    metric = main_metric(options, task)
    results.sort(key=lambda r: options.backends.index(r["name"]))
    by_name = {r["name"]: r for r in results if r["status"] == "ok"}
    reference = "torch" if "torch" in by_name else ("peft" if "peft" in by_name else None)
    option_values = options.to_dict()
    hf_steps = row_steps_per_s(by_name["hf"], option_values) if "hf" in by_name else None
    for r in results:
        if r["status"] != "ok":
            continue
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in r["outputs"]]
        if task is not None and hasattr(task, "postprocess"):
            texts = [task.postprocess(t) for t in texts]
        r["predictions"] = texts
        r["metrics"] = score(options, task, texts, workload.references[: len(texts)])
        r["metric"] = r["metrics"].get(metric) if metric else None
        # hf and hf-cb run the plain model (no prompt): hf-cb is checked against hf, hf against nothing;
        # hf-embeds and hf-static run the prompt, checked against softtool's reference like softtool's rows.
        same_as = "hf" if r["name"] == "hf-cb" else (None if r["name"] == "hf" else reference)
        if same_as in by_name:
            r["identical_to"] = same_as
            r["identical_share"] = identical_share(r["outputs"], by_name[same_as]["outputs"])
        for base in ("peft", "hf", "hf-cb", "hf-embeds", "hf-static"):
            key = f"speedup_vs_{base.replace('-', '_')}"
            r[key] = r["tokens_per_s"] / by_name[base]["tokens_per_s"] if base in by_name else None
        r["row_steps_per_s"] = row_steps_per_s(r, option_values)
        r["row_steps_speedup_vs_hf"] = r["row_steps_per_s"] / hf_steps if r["row_steps_per_s"] and hf_steps else None
        _roofline(r, options, limits, len(workload.rows))
    return {
        "kind": "generate",
        "started": started,
        "command": command,
        "machine": machine_info(options.threads),
        "options": options.to_dict(),
        "workload": {
            "examples": len(workload.rows),
            "data_source": workload.data_source,
            "template": workload.template,
            "num_virtual_tokens": workload.num_virtual_tokens,
            "adapter": str(workload.adapter_dir),
            "untrained_prompt": workload.untrained,
            "decoding": workload.decoding,
            "mean_input_tokens": sum(map(len, workload.rows)) / len(workload.rows),
        },
        "notes": workload.notes,
        "limits": limits,
        "main_metric": metric,
        "backends": results,
    }


def run_rank_bench(options: BenchOptions, command: str = "", progress=None) -> dict[str, Any]:
    """run_bench for task classify: every requested backend ranks one workload (softtool.bench.rank)."""
    started, _, workload, costs, probe, limits = _prepare(options, build_rank_workload)

    results: list[dict[str, Any]] = []
    options = _with_exports(options, workload.adapter_dir, results, progress)
    for name in options.backends:
        if any(r["name"] == name for r in results):
            continue  # its export failed; already reported as skipped
        if progress:
            progress(f"running backend {name}")
        if options.isolate:
            results.append(_run_isolated(name, options, workload.to_json(), "softtool.bench.rank_backends"))
        else:
            results.append(run_rank_backend(name, options, workload, isolated=False))
    if options.limits:
        limits = best_of(limits, measure_limits(options.threads, costs, **probe))

    task = get_task("classify", workload.task_options)
    results.sort(key=lambda r: options.backends.index(r["name"]))
    compare_with_peer(results, workload, task, options)
    return {
        "kind": "rank",
        "started": started,
        "command": command,
        "machine": machine_info(options.threads),
        "options": options.to_dict(),
        "workload": {
            "examples": len(workload.rows),
            "data_source": workload.data_source,
            "split": options.split,
            "template": workload.template,
            "num_virtual_tokens": workload.num_virtual_tokens,
            "adapter": str(workload.adapter_dir),
            "labels": workload.labels,
            "label_tokens": workload.choices,
            "scored": "label + EOS",
            "batches": len(workload.batches),
            "mean_input_tokens": sum(map(len, workload.rows)) / len(workload.rows),
            "truncated": workload.truncated,
            "model_tokens": {
                PEER: workload.model_tokens(shared_prompt=False),
                "softtool": workload.model_tokens(shared_prompt=True),
            },
        },
        "notes": workload.notes,
        "limits": limits,
        "main_metric": "accuracy",
        "peer": PEER,
        "backends": results,
    }


def _with_exports(options: BenchOptions, adapter_dir: Path, results: list, progress) -> BenchOptions:
    """Export the graphs the ONNX backends need here, so an export's memory never counts in a backend's peak."""
    from dataclasses import replace

    from softtool.bench.backends import BackendUnavailable, export_on_the_fly

    changes = {}
    for name, field_name, dtype in (("onnx", "onnx_dir", "fp32"), ("onnx-int8", "onnx_int8_dir", "int8")):
        if name not in options.backends or getattr(options, field_name):
            continue
        if progress:
            progress(f"exporting the {dtype} graph for {name}")
        try:
            changes[field_name] = str(export_on_the_fly(options, adapter_dir, dtype))
        except BackendUnavailable as exc:
            results.append({"name": name, "status": "skipped", "reason": str(exc)})
    return replace(options, **changes)


def _adapter_task_options(workload: Workload) -> dict[str, Any]:
    from softtool.adapter import load_adapter

    return load_adapter(workload.adapter_dir).meta.task_options


def _roofline(r: dict[str, Any], options: BenchOptions, limits: dict[str, Any], rows: int) -> None:
    """Shares of the machine's bounds: batch-1 decoding vs bandwidth, prefill vs matmul FLOP/s."""
    if not limits or "weight_bytes" not in limits:
        return
    # Decoding time is the timed time less the prefills (measured separately as ttft per batch).
    rows = r.get("examples", rows)
    batches = -(-rows // options.batch_size)
    decode_s = r["timed_s"] / options.repeats - r["ttft_s"] * batches
    decode_tokens = r["generated_tokens"] - rows
    if decode_s > 0 and decode_tokens > 0:
        r["decode_tokens_per_s"] = decode_tokens / decode_s
        if options.batch_size == 1 and options.num_beams == 1:
            r["share_of_bandwidth_bound"] = r["decode_tokens_per_s"] / limits["decode_bound_tokens_per_s_batch1"]
    r["share_of_compute_bound_prefill"] = r["prefill_tokens_per_s"] / limits["prefill_bound_tokens_per_s"]
