"""Quality benchmark: a learning-rate grid per method, chosen on dev, scored once on held-out examples
next to the discrete prompts of the same model.

For one task and one model:
  1. grid    trains each method at each learning rate of its grid for the same step budget (every run
             generates on the first --curve-limit dev examples every --eval-every steps: the curves);
  2. select  scores every run on the first --select-limit dev examples; the best main metric per method wins;
  3. decode  scores the overall winner on the same examples under four decodings (no-repeat-ngram size,
             repetition penalty); among those within --decode-margin of the best score, the one with the
             fewest loops (then the plainer) is kept: the task's decoding defaults are chosen from this;
  4. test    scores each method's winner, under the chosen decoding, on held-out examples (--test-split, or
             the dev examples after the selection ones), beside the instruction prompt, the bare input, the
             instruction through the model's chat template (instruct models) and a k-shot prompt (--shots).
Every stage keeps its outputs under --runs, so a stopped run resumes where it stopped. Writes
benchmarks/results/quality_<task>_<model>.json (commit, library versions, machine, command, budget, every score)
and a plot of the dev metric against steps per method and learning rate (quality_<task>_<model>.png). From a tree
with uncommitted changes it writes there only with --allow-dirty, and then stores the diff beside the JSON
(quality_<task>_<model>.diff; benchmarks/provenance.py).

    python benchmarks/quality.py --task squad --grid prompt=0.03,0.1,0.3 --grid ptuning=3e-4,1e-3,3e-3
    python benchmarks/quality.py --task translation --model gemma3-270m --grid prompt=0.03,0.1,0.3 --shots 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import provenance
from softtool.bench.limits import cpu_model

ROOT = Path(__file__).resolve().parents[1]
DATA_FOLDERS = {"squad": "squad", "squad-qg": "squad", "cnndm": "cnn_dailymail", "translation": "multi30k"}
# Prompt tuning puts every virtual token first; P-tuning also splits them around the input.
PTUNING_TEMPLATES = {
    "squad": "[P:12]Context: {context}\nQuestion: {question}[P:8]\nAnswer:",
    "squad-qg": "[P:12]Context: {context}\nAnswer: {answer}[P:8]\nQuestion:",
    "cnndm": "[P:12]Article: {article}[P:8]\nSummary:",
    "translation": "[P:12]English: {source}[P:8]\nGerman:",
}
# softtool's two methods, and PEFT's own P-tuning (its PromptEncoder, LSTM, all tokens before the input) as a
# reference trained at the same budget and scored by the same eval.
METHODS = ("prompt", "ptuning", "peft-ptuning")
METHOD_NAMES = {"prompt": "prompt tuning", "ptuning": "P-tuning", "peft-ptuning": "PEFT P-tuning"}
# Decoding settings tried on dev: (no_repeat_ngram_size, repetition_penalty).
DECODE_GRID = ((0, 1.0), (3, 1.0), (0, 1.2), (4, 1.1))


def machine() -> dict:
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }


def parse_grid(values: list[str]) -> dict[str, list[float]]:
    grid: dict[str, list[float]] = {}
    for value in values:
        method, _, rates = value.partition("=")
        if method not in METHODS or not rates:
            raise SystemExit(f"error: --grid {value!r}: write METHOD=LR,LR,... with METHOD one of {', '.join(METHODS)}")
        grid[method] = [float(r) for r in rates.split(",")]
    return grid


def peft_train_loop(peft_model, batch_at, steps: int, lr: float, warmup: int, schedule_steps: int,
                    schedule: str = "linear") -> list[float]:  # fmt: skip
    """Train a PEFT model's prompt parameters for `steps` AdamW steps on `batch_at(step)` (a softtool Batch without
    the virtual tokens, which PEFT prepends itself): the rate warms up over `warmup` steps, then follows softtool's
    `schedule` (transformers' scheduler) as if the run were `schedule_steps` long; gradients clipped at 1, as
    softtool's own loop clips them. Returns each step's loss."""
    import torch
    from transformers import get_scheduler

    from softtool.training.options import SCHEDULES

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scheduler = get_scheduler(SCHEDULES[schedule], optimizer, warmup, schedule_steps)
    losses = []
    for step in range(steps):
        batch = batch_at(step)
        loss = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(round(loss.item(), 4))
    return losses


def train_run(
    args,
    task,
    data: Path,
    out: Path,
    prompt,
    lr: float,
    *,
    seed: int = 0,
    steps: int | None = None,
    schedule: str = "linear",
    eval_generate: bool = True,
    eval_limit: int | None = None,
    max_length: int | None = None,
    resume: bool = False,
) -> dict:
    """One softtool training run at the benchmark's budget (args: steps, batch size, max length, eval cadence):
    warmup over a tenth of args.steps, the curve generated on the first --curve-limit dev examples (or, with
    eval_generate off, the dev loss alone on the first `eval_limit`). Returns its wall time, the time its
    optimizer steps took and the steps done; exits 130 when stopped by the user."""
    from softtool.data.options import DataOptions
    from softtool.training import TrainOptions, train_prompt

    options = TrainOptions(
        max_steps=steps or args.steps,
        batch_size=args.batch_size,
        lr=lr,
        warmup_steps=max(1, args.steps // 10),
        schedule=schedule,
        eval_every=args.eval_every,
        eval_limit=eval_limit or args.curve_limit,
        eval_generate=eval_generate,
        checkpoint_every=0,
        max_length=max_length or args.max_length,
        seed=seed,
    )
    data_options = DataOptions(task=args.task, data=str(data), task_options=task.options,
                               train_limit=getattr(args, "train_limit", None))  # fmt: skip
    start = time.perf_counter()
    summary = train_prompt(data_options, prompt, options, out, model_name=args.model, overwrite=not resume,
                           resume=resume, progress=not args.quiet)  # fmt: skip
    if summary.result.interrupted:
        sys.exit(130)  # stopped by the user: no partial result is written as if it were complete
    state = summary.result.state
    return {"seconds": round(time.perf_counter() - start, 1), "step_seconds": round(state.seconds, 1),
            "steps": state.step}  # fmt: skip


class Quality:
    """The four stages for one (task, model); results accumulate in self.result and are written after each step.
    `tree` is the code the run started from (provenance.check_tree)."""

    def __init__(self, args, tree: provenance.Tree):
        from softtool.data import get_task

        self.args = args
        self.tree = tree
        self.task = get_task(args.task, **({"src": "en", "tgt": "de"} if args.task == "translation" else {}))
        self.data = Path(args.data) / DATA_FOLDERS[args.task]
        tag = Path(args.model).name  # a named model, or a model folder's name
        self.runs = Path(args.runs) / tag / args.task
        self.output = Path(args.output) / f"quality_{args.task}_{tag}.json"
        self.grid = parse_grid(args.grid)
        self.result: dict = {
            **provenance.stamp(self.output, tree, *(["peft"] if "peft-ptuning" in self.grid else [])),
            "machine": machine(),
            "command": args.command,
            "task": args.task,
            "model": args.model,
            "main_metric": self.task.main_metric,
            "budget": {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "num_virtual_tokens": 20,
                "init": "vocab",
                "eval_every": args.eval_every,
                "curve_limit": args.curve_limit,
                "select_limit": args.select_limit,
                "test": self.test_where(),
                "decoding": "greedy",
            },
            "grid": {},
            "selected": {},
            "decode": [],
            "test": {},
        }

    # -- bookkeeping ----------------------------------------------------------------------------------
    def write(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        provenance.write_diff(self.output, self.tree)
        self.output.write_text(json.dumps(self.result, indent=2) + "\n")
        print(f"wrote {self.output}", file=sys.stderr)

    def test_where(self) -> dict:
        if self.args.test_split:
            return {"split": self.args.test_split, "offset": 0, "limit": self.args.test_limit}
        return {"split": "dev", "offset": self.args.select_limit, "limit": self.args.test_limit}

    def evaluate(self, path: Path, folder: Path, *, offset: int, limit: int, split=None, **kw) -> dict:
        """run_eval's records, reused from `folder` when it already holds this evaluation."""
        from softtool.evaluate import EvalOptions, run_eval

        run_kw = {}
        if path.name.startswith("peft-"):  # a PEFT folder records neither the task nor the template
            run_kw = {"task_name": self.args.task, "task_options": self.task.options, "model_name": self.args.model,
                      "template": str(self.task.default_template(20))}  # fmt: skip
        cached = folder / "quality_eval.json"
        if cached.exists():
            return json.loads(cached.read_text())
        options = EvalOptions(
            split=split,
            offset=offset,
            limit=limit,
            batch_size=self.args.eval_batch_size,
            max_length=self.args.eval_max_length,
            **kw,
        )
        records = run_eval(path, self.data, folder, options, progress=not self.args.quiet, **run_kw)
        cached.write_text(json.dumps(records, indent=2) + "\n")
        return records

    # -- 1. grid ----------------------------------------------------------------------------------------
    def train(self, method: str, lr: float) -> Path:
        from softtool.prompts.encoder import PromptConfig

        out = self.runs / f"{method}-lr{lr:g}"
        if (out / "softtool.json").exists():
            return out
        prompt = PromptConfig(
            method=method,
            num_virtual_tokens=20,
            template=PTUNING_TEMPLATES[self.args.task] if method == "ptuning" else None,
        )
        done = train_run(self.args, self.task, self.data, out, prompt, lr)
        (out / "quality_train.json").write_text(json.dumps({"seconds": done["seconds"]}))
        return out

    def train_peft_ptuning(
        self, lr: float, steps: int | None = None, schedule: str = "linear", out: Path | None = None
    ) -> Path:
        """PEFT's P-tuning (PromptEncoder with its LSTM reparameterization, 20 tokens before the input) with the
        same steps, batch size, learning-rate schedule and length budget; saved by PEFT, read by softtool's eval.
        Its last prompt is kept (no dev evaluation)."""
        import torch
        from peft import PromptEncoderConfig, TaskType, get_peft_model

        from softtool.data import encode_example, load_split
        from softtool.models import load_model, load_tokenizer
        from softtool.training.batching import collate, make_feature

        out = out or self.runs / f"peft-ptuning-lr{lr:g}"
        steps = steps or self.args.steps
        if (out / "quality_train.json").exists():
            return out
        start = time.perf_counter()
        model, tokenizer = load_model(self.args.model), load_tokenizer(self.args.model)
        vocab, hidden = model.get_input_embeddings().weight.shape
        template = self.task.default_template(20)
        examples = load_split(
            self.data, "train", task=self.task, limit=getattr(self.args, "train_limit", None)
        ).examples
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
        config = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20, encoder_hidden_size=hidden,
                                     encoder_reparameterization_type="LSTM")  # fmt: skip
        torch.manual_seed(0)
        peft_model = get_peft_model(model, config)
        bs = self.args.batch_size

        def batch_at(step: int):
            feats = []
            for i in range(bs):
                ex = examples[order[(step * bs + i) % len(order)]]
                enc = encode_example(tokenizer, template, self.task, ex, max_length=self.args.max_length)
                feats.append(make_feature(template, enc.pieces, enc.target_ids, vocab))
            return collate(feats, tokenizer.pad_token_id, prefix_tokens=20)  # PEFT prepends the prompt itself

        losses = peft_train_loop(peft_model, batch_at, steps, lr, max(1, self.args.steps // 10), steps, schedule)
        peft_model.save_pretrained(str(out))
        seconds = round(time.perf_counter() - start, 1)
        (out / "quality_train.json").write_text(json.dumps({"seconds": seconds, "steps": steps, "losses": losses}))
        return out

    def curve(self, out: Path) -> list[dict]:
        metric = self.task.main_metric
        if not (out / "metrics.jsonl").exists():
            return []  # PEFT's run: no dev curve
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [
            {"step": r["step"], "dev_loss": r.get("dev_loss"), metric: r.get(metric)}
            for r in rows
            if r.get("kind") == "eval"
        ]

    # -- 2. select --------------------------------------------------------------------------------------
    def run_grid(self) -> dict[str, Path]:
        metric = self.task.main_metric
        winners: dict[str, Path] = {}
        for method, rates in self.grid.items():
            best = None
            for lr in rates:
                out = self.train_peft_ptuning(lr) if method == "peft-ptuning" else self.train(method, lr)
                scores = self.evaluate(out, out / "select", offset=0, limit=self.args.select_limit)["soft_prompt"]
                seconds = json.loads((out / "quality_train.json").read_text())["seconds"]
                row = {
                    "lr": lr,
                    "select": _scores(scores, out / "select"),
                    "curve": self.curve(out),
                    "train_seconds": seconds,
                    "adapter": str(out),
                }
                self.result["grid"].setdefault(method, []).append(row)
                self.write()
                if best is None or scores["metrics"][metric] > best[0]:
                    best = (scores["metrics"][metric], lr, out)
            self.result["selected"][method] = {"lr": best[1], metric: best[0]}
            winners[method] = best[2]
        self.write()
        return winners

    # -- 3. decode --------------------------------------------------------------------------------------
    def choose_decoding(self, winners: dict[str, Path]) -> dict:
        metric = self.task.main_metric
        method = max(self.result["selected"], key=lambda m: self.result["selected"][m][metric])
        path = winners[method]
        rows = []
        for ngram, penalty in DECODE_GRID:
            search = {"no_repeat_ngram_size": ngram, "repetition_penalty": penalty}
            folder = path / f"decode-ngram{ngram}-rp{penalty:g}"
            scores = self.evaluate(path, folder, offset=0, limit=self.args.select_limit, search=search)
            rows.append({**search, "method": method, **_scores(scores["soft_prompt"], folder)})
            self.result["decode"] = rows
            self.write()
        # Among the settings within --decode-margin of the best score, the fewest loops, then the plainer (listed
        # first): a guard that costs nothing measurable and removes degenerate outputs is kept.
        top = max(r[metric] for r in rows)
        near = [r for r in rows if r[metric] >= top - self.args.decode_margin]
        best = min(near, key=lambda r: (r["loop_share"], rows.index(r)))
        chosen = {
            "no_repeat_ngram_size": best["no_repeat_ngram_size"],
            "repetition_penalty": best["repetition_penalty"],
        }
        self.result["decoding_chosen"] = chosen
        self.write()
        return chosen

    # -- 4. test ----------------------------------------------------------------------------------------
    def test(self, winners: dict[str, Path], search: dict) -> None:
        where = self.test_where()
        split = self.args.test_split
        tag = f"test-ngram{search['no_repeat_ngram_size']}-rp{search['repetition_penalty']:g}"
        for i, (method, path) in enumerate(winners.items()):
            baseline = i == 0  # the discrete prompts once, beside the first method
            records = self.evaluate(
                path, path / tag, offset=where["offset"], limit=where["limit"], split=split,
                baseline=baseline, shots=self.args.shots if baseline else 0, search=search,
            )  # fmt: skip
            self.result["test"][method] = {"lr": self.result["selected"][method]["lr"],
                                           **_scores(records["soft_prompt"], path / tag)}  # fmt: skip
            for kind, record in records.items():
                if kind != "soft_prompt":
                    self.result["test"][kind] = {"template": record["template"], **_scores(record, path / tag / kind)}
            self.write()

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metric = self.task.main_metric
        grid = {m: rows for m, rows in self.result["grid"].items() if any(r["curve"] for r in rows)}
        fig, axes = plt.subplots(1, len(grid), figsize=(6 * len(grid), 4), dpi=110, squeeze=False)
        for ax, (method, rows) in zip(axes[0], grid.items(), strict=True):
            chosen = self.result["selected"].get(method, {}).get("lr")
            for row in rows:
                points = [(c["step"], c[metric]) for c in row["curve"] if c.get(metric) is not None]
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, marker="o", linewidth=2.5 if row["lr"] == chosen else 1.2,
                            label=f"lr {row['lr']:g}" + (" (chosen)" if row["lr"] == chosen else ""))  # fmt: skip
            ax.set_title(METHOD_NAMES[method])
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(f"dev {metric} (first {self.args.curve_limit} examples)")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{self.args.task} on {self.args.model}: dev {metric} against steps")
        fig.tight_layout()
        path = self.output.with_suffix(".png")
        fig.savefig(path)
        plt.close(fig)
        return path


def _scores(record: dict, folder: Path | None = None) -> dict:
    """The numeric scores of one eval record; the loop share is computed from `folder`'s predictions.jsonl
    for an evaluation that ran before eval reported it."""
    from softtool.metrics import loop_share

    keep = {k: v for k, v in record["metrics"].items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if "loop_share" not in keep and folder is not None and (folder / "predictions.jsonl").exists():
        lines = (folder / "predictions.jsonl").read_text().splitlines()
        keep["loop_share"] = loop_share([json.loads(line)["prediction"] for line in lines if line.strip()])
    return {**keep, "seconds": record["seconds"], "tokens_per_s": record["tokens_per_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(DATA_FOLDERS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    parser.add_argument("--grid", action="append", required=True, help="METHOD=LR,LR,... (repeat per method)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--curve-limit", type=int, default=24, help="dev examples generated for the curves")
    parser.add_argument("--select-limit", type=int, default=50, help="dev examples that choose the winners")
    parser.add_argument("--test-split", default=None, help="held-out split (default: dev after the selection ones)")
    parser.add_argument("--test-limit", type=int, default=100)
    parser.add_argument("--shots", type=int, default=0, help="demonstrations of the k-shot baseline (0: none)")
    parser.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True, help="run stage 3")
    parser.add_argument(
        "--decoding-from",
        type=Path,
        default=None,
        help="with --no-decode: test with the decoding another quality JSON chose (same task, other model)",
    )
    parser.add_argument(
        "--decode-margin",
        type=float,
        default=0.5,
        help="settings this close to the best score count as equal; the fewest loops wins among them",
    )
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--eval-max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores, at most 2)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "quality"), help="where adapters and predictions go")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--allow-dirty", action="store_true", help="write into benchmarks/results/ from uncommitted "
                        "code, storing its diff beside the JSON")  # fmt: skip
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    # OpenMP's threads sleep while they wait, as the command line has them (softtool.threads): spinning threads on a
    # shared machine made a training step 16x slower here (13 s against 0.8 s alone).
    from softtool.threads import prepare_process

    prepare_process()
    args.command = " ".join([sys.executable, "benchmarks/quality.py", *argv])  # study.py reads flags back from it
    tree = provenance.check_tree(args.output, args.allow_dirty)  # before any work: a refusal costs nothing
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    quality = Quality(args, tree)
    winners = quality.run_grid()
    quality.plot()
    if args.decode:
        search = quality.choose_decoding(winners)
    elif args.decoding_from is not None:  # read now, at the test stage: the other run may have chosen meanwhile
        search = json.loads(args.decoding_from.read_text())["decoding_chosen"]
        quality.result["decoding_chosen"] = {**search, "from": str(args.decoding_from.name)}
    else:
        search = {"no_repeat_ngram_size": 0, "repetition_penalty": 1.0}
    quality.test(winners, search)
    quality.plot()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
