"""Classification quality: a soft prompt (`--task classify`) against the discrete prompts and PEFT, on dev.

For one model and each data set (SST-2, RTE, CB from ../shared/data):
  1. slice   a seeded slice of the train split becomes the selection set; the rest is what every prompt learns
             from (and draws its k-shot demonstrations from). Dev is read only in stage 4.
  2. soft    prompt tuning at each learning rate of --lrs for --steps steps, its rank-classification accuracy on
             the selection set every --eval-every steps; the (learning rate, step) with the best accuracy is kept
             (softtool keeps the best prompt of a run): the budget and the rate are chosen on train data only.
  3. peft    PEFT's prompt tuning (PromptTuningConfig, its vocabulary-sample init) with the kept rate, as many
             steps as the kept prompt had, the same batches, schedule and loss, scored by the same ranking.
  4. dev     once: the kept soft prompt, PEFT's prompt, the majority class of train, the instruction prompt, the
             bare input, the instruction through the chat template (instruct models) and k-shot prompts
             (class-balanced, seeded) for each --shots; every prompt by rank classification.
  5. onnx    the kept soft prompt exported (traced form, fp32, verified) and ranked on dev by ONNX Runtime: its
             predictions against PyTorch's, label for label, and the largest score difference.
Everything a stage writes stays under --runs, so a stopped run resumes. Writes
benchmarks/results/classify_<model>.json (commit, machine, versions, command, budget, every score and curve); as
quality.py and study.py, it refuses to write there from uncommitted code unless --allow-dirty, which stores the
diff beside the result (benchmarks/provenance.py).

    python benchmarks/classify_quality.py --model smollm2-135m
    python benchmarks/classify_quality.py --model gemma3-270m --sets sst2,rte
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DataSet:
    """One classification set of ../shared/data and how it is asked."""

    name: str
    template: str
    verbalizer: str = ""  # label=text,...; "" keeps the labels as they are


# The templates and verbalizers follow lm-evaluation-harness's task formats for these sets (sst2: "positive" /
# "negative"; rte and cb: a True / False (/ Neither) question after the premise).
SETS = {
    "sst2": DataSet("sst2", "Review: {sentence}\nSentiment:"),
    "rte": DataSet(
        "rte", "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", "entailment=True,not_entailment=False"
    ),
    "cb": DataSet(
        "cb",
        "{premise}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:",
        "entailment=True,contradiction=False,neutral=Neither",
    ),
}


def make_slices(source: Path, folder: Path, select_share: float, select_max: int, seed: int) -> dict:
    """folder/{train,select,dev}.jsonl: the source's train without the selection slice, the slice, and dev as it
    is (so `train` there is what every prompt learns from: the k-shot demonstrations come from it too)."""
    rows = [line for line in (source / "train.jsonl").read_text().splitlines() if line.strip()]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    size = min(select_max, max(1, int(len(rows) * select_share)))
    select = sorted(order[:size])
    chosen = set(select)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(rows[i] + "\n" for i in range(len(rows)) if i not in chosen))
    (folder / "select.jsonl").write_text("".join(rows[i] + "\n" for i in select))
    (folder / "dev.jsonl").write_text((source / "dev.jsonl").read_text())
    return {"train_rows": len(rows), "fit_rows": len(rows) - size, "select_rows": size, "seed": seed}


class ClassifyQuality:
    """The four stages for one model; self.result is written after every step."""

    def __init__(self, args, tree):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import provenance
        from quality import machine

        self.args, self.tree = args, tree
        tag = Path(args.model).name
        self.runs = Path(args.runs) / tag
        self.output = Path(args.output) / f"classify_{tag}.json"
        previous = json.loads(self.output.read_text()) if self.output.exists() and args.resume_json else {}
        self.result = {
            **provenance.stamp(self.output, tree, "peft"),
            "machine": machine(),
            "command": " ".join([sys.executable, *sys.argv]),
            "model": args.model,
            "budget": {
                "steps": args.steps,
                "lrs": args.lrs,
                "batch_size": args.batch_size,
                "eval_every": args.eval_every,
                "num_virtual_tokens": args.num_virtual_tokens,
                "max_length": args.max_length,
                "init": "vocab",
                "selection": f"{args.select_share:.0%} of train, at most {args.select_max} rows, seed {args.seed}",
                "shots": args.shots,
            },
            "sets": previous.get("sets", {}),
        }

    def write(self) -> None:
        import provenance

        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text(json.dumps(self.result, indent=2) + "\n")
        provenance.write_diff(self.output, self.tree)
        print(f"wrote {self.output}", file=sys.stderr)

    # -- stages ----------------------------------------------------------------------------------------
    def task_options(self, spec: DataSet) -> dict:
        from softtool.data.user_tasks import parse_verbalizer

        return {"input": spec.template, "verbalizer": parse_verbalizer(spec.verbalizer)}

    def train_soft(self, spec: DataSet, data: Path, lr: float) -> Path:
        from softtool.data.options import DataOptions
        from softtool.prompts.encoder import PromptConfig
        from softtool.training import TrainOptions, train_prompt

        out = self.runs / spec.name / f"prompt-lr{lr:g}"
        if (out / "softtool.json").exists():
            return out
        options = TrainOptions(
            max_steps=self.args.steps,
            batch_size=self.args.batch_size,
            lr=lr,
            warmup_steps=max(1, self.args.steps // 10),
            eval_every=self.args.eval_every,
            eval_limit=self.args.select_max,
            eval_generate=True,  # a classify task's dev metric is its rank accuracy (on the selection set here)
            checkpoint_every=0,
            max_length=self.args.max_length,
            seed=self.args.seed,
        )
        data_options = DataOptions(
            task="classify", data=str(data), task_options=self.task_options(spec), dev_split="select",
        )  # fmt: skip
        prompt = PromptConfig(num_virtual_tokens=self.args.num_virtual_tokens)
        start = time.perf_counter()
        summary = train_prompt(data_options, prompt, options, out, model_name=self.args.model, overwrite=True,
                               progress=not self.args.quiet)  # fmt: skip
        if summary.result.interrupted:
            sys.exit(130)
        (out / "quality_train.json").write_text(
            json.dumps({"seconds": round(time.perf_counter() - start, 1), "step_seconds": summary.result.state.seconds})
        )
        return out

    def curve(self, out: Path) -> list[dict]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [
            {"step": r["step"], "dev_loss": r.get("dev_loss"), "accuracy": r.get("accuracy")}
            for r in rows
            if r.get("kind") == "eval"
        ]

    def train_peft(self, spec: DataSet, data: Path, lr: float, steps: int) -> Path:
        """PEFT's prompt tuning at the kept rate for `steps` steps: softtool's batches (the same examples in the same
        order, label + EOS targets, right-padded), AdamW, linear schedule with the same warmup, clipping at 1."""
        import torch
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        from quality import peft_train_loop
        from softtool.data import encode_example, get_task, load_split
        from softtool.models import load_model, load_tokenizer
        from softtool.training.batching import collate, make_feature

        out = self.runs / spec.name / f"peft-lr{lr:g}-steps{steps}"
        if (out / "quality_train.json").exists():
            return out
        start = time.perf_counter()
        model, tokenizer = load_model(self.args.model), load_tokenizer(self.args.model)
        split = load_split(data, "train", task=get_task("classify", **self.task_options(spec)))
        task = get_task("classify", **self.task_options(spec)).fit(split, tokenizer)
        n = self.args.num_virtual_tokens
        template = task.default_template(n)
        vocab = model.get_input_embeddings().weight.shape[0]
        feats = []
        for ex in split.examples:
            enc = encode_example(tokenizer, template, task, ex, max_length=self.args.max_length)
            feats.append(make_feature(template, enc.pieces, enc.target_ids, vocab))
        order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(self.args.seed)).tolist()
        torch.manual_seed(self.args.seed)
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n,
                                    prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)  # fmt: skip
        peft_model = get_peft_model(model, config)
        bs = self.args.batch_size

        def batch_at(step: int):
            picked = [feats[order[(step * bs + i) % len(order)]] for i in range(bs)]
            return collate(picked, tokenizer.pad_token_id, prefix_tokens=n)  # PEFT prepends the prompt itself

        # The schedule is the soft prompt's: warmup over a tenth of --steps, linear decay towards --steps.
        losses = peft_train_loop(peft_model, batch_at, steps, lr, max(1, self.args.steps // 10), self.args.steps)
        peft_model.save_pretrained(str(out))
        seconds = round(time.perf_counter() - start, 1)
        (out / "quality_train.json").write_text(json.dumps({"seconds": seconds, "steps": steps, "losses": losses}))
        return out

    def dev_scores(self, spec: DataSet, data: Path, soft: Path, peft: Path) -> dict:
        """Every prompt once on dev (cached in the set's runs folder)."""
        import torch

        from softtool.adapter import load_adapter
        from softtool.classify import majority_label, rank
        from softtool.data import get_task, load_split
        from softtool.evaluate import discrete_prompts
        from softtool.models import load_model, load_tokenizer
        from softtool.prompts.template import Template
        from softtool.runtime.torch_backend import TorchGenerator

        cached = self.runs / spec.name / "dev_scores.json"
        if cached.exists():
            return json.loads(cached.read_text())
        model, tokenizer = load_model(self.args.model), load_tokenizer(self.args.model)
        fit = load_split(data, "train", task=get_task("classify", **self.task_options(spec)))
        meta = load_adapter(soft).meta
        task = get_task("classify", **meta.task_options)
        dev = load_split(data, "dev", task=task).examples
        gold = [[ex.target] for ex in dev]

        def score(name: str, template: Template, table, trained: bool) -> dict:
            generator = TorchGenerator(model, tokenizer, template, table)
            ranked = rank(generator, task, dev, eos=trained, max_length=self.args.eval_max_length,
                          batch_size=self.args.eval_batch_size, progress=not self.args.quiet, desc=name)  # fmt: skip
            report = task.score(ranked.predictions, gold)
            return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "per_class": report["per_class"],
                    "confusion": report["confusion"], "truncated": ranked.truncated,
                    "seconds": round(ranked.seconds, 1), "template": str(template)}  # fmt: skip

        template = Template.parse(meta.template)
        out = {"soft_prompt": score("soft prompt", template, load_adapter(soft).prompt_table, True)}
        out["peft"] = score("peft", template, load_adapter(peft).prompt_table, True)
        label = majority_label(task, fit.examples)
        report = task.score([label] * len(dev), gold)
        out["majority"] = {"label": label, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}
        with torch.inference_mode():
            for k in [0, *self.args.shots]:
                prompts = discrete_prompts(task, tokenizer, data, shots=k, seed=self.args.seed)
                kinds = ("baseline", "zero_shot", "chat") if k == 0 else ("few_shot",)
                for kind in kinds:
                    if kind in prompts:
                        name = f"{k}-shot" if kind == "few_shot" else kind
                        out[name] = score(name, prompts[kind], None, False)
        cached.write_text(json.dumps(out, indent=2) + "\n")
        return out

    def onnx_check(self, spec: DataSet, data: Path, soft: Path) -> dict:
        """The kept prompt's export ranks dev as PyTorch does (cached)."""
        from softtool.classify import rank
        from softtool.data import get_task, load_split
        from softtool.export.onnx import ExportOptions, export_adapters
        from softtool.runtime import load_generator

        cached = self.runs / spec.name / "onnx_check.json"
        if cached.exists():
            return json.loads(cached.read_text())
        folder = self.runs / spec.name / "export"
        if not (folder / "softtool_export.json").exists():
            export_adapters([str(soft)], str(folder), ExportOptions(overwrite=True))
        torch_gen = load_generator(soft, "torch")
        task = get_task("classify", **torch_gen.meta.task_options)
        dev = load_split(data, "dev", task=task).examples
        kw = {"eos": True, "max_length": self.args.eval_max_length, "batch_size": self.args.eval_batch_size,
              "progress": not self.args.quiet}  # fmt: skip
        want = rank(torch_gen, task, dev, **kw)
        got = rank(load_generator(folder, "onnx"), task, dev, **kw)
        same = sum(a == b for a, b in zip(got.predictions, want.predictions, strict=True))
        out = {"examples": len(dev), "identical_predictions": same, "all_identical": same == len(dev),
               "max_abs_score_diff": float(abs(got.scores - want.scores).max()),
               "examples_per_s": {"torch": round(len(dev) / want.seconds, 1), "onnx": round(len(dev) / got.seconds, 1)}}  # fmt: skip
        cached.write_text(json.dumps(out, indent=2) + "\n")
        return out

    def run_set(self, name: str) -> None:
        spec = SETS[name]
        data = self.runs / name / "data"
        entry = self.result["sets"].setdefault(name, {})
        entry["template"], entry["verbalizer"] = spec.template, spec.verbalizer
        entry["slices"] = make_slices(Path(self.args.data) / name, data, self.args.select_share,
                                      self.args.select_max, self.args.seed)  # fmt: skip
        runs, best = [], None
        for lr in self.args.lrs:
            out = self.train_soft(spec, data, lr)
            meta = json.loads((out / "softtool.json").read_text())
            times = json.loads((out / "quality_train.json").read_text())
            row = {"lr": lr, "best_step": meta["metrics"]["best_step"], "select_accuracy": meta["metrics"]["accuracy"],
                   "curve": self.curve(out), "train_seconds": times["seconds"],
                   "step_seconds": round(times["step_seconds"], 1), "adapter": str(out)}  # fmt: skip
            runs.append(row)
            if best is None or row["select_accuracy"] > best["select_accuracy"]:
                best = row
        entry["soft_prompt_runs"], entry["kept"] = runs, {k: best[k] for k in ("lr", "best_step", "select_accuracy")}
        self.write()
        steps = max(1, best["best_step"])
        peft = self.train_peft(spec, data, best["lr"], steps)
        entry["peft"] = {"lr": best["lr"], "steps": steps,
                         "train_seconds": json.loads((peft / "quality_train.json").read_text())["seconds"]}  # fmt: skip
        entry["dev"] = self.dev_scores(spec, data, Path(best["adapter"]), peft)
        self.write()
        entry["onnx"] = self.onnx_check(spec, data, Path(best["adapter"]))
        entry["commit"] = self.result["commit"]
        self.write()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sets", default="sst2,rte,cb", help="comma-separated: " + ", ".join(SETS))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lrs", default="0.03,0.3", help="prompt tuning's learning rates, chosen on the selection set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--num-virtual-tokens", type=int, default=20)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--select-share", type=float, default=0.1)
    p.add_argument("--select-max", type=int, default=300)
    p.add_argument("--shots", default="4,8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-max-length", type=int, default=1024)
    p.add_argument("--runs", default=str(ROOT / "runs" / "classify"))
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--resume-json", action="store_true", help="keep the sets of an existing results file")
    p.add_argument("--allow-dirty", action="store_true",
                   help="write into benchmarks/results/ from uncommitted code, storing the diff beside the result")  # fmt: skip
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.shots = [int(x) for x in args.shots.split(",") if x]
    unknown = [s for s in args.sets.split(",") if s not in SETS]
    if unknown:
        p.error(f"--sets: unknown {unknown}; known: {', '.join(SETS)}")
    args.sets = args.sets.split(",")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # OpenMP's threads sleep while they wait, as the command line has them (softtool.threads): spinning threads on a
    # shared machine made a training step 16x slower here (13 s against 0.8 s alone).
    from softtool.threads import prepare_process

    prepare_process()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import provenance

    tree = provenance.check_tree(args.output, args.allow_dirty)  # before any work: a refusal costs nothing
    # Everything a stage uses is imported now, so the run keeps the code of the commit it records even when the
    # checkout changes while it runs.
    import peft  # noqa: F401

    import softtool.classify  # noqa: F401
    import softtool.evaluate  # noqa: F401
    import softtool.export.onnx  # noqa: F401
    import softtool.runtime.onnx_backend  # noqa: F401
    import softtool.runtime.torch_backend  # noqa: F401
    import softtool.training  # noqa: F401

    quality = ClassifyQuality(args, tree)
    for name in args.sets:
        quality.run_set(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
