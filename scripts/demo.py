"""`make demo`: softtool's whole path on the default model, one line per step, then a summary.

    python scripts/demo.py --data ../shared/data --out runs/demo [--steps 100]

train a translation prompt (the default prompt length) -> eval it next to the instruction prompt and the zero-shot
input -> export it to ONNX (self-verified) -> eval the export with ONNX Runtime -> generate two sentences -> a short
bench against transformers running the same prompt (hf-embeds) -> one request through `softtool serve`. Each step
runs the `softtool` command a user would type (printed), with its own output in OUT/logs/STEP.log. It stops at the
first failing step, naming its log. What it prints is also written to --transcript (by default
benchmarks/results/demo_run.log, which the README's excerpt is rendered from: `make docs`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SENTENCES = ["A little girl climbs into a wooden playhouse.", "Two men are playing chess in the park."]


class Transcript:
    """stdout, also written line by line to a file (the committed transcript), with the commit it ran on first."""

    def __init__(self, path: Path | None, stream=sys.stdout):
        self.stream, self.file = stream, None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "w")  # noqa: SIM115 - closed by close()

    def write(self, text: str) -> int:
        self.stream.write(text)
        if self.file is not None:
            self.file.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Demo:
    def __init__(self, out: Path):
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.softtool = [sys.executable, "-m", "softtool"]

    def run(self, step: str, what: str, *args: str) -> str:
        """Run `softtool ARGS` with its output in logs/STEP.log; print one line; return its stdout."""
        cmd = [*self.softtool, *args]
        log = self.logs / f"{step}.log"
        shown = "softtool " + " ".join(shlex.quote(a) for a in args)
        print(f"[{self.elapsed()}] {what}\n          $ {shown}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True)
            fh.write(proc.stdout)
        if proc.returncode != 0:
            sys.exit(f"demo: step '{step}' failed (exit {proc.returncode}); see {log}")
        print(f"          done in {time.perf_counter() - t0:.0f} s (log: {log})", flush=True)
        return proc.stdout

    def elapsed(self) -> str:
        s = int(time.perf_counter() - self.start)
        return f"{s // 60:2d}:{s % 60:02d}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_one_request(demo: Demo, adapter: Path) -> str:
    port = _free_port()
    log = demo.logs / "serve.log"
    cmd = [*demo.softtool, "serve", f"de={adapter}", "--port", str(port), "--slots", "4"]
    print(f"[{demo.elapsed()}] serving the prompt over HTTP (OpenAI's completions API) and sending one request")
    print(f"          $ softtool serve de={adapter} --port {port} --slots 4")
    with open(log, "w") as fh:
        server = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        try:
            body = json.dumps({"model": "de", "prompt": SENTENCES[0], "max_tokens": 32}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
            )
            for _ in range(240):  # the model loads before the server binds
                if server.poll() is not None:
                    sys.exit(f"demo: the server exited early; see {log}")
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        answer = json.loads(response.read())
                    break
                except OSError:
                    time.sleep(0.5)
            else:
                sys.exit(f"demo: the server did not answer; see {log}")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    text = answer["choices"][0]["text"].strip()
    print(f"          POST /v1/completions {{'model': 'de', 'prompt': {SENTENCES[0]!r}}} -> {text!r}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data", help="the folder holding multi30k/")
    parser.add_argument("--out", default="runs/demo", help="where everything goes")
    parser.add_argument("--steps", type=int, default=100, help="training steps")
    parser.add_argument("--eval-limit", type=int, default=40, help="validation sentences scored")
    parser.add_argument(
        "--transcript",
        default="benchmarks/results/demo_run.log",
        help="also write what the demo prints here ('' for nowhere); make docs renders the README's excerpt from it",
    )
    args = parser.parse_args()
    transcript = Transcript(Path(args.transcript) if args.transcript else None)
    sys.stdout = transcript
    try:
        run_demo(args)
    finally:
        sys.stdout = transcript.stream
        transcript.close()


def run_demo(args) -> None:
    from softtool.bench.limits import cpu_model, git_commit

    print(f"softtool demo at commit {git_commit() or 'unknown'} on {cpu_model()}, {os.cpu_count()} cores")
    data = Path(args.data) / "multi30k"
    if not data.is_dir():
        sys.exit(f"demo: {data} not found; pass --data (the folder holding multi30k/)")
    out = Path(args.out)
    demo = Demo(out)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    adapter, export = out / "adapter", out / "onnx"

    demo.run(
        "train", f"training a soft prompt for English->German (the default 20 virtual tokens, {args.steps} steps)",
        "train", "--task", "translation", "--data", str(data),
        "--max-steps", str(args.steps), "--eval-every", "50", "--output", str(adapter), "--overwrite", "--quiet",
    )  # fmt: skip
    demo.run(
        "eval", f"scoring it on {args.eval_limit} validation sentences, next to the instruction prompt and zero-shot",
        "eval", str(adapter), "--data", str(data), "--limit", str(args.eval_limit), "--baseline",
        "--batch-size", "16", "--output", str(out / "eval"), "--quiet",
    )  # fmt: skip
    demo.run(
        "export", "exporting it to ONNX (checked against PyTorch before it is written)",
        "export", str(adapter), "-o", str(export), "--overwrite",
    )  # fmt: skip
    demo.run(
        "eval-onnx", "scoring the export with ONNX Runtime and the C++ search",
        "eval", str(export), "--data", str(data), "--limit", str(args.eval_limit),
        "--batch-size", "16", "--output", str(out / "eval-onnx"), "--quiet",
    )  # fmt: skip
    generated = demo.run("generate", "translating two sentences with the export", "generate", str(export), *SENTENCES)
    for src, tgt in zip(SENTENCES, generated.strip().splitlines(), strict=False):
        print(f"          {src} -> {tgt}")
    demo.run(
        "bench", "measuring speed against transformers running the same prompt (hf-embeds; 32 sentences, 16 slots)",
        "bench", "--config", "benchmarks/configs/translation.json", "--adapter", str(adapter), "--data", str(data), "--limit", "32",
        "--backends", "hf-embeds,torch,onnx", "--no-limits", "--onnx-dir", str(export), "--output", str(out / "bench.json"),
    )  # fmt: skip
    served = _serve_one_request(demo, adapter)

    scores = {k: json.loads((out / "eval" / p / "metrics.json").read_text())["metrics"] for k, p in
              (("soft prompt", "."), ("instruction prompt", "baseline"), ("zero-shot", "zero_shot"))}  # fmt: skip
    onnx_bleu = json.loads((out / "eval-onnx" / "metrics.json").read_text())["metrics"]["bleu"]
    bench = {b["name"]: b for b in json.loads((out / "bench.json").read_text())["backends"]}
    print(f"\n[{demo.elapsed()}] summary")
    for name, m in scores.items():
        print(f"  {name:19s} BLEU {m['bleu']:5.2f}  chrF {m['chrf']:5.1f}")
    print(f"  soft prompt (ONNX)  BLEU {onnx_bleu:5.2f}  (PyTorch: {scores['soft prompt']['bleu']:.2f})")
    for name in ("torch", "onnx"):
        if bench.get(name, {}).get("status") == "ok":
            b = bench[name]
            ratio = b.get("speedup_vs_hf_embeds")
            versus = f"{ratio:.2f}x transformers on the same prompt (hf-embeds)" if ratio else "hf-embeds did not run"
            print(f"  {name:19s} {b['tokens_per_s']:6.1f} tokens/s, {versus}")
    print(f"  served              {served!r}")
    print("  open:")
    for path in ("adapter/loss.png", "bench.png", "eval/predictions.jsonl", "eval/metrics.json", "logs/"):
        print(f"    {out / path}")
    if scores["soft prompt"]["bleu"] <= scores["instruction prompt"]["bleu"]:
        sys.exit("demo: the soft prompt did not beat the instruction prompt this time")


if __name__ == "__main__":
    main()
