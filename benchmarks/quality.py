"""Quality table: the discrete instruction prompt vs prompt tuning vs P-tuning on SmolLM2-135M, per task.

For each task it trains a prompt-tuning and a P-tuning prompt on the task's train split (a short
budget: the machine is shared), evaluates both on the first --eval-limit dev examples with greedy
decoding, evaluates the instruction prompt and the bare input on the same examples, and writes
benchmarks/results/quality_<task>.json with the commit, the machine, the command and the budget.

    python benchmarks/quality.py --task translation --steps 150
    python benchmarks/quality.py --task squad --task cnndm --steps 100 --eval-limit 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from softtool.bench.limits import cpu_model, git_commit

ROOT = Path(__file__).resolve().parents[1]
COMMIT, MACHINE = "", {}
DATA_FOLDERS = {"squad": "squad", "squad-qg": "squad", "cnndm": "cnn_dailymail", "translation": "multi30k"}
# Templates: prompt tuning puts every virtual token first; P-tuning also splits them around the input.
PTUNING_TEMPLATES = {
    "squad": "[P:12]Context: {context}\nQuestion: {question}[P:8]\nAnswer:",
    "squad-qg": "[P:12]Context: {context}\nAnswer: {answer}[P:8]\nQuestion:",
    "cnndm": "[P:12]Article: {article}[P:8]\nSummary:",
    "translation": "[P:12]English: {source}[P:8]\nGerman:",
}


def machine() -> dict:
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }


def commit() -> str:
    return git_commit(ROOT) or "unknown"


def run_task(task: str, args, output: Path) -> dict:
    from softtool.evaluate import EvalOptions, run_eval
    from softtool.prompts.encoder import PromptConfig
    from softtool.training import DataOptions, TrainOptions, train_prompt

    data = Path(args.data) / DATA_FOLDERS[task]
    runs = Path(args.runs) / task
    task_options = {"src": "en", "tgt": "de"} if task == "translation" else {}
    budget = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lr": args.lr,
        "num_virtual_tokens": 20,
        "eval_limit": args.eval_limit,
        "train_limit": args.train_limit,
        "decoding": "greedy",
        "model": args.model,
    }
    result: dict = {"task": task, "data": str(data), "budget": budget, "methods": {}}
    eval_options = EvalOptions(limit=args.eval_limit, batch_size=args.eval_batch_size, max_length=args.eval_max_length)
    for method in args.methods:
        prompt = PromptConfig(
            method=method,
            num_virtual_tokens=20,
            encoder="lstm",
            template=PTUNING_TEMPLATES[task] if method == "ptuning" else None,
        )
        options = TrainOptions(
            max_steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr if method == "prompt" else args.ptuning_lr,
            warmup_steps=max(1, args.steps // 10),
            eval_every=args.eval_every,
            eval_limit=32,
            checkpoint_every=0,
            max_length=args.max_length,
            seed=0,
        )
        start = time.perf_counter()
        summary = train_prompt(
            DataOptions(task=task, data=str(data), train_limit=args.train_limit, task_options=task_options),
            prompt,
            options,
            runs / method,
            model_name=args.model,
            overwrite=True,
        )
        train_seconds = time.perf_counter() - start
        if summary.result.interrupted:
            sys.exit(130)  # stopped by the user: no partial result is written as if it were complete
        baseline = args.baseline and method == args.methods[0]
        scores = run_eval(
            runs / method, data, runs / method / "eval", EvalOptions(**{**eval_options.__dict__, "baseline": baseline})
        )
        result["methods"][method] = {
            "metrics": scores["soft_prompt"]["metrics"],
            "template": scores["soft_prompt"]["template"],
            "lr": options.lr,
            "train_seconds": round(train_seconds, 1),
            "best_dev_loss": summary.result.state.best_metrics.get("dev_loss"),
            "best_step": summary.result.state.best_step,
            "eval_seconds": scores["soft_prompt"]["seconds"],
            "n": scores["soft_prompt"]["n"],
        }
        for kind in ("baseline", "zero_shot"):
            if kind in scores:
                result["methods"][kind] = {
                    "metrics": scores[kind]["metrics"],
                    "template": scores[kind]["template"],
                    "n": scores[kind]["n"],
                }
        write(output, result, args)  # after each method, so a stopped run keeps what it finished
    return result


def write(output: Path, result: dict, args) -> None:
    record = {"commit": COMMIT, "machine": MACHINE, "command": " ".join([sys.executable, *sys.argv]), **result}
    path = output / f"quality_{result['task']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", action="append", choices=sorted(DATA_FOLDERS), help="task(s); default all three")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="prompt,ptuning", type=lambda s: s.split(","))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.03, help="prompt tuning learning rate")
    parser.add_argument("--ptuning-lr", type=float, default=1e-3, help="P-tuning (encoder) learning rate")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--eval-max-length", type=int, default=512)
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "quality"), help="where adapters and predictions go")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1)) if not torch.cuda.is_available() else None
    global COMMIT, MACHINE
    COMMIT, MACHINE = commit(), machine()  # at the start: the code that produced the numbers
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for task in args.task or ["squad", "cnndm", "translation"]:
        run_task(task, args, output)


if __name__ == "__main__":
    main()
