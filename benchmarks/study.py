"""Soft-prompt studies: how many virtual tokens, which initialization, which method at a fair budget, whether a
trained prompt can start another task, and how far a score moves with the seed; all scored on held-out examples.

Every run trains at the budget benchmarks/quality.py recorded for its task and model (steps, batch size, length,
evaluation cadence, its chosen learning rate: benchmarks/results/quality_<task>_<model>.json) and is scored on the
held-out examples quality.py tests on (SQuAD: the dev questions after the 50 used for selection; Multi30k: the 2016
Flickr test split) with the decoding it chose, through quality.py's own training and evaluation stages:

  length    prompt tuning with N = 5, 20, 100 virtual tokens, N=100 also with seed 1 and at max length 320 (SQuAD,
            SmolLM2-135M)
  spread    the defaults before these studies (N=20, vocab init, 60 steps) with seeds 0, 1 and 2 (SQuAD,
            SmolLM2-135M; --task translation --model gemma3-270m for Multi30k)
  init      vocab, text (the instruction prompt, at its own length) and random init, each also scored at step 0
            (SQuAD on SmolLM2-135M; --task translation --model gemma3-270m for Multi30k En->De)
  transfer  squad-qg started from the trained SQuAD prompt (spread's seed 0) against vocab init, at the same steps
            and rate (0.1), both also scored at step 0
  default   the default prompt length and max length: N=20 at max length 256 (the default), N=100 at 336 (0.2.0's
            default) and at 400 (the length study's runs), two seeds each, chosen on the held-out examples the other
            studies decided on (SQuAD dev 50-149, here the dev the choice is made on), then N=20 and the chosen N=100
            setting scored once on SQuAD dev 150-299, which no choice has touched (--untouched)
  method    prompt tuning against P-tuning (LSTM encoder), each at its chosen rate held constant after the warmup,
            trained in 20-step segments until the dev loss flattens (less than 2% relative improvement over the
            last quarter of the run) or 400 steps; PEFT's P-tuning for as many steps as P-tuning took is the
            reference row

Runs are cached under --runs by what defines them, so studies share runs (length's N=20 is spread's seed 0 and
init's vocab run) and a stopped study resumes. `--run NAME` does one run (benchmarks/study_pair.sh starts two side by
side, one per core); `--segments K` lets a `method` run train at most K segments per call, so a shared machine
gets its cores back between them. Without --run every missing run is done in turn. The study's JSON
(benchmarks/results/study_<name>_<task>_<model>.json: commit, library versions, machine, command, budget, every run
with its curve) and chart (.png) are then written; `--report` writes them from the runs done so far and lists the
missing ones. With --output in benchmarks/results/ (the default), a tree with uncommitted changes is refused unless
--allow-dirty, which stores the diff beside the JSON (study_<name>_<task>_<model>.diff) and, for a run, in its folder
(benchmarks/provenance.py); a run's record names its commit and that diff's hash.

    python benchmarks/study.py length
    python benchmarks/study.py init --task translation --model gemma3-270m
    python benchmarks/study.py table benchmarks/results/study_*.json   # the README's tables
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import provenance
from quality import DATA_FOLDERS, PTUNING_TEMPLATES, Quality, _scores, machine, train_run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DONE = "study_train.json"  # written in a run folder once its training is complete
SEGMENTS = "study_segments.json"  # a `method` run's segments so far
FLAT = 0.02  # a `method` run stops when its best dev loss improved less than this (relative) over the last quarter


@dataclass(frozen=True)
class Run:
    """One training run of a study."""

    name: str  # what --run takes
    label: str  # the name in the table and the chart
    method: str = "prompt"  # prompt, ptuning, or peft-ptuning (PEFT's own P-tuning)
    n: int | None = 20  # virtual tokens; None: the init text's token count (--init text's own length)
    init: str = "vocab"
    seed: int = 0
    lr: float | None = None  # None: the rate quality.py chose for the method
    init_from: tuple[str, Run] | None = None  # (task, run) whose trained prompt starts this one
    until_flat: bool = False  # train in segments until the dev loss flattens (the method study)
    steps_like: str | None = None  # train as many steps as that run of the study took (PEFT's reference row)
    # Max length counts the virtual tokens: with this set it moves with N (the budget's, plus N - 20), so the text
    # keeps the room it has beside 20 virtual tokens and a longer prompt does not cut more of the context.
    same_text_room: bool = False
    max_length: int | None = None  # the run's max length as given (virtual tokens included), instead of the budget's


DEFAULT = Run("seed0", "N=20, vocab, seed 0")
STUDIES = {
    "length": ("squad", (Run("n5", "N=5", n=5, same_text_room=True), Run("n20", "N=20", same_text_room=True),
                         Run("n100", "N=100", n=100, same_text_room=True),
                         # Is N=100's gain more than the seed's spread, and does it hold without the extra max length?
                         Run("n100-s1", "N=100, seed 1", n=100, seed=1, same_text_room=True),
                         Run("n100-len320", "N=100, max length 320", n=100))),
    "spread": ("squad", (Run("seed0", "seed 0"), Run("seed1", "seed 1", seed=1), Run("seed2", "seed 2", seed=2))),
    "init": ("squad", (Run("vocab", "vocab"), Run("text", "text", n=None, init="text"),
                       Run("random", "random", init="random"))),  # fmt: skip
    "transfer": ("squad-qg", (Run("vocab", "vocab init", lr=0.1),
                              Run("from-squad", "from the SQuAD prompt", lr=0.1, init_from=("squad", DEFAULT)))),
    "default": ("squad", (Run("n20-len256", "N=20, max length 256", max_length=256),
                          Run("n20-len256-s1", "N=20, max length 256, seed 1", seed=1, max_length=256),
                          Run("n100-len336", "N=100, max length 336", n=100, max_length=336),
                          Run("n100-len336-s1", "N=100, max length 336, seed 1", n=100, seed=1, max_length=336),
                          # the length study's N=100 runs (its max length 320 + 80 is 400: the same run folders)
                          Run("n100", "N=100, max length 400", n=100, max_length=400),
                          Run("n100-s1", "N=100, max length 400, seed 1", n=100, seed=1, max_length=400))),
    "method": ("squad", (Run("prompt", "prompt tuning", until_flat=True),
                         Run("ptuning", "P-tuning (LSTM)", method="ptuning", until_flat=True),
                         Run("peft-ptuning", "PEFT P-tuning (LSTM)", method="peft-ptuning", steps_like="ptuning"))),
}  # fmt: skip
STEP0_STUDIES = ("init", "transfer")  # each run is also scored as it starts
QUESTIONS = {
    "length": "How many virtual tokens?",
    "spread": "How far does the held-out score move with the seed alone?",
    "init": "How should the prompt start?",
    "transfer": "Does a trained SQuAD prompt start question generation better than vocabulary init?",
    "method": "Prompt tuning or P-tuning, each trained until its dev loss flattens?",
    "default": "Which prompt length and max length should be the default, chosen on dev and checked on untouched data?",
}
# The default study's untouched examples (offset, count): SQuAD dev after every example a choice has looked at
# (quality.py's selection 0-49, the studies' held-out 50-149).
UNTOUCHED = (150, 150)


def quality_budget(task: str, model: str) -> dict:
    """The budget benchmarks/quality.py recorded for (task, model); squad-qg takes SQuAD's (same data and lengths),
    with the task's own decoding (none), since quality.py has not been run on it."""
    source = "squad" if task == "squad-qg" else task
    path = RESULTS / f"quality_{source}_{Path(model).name}.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; run benchmarks/quality.py for {source} on {model} first")
    result = json.loads(path.read_text())
    budget, command = result["budget"], shlex.split(result["command"])

    def flag(name: str, default: int) -> int:
        return int(command[command.index(name) + 1]) if name in command else default

    return {
        "source": path.name,
        "steps": budget["steps"],
        "batch_size": budget["batch_size"],
        "max_length": budget["max_length"],
        "warmup_steps": max(1, budget["steps"] // 10),
        "eval_every": budget["eval_every"],
        "curve_limit": budget["curve_limit"],
        "held_out": budget["test"],
        "decoding": None if task == "squad-qg" else result.get("decoding_chosen"),
        "lr": {method: chosen["lr"] for method, chosen in result["selected"].items()},
        "eval_batch_size": flag("--eval-batch-size", 16),
        "eval_max_length": flag("--eval-max-length", 512),
    }


class Study:
    """One study on one (task, model): its runs, each trained, scored held out (and at step 0), then reported.
    `tree` is the code this process runs (provenance.check_tree, read before it trains)."""

    def __init__(self, args, tree: provenance.Tree):
        from softtool.data import get_task

        self.args = args
        self.tree = tree
        self.name = args.study
        default_task, runs = STUDIES[args.study]
        self.task_name = args.task or default_task
        self.model = args.model
        self.runs = runs
        self.budget = quality_budget(self.task_name, self.model)
        if args.steps:
            self.budget["steps"] = args.steps
            self.budget["warmup_steps"] = max(1, args.steps // 10)
        for key in ("curve_limit", "eval_every", "eval_max_length"):
            if getattr(args, key):
                self.budget[key] = getattr(args, key)
        if args.test_limit:
            self.budget["held_out"] = {**self.budget["held_out"], "limit": args.test_limit}
        if args.study == "method":
            self.budget.update(schedule="constant", segment_steps=args.segment_steps, max_steps=args.max_steps,
                               flat_below=FLAT, dev_loss_examples=self.budget["held_out"]["offset"] or 50)  # fmt: skip
        if args.train_limit:
            self.budget["train_limit"] = args.train_limit
        held = self.budget["held_out"]
        # quality.py's stages, with this budget as their arguments.
        self.qargs = argparse.Namespace(
            task=self.task_name, model=self.model, data=args.data, grid=[], steps=self.budget["steps"],
            batch_size=self.budget["batch_size"], max_length=self.budget["max_length"],
            eval_every=self.budget["eval_every"], curve_limit=self.budget["curve_limit"],
            select_limit=held["offset"], test_split=None if held["split"] == "dev" else held["split"],
            test_limit=held["limit"], eval_batch_size=self.budget["eval_batch_size"],
            eval_max_length=self.budget["eval_max_length"], runs=args.runs, output=args.output, quiet=args.quiet,
            train_limit=args.train_limit, command=args.command,
        )  # fmt: skip
        self.quality = Quality(self.qargs, tree)
        self.task = get_task(self.task_name, **({"src": "en", "tgt": "de"} if self.task_name == "translation" else {}))
        self.data = Path(args.data) / DATA_FOLDERS[self.task_name]
        self.metric = self.task.main_metric
        self.untouched_where = tuple(int(x) for x in args.untouched.split(":")) if args.untouched else UNTOUCHED

    # -- where runs live ------------------------------------------------------------------------------
    def lr(self, run: Run) -> float:
        return run.lr if run.lr is not None else self.budget["lr"][run.method]

    def max_length(self, run: Run) -> int:
        if run.max_length:
            return run.max_length
        if run.same_text_room and run.n:
            return self.budget["max_length"] + run.n - 20
        return self.budget["max_length"]

    def key(self, run: Run) -> str:
        """The run folder's name: everything that defines the run, so studies share equal runs."""
        n = f"n{run.n}" if run.n else "ntext"
        parts = [run.method, n, run.init, f"s{run.seed}", f"lr{self.lr(run):g}"]
        if self.max_length(run) != self.budget["max_length"]:
            parts.append(f"len{self.max_length(run)}")
        if run.until_flat:
            parts += ["const", f"flat{self.budget['max_steps']}"]
        elif run.steps_like:
            parts += ["const", f"{self.stopped_at(self.find(run.steps_like))}steps"]
        else:
            parts.append(f"{self.budget['steps']}steps")
        if run.init_from:
            task, source = run.init_from
            parts.append(f"from-{task}-{self.other(task).key(source)}")
        return "-".join(parts)

    def folder(self, run: Run) -> Path:
        return self.quality.runs / self.key(run)

    def find(self, name: str) -> Run:
        for run in self.runs:
            if run.name == name:
                return run
        raise SystemExit(f"error: study {self.name} has no run {name!r}; it has {', '.join(r.name for r in self.runs)}")

    def other(self, task: str) -> Study:
        """The same study settings on another task (where a transferred prompt comes from)."""
        return Study(argparse.Namespace(**{**vars(self.args), "study": "spread", "task": task}), self.tree)

    def stopped_at(self, run: Run) -> int:
        done = self.folder(run) / DONE
        if not done.is_file():
            raise SystemExit(f"error: run {run.name} of study {self.name} is not done yet; it sets this run's steps")
        return json.loads(done.read_text())["steps"]

    # -- training ---------------------------------------------------------------------------------------
    def prompt_config(self, run: Run):
        from softtool.prompts.encoder import PromptConfig

        template = PTUNING_TEMPLATES[self.task_name] if run.method == "ptuning" else None
        return PromptConfig(method=run.method, num_virtual_tokens=run.n, init=run.init, template=template)

    def source_table(self, run: Run):
        """The trained prompt table a transfer run starts from."""
        from softtool.adapter import load_adapter

        task, source = run.init_from
        folder = self.other(task).folder(source)
        if not (folder / DONE).is_file():
            raise SystemExit(f"error: {folder} is not trained yet; run `study.py spread --run {source.name}` first")
        return load_adapter(folder).prompt_table, folder

    @contextlib.contextmanager
    def starting_table(self, run: Run):
        """For a transfer run, make training start from the source prompt's table instead of its init."""
        if not run.init_from:
            yield
            return
        import softtool.training.run as training_run
        from softtool.prompts.encoder import PromptTable

        table, folder = self.source_table(run)
        original = training_run.build_prompt_module

        def from_source(config, model, tokenizer=None, seed=0):
            hidden = model.get_input_embeddings().weight.shape[1]
            if tuple(table.shape) != (config.num_virtual_tokens, hidden):
                raise SystemExit(f"error: {folder} holds a {tuple(table.shape)} prompt, this run needs "
                                 f"({config.num_virtual_tokens}, {hidden})")  # fmt: skip
            return PromptTable(table)

        training_run.build_prompt_module = from_source
        try:
            yield
        finally:
            training_run.build_prompt_module = original

    def provenance(self, out: Path) -> dict:
        """What a run folder records of the process that trained it. A dirty tree's diff is kept in the folder,
        named by its hash: a `method` run's segments may come from different trees."""
        import torch

        diff = {}
        if self.tree.diff:
            path = provenance.write_diff(out / f"uncommitted-{self.tree.sha256[:12]}", self.tree)
            diff = {"uncommitted_diff": {"file": path.name, "sha256": self.tree.sha256}}
        return {
            "commit": self.tree.commit,
            **diff,
            "command": self.args.command,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "torch_threads": torch.get_num_threads(),
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def train(self, run: Run, out: Path) -> None:
        if (out / DONE).is_file():
            return
        with self.starting_table(run):
            done = train_run(self.qargs, self.task, self.data, out, self.prompt_config(run), self.lr(run),
                             seed=run.seed, max_length=self.max_length(run))  # fmt: skip
        (out / DONE).write_text(json.dumps({**done, "stopped": "budget", **self.provenance(out)}, indent=2) + "\n")

    def flat(self, out: Path, steps: int) -> str | None:
        """Why a `method` run stops at `steps`, or None: the cap, or a best dev loss that improved less than FLAT
        (relative) since the last evaluation at or before three quarters of the run."""
        if steps >= self.budget["max_steps"]:
            return f"cap of {self.budget['max_steps']} steps"
        losses = [(c["step"], c["dev_loss"]) for c in self.quality.curve(out) if c.get("dev_loss") is not None]
        earlier = [s for s, _ in losses if s <= 0.75 * steps]
        if steps < self.budget["steps"] or not earlier:
            return None  # never before the quality budget's steps: this study asks what lies beyond them
        quarter = max(earlier)
        before = min(loss for s, loss in losses if s <= quarter)
        now = min(loss for s, loss in losses if s <= steps)
        gain = (before - now) / before
        if gain < FLAT:
            return (
                f"flat: best dev loss {now:.4f} at step {steps} vs {before:.4f} at step {quarter} ({gain:.1%} better)"
            )
        return None

    def train_until_flat(self, run: Run, out: Path) -> bool:
        """Train in segments of --segment-steps, resuming the run (the same run as an uninterrupted one: a constant
        rate after warmup does not depend on the last step), until `flat` says stop. False when --segments ran out."""
        if (out / DONE).is_file():
            return True
        record = json.loads((out / SEGMENTS).read_text()) if (out / SEGMENTS).is_file() else {"segments": []}
        segments = 0
        while True:
            steps = record["segments"][-1]["steps"] if record["segments"] else 0
            stop = self.flat(out, steps)
            if stop:
                last = record["segments"][-1]
                done = {"seconds": round(sum(s["seconds"] for s in record["segments"]), 1),
                        "step_seconds": last["step_seconds"], "steps": steps, "stopped": stop,
                        "segments": record["segments"], **self.provenance(out)}  # fmt: skip
                (out / DONE).write_text(json.dumps(done, indent=2) + "\n")
                return True
            if self.args.segments and segments >= self.args.segments:
                return False
            target = min(steps + self.budget["segment_steps"], self.budget["max_steps"])
            done = train_run(self.qargs, self.task, self.data, out, self.prompt_config(run), self.lr(run),
                             seed=run.seed, steps=target, schedule="constant", eval_generate=False,
                             eval_limit=self.budget["dev_loss_examples"], resume=steps > 0)  # fmt: skip
            record["segments"].append({**done, **self.provenance(out)})
            (out / SEGMENTS).write_text(json.dumps(record, indent=2) + "\n")
            segments += 1

    def train_peft(self, run: Run, out: Path) -> None:
        if (out / DONE).is_file():
            return
        steps = self.stopped_at(self.find(run.steps_like))
        self.quality.train_peft_ptuning(self.lr(run), steps=steps, schedule="constant", out=out)
        seconds = json.loads((out / "quality_train.json").read_text())["seconds"]
        done = {"seconds": seconds, "step_seconds": None, "steps": steps, "stopped": f"{run.steps_like}'s steps"}
        (out / DONE).write_text(json.dumps({**done, **self.provenance(out)}, indent=2) + "\n")

    # -- scoring --------------------------------------------------------------------------------------
    def held_out(self, adapter: Path, folder: Path) -> dict:
        held = self.budget["held_out"]
        search = {"search": self.budget["decoding"]} if self.budget["decoding"] else {}
        split = None if held["split"] == "dev" else held["split"]
        records = self.quality.evaluate(adapter, folder, offset=held["offset"], limit=held["limit"], split=split,
                                        **search)  # fmt: skip
        return _scores(records["soft_prompt"], folder)

    def untouched(self, adapter: Path, folder: Path) -> dict:
        """The default study's second look: scores on examples no choice has touched (UNTOUCHED)."""
        search = {"search": self.budget["decoding"]} if self.budget["decoding"] else {}
        offset, limit = self.untouched_where
        records = self.quality.evaluate(adapter, folder, offset=offset, limit=limit, **search)
        return _scores(records["soft_prompt"], folder)

    def setting(self, run: Run) -> str:
        """What a default is made of: N and the max length (the seed is not part of it)."""
        return f"N={run.n}, max length {self.max_length(run)}"

    def choose(self, entries: list[dict]) -> dict:
        """The default study's choice on dev: each setting's mean over its seeds; the best N=100 setting is the one
        N=20 is checked against on the untouched examples."""
        by_setting: dict[str, list[float]] = {}
        for entry in entries:
            by_setting.setdefault(entry["setting"], []).append(entry["held_out"][self.metric])
        means = {k: sum(v) / len(v) for k, v in by_setting.items()}
        long = {k: v for k, v in means.items() if k.startswith("N=100")}
        return {"dev_mean": means, "best": max(means, key=means.get),
                "n100": max(long, key=long.get) if long else None}  # fmt: skip

    def untouched_runs(self, choice: dict) -> list[Run]:
        """The runs scored on the untouched examples: the default's (N=20) and the chosen N=100 setting's."""
        return [r for r in self.runs if self.setting(r) in (choice["n100"], "N=20, max length 256")]

    def step0_adapter(self, run: Run, out: Path) -> Path:
        """The prompt a run starts from, saved as an adapter (the table training's step 0 uses)."""
        from softtool.adapter import WEIGHTS_FILE, Adapter, AdapterMeta, save_adapter
        from softtool.models import load_model, load_tokenizer
        from softtool.prompts.encoder import initial_table

        folder = out / "step0" / "adapter"
        if (folder / WEIGHTS_FILE).is_file():
            return folder
        model, tokenizer = load_model(self.model), load_tokenizer(self.model)
        prompt = self.prompt_config(run).resolved(self.task.instruction_prompt, tokenizer)
        if run.init_from:
            table = self.source_table(run)[0]
        else:
            table = initial_table(prompt, model.get_input_embeddings(), tokenizer, seed=run.seed)
        n, hidden = table.shape
        meta = AdapterMeta(
            base_model=self.model, num_virtual_tokens=n, token_dim=hidden,
            vocab_size=model.get_input_embeddings().weight.shape[0], template=str(self.task.default_template(n)),
            task=self.task.name, method=run.method, task_options=self.task.options, init=run.init,
            init_text=prompt.init_text, decoding=dict(self.task.decoding),
        )  # fmt: skip
        save_adapter(folder, Adapter(table, meta), model.config)
        return folder

    def do(self, run: Run) -> bool:
        """Train `run` (or continue it), then score it held out, and at step 0 where the study asks; False when a
        `method` run has used its --segments and is not done."""
        if run.init_from:  # the prompt it starts from comes first (the spread study's run on the other task)
            task, source = run.init_from
            self.other(task).do(source)
        if run.steps_like:
            out = self.folder(run)
            self.train_peft(run, out)
        else:
            out = self.folder(run)
            if run.until_flat:
                if not self.train_until_flat(run, out):
                    return False
            else:
                self.train(run, out)
        if self.name in STEP0_STUDIES:
            self.held_out(self.step0_adapter(run, out), out / "step0" / "heldout")
        self.held_out(out, out / "heldout")
        return True

    # -- the report -----------------------------------------------------------------------------------
    def record(self, run: Run) -> dict | None:
        """The run's entry in the study JSON, or None when it is not done."""
        try:
            out = self.folder(run)
        except SystemExit:  # PEFT's row before P-tuning is done
            return None
        if not (out / DONE).is_file() or not (out / "heldout" / "quality_eval.json").is_file():
            return None
        if self.name in STEP0_STUDIES and not (out / "step0" / "heldout" / "quality_eval.json").is_file():
            return None
        train = json.loads((out / DONE).read_text())
        meta_file = out / "softtool.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        config = json.loads((out / "adapter_config.json").read_text())
        entry = {
            "name": run.name,
            "label": run.label,
            "method": run.method,
            "num_virtual_tokens": config["num_virtual_tokens"],
            "init": f"from {shown(self.source_table(run)[1])}" if run.init_from else run.init,
            "init_text": meta.get("init_text"),
            "seed": run.seed,
            "lr": self.lr(run),
            "schedule": "constant" if (run.until_flat or run.steps_like) else "linear",
            "max_length": self.max_length(run),
            "setting": self.setting(run),
            "steps": train["steps"],
            "stopped": train["stopped"],
            "best_step": meta.get("metrics", {}).get("best_step"),
            "adapter": shown(out),
            "train": {k: v for k, v in train.items() if k != "segments"},
            "segments": train.get("segments"),
            "curve": self.quality.curve(out),
            "held_out": self.held_out(out, out / "heldout"),
            "truncated": {  # inputs whose long field (the context) was cut to fit the max length
                "train": meta.get("metrics", {}).get("train_truncated"),
                "train_examples": meta.get("metrics", {}).get("train_examples"),
                "held_out": json.loads((out / "heldout" / "quality_eval.json").read_text())["soft_prompt"]["truncated"],
            },
        }
        if self.name in STEP0_STUDIES:
            entry["step0"] = self.held_out(out / "step0" / "adapter", out / "step0" / "heldout")
        return entry

    def summary(self, runs: list[dict]) -> dict:
        scores = {r["name"]: r["held_out"][self.metric] for r in runs}
        out: dict = {"held_out": scores}
        if len(scores) > 1:
            out["max_minus_min"] = max(scores.values()) - min(scores.values())
            out["best"] = max(scores, key=scores.get)
        if self.name in STEP0_STUDIES:
            out["step0"] = {r["name"]: r["step0"][self.metric] for r in runs}
        return out

    def report(self) -> Path:
        import torch

        runs, missing = [], []
        for run in self.runs:
            entry = self.record(run)
            (runs.append(entry) if entry else missing.append(run.name))
        path = Path(self.args.output) / f"study_{self.name}_{self.task_name}_{Path(self.model).name}.json"
        peft = ["peft"] if any(run.method == "peft-ptuning" for run in self.runs) else []
        result = {
            "study": self.name,
            "question": QUESTIONS[self.name],
            **provenance.stamp(path, self.tree, *peft),
            "machine": {**machine(), "torch_threads_per_run": torch.get_num_threads()},
            "command": self.args.command,
            "task": self.task_name,
            "model": self.model,
            "main_metric": self.metric,
            "budget": self.budget,
            "runs": runs,
            "not_run": missing,
            "summary": self.summary(runs) if runs else {},
        }
        if self.name == "default" and runs and not missing:
            choice = self.choose(runs)
            scores = {}
            for run in self.untouched_runs(choice):
                out = self.folder(run)
                scores[run.name] = self.untouched(out, out / "untouched")
            means: dict[str, list[float]] = {}
            for run in self.untouched_runs(choice):
                means.setdefault(self.setting(run), []).append(scores[run.name][self.metric])
            result["choice"] = choice
            offset, limit = self.untouched_where
            result["untouched"] = {"split": "dev", "offset": offset, "limit": limit, "runs": scores,
                                   "mean": {k: sum(v) / len(v) for k, v in means.items()}}  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        provenance.write_diff(path, self.tree)
        path.write_text(json.dumps(result, indent=2) + "\n")
        if runs:
            plot(result, path.with_suffix(".png"))
        print(f"wrote {path}" + (f" (not run yet: {', '.join(missing)})" if missing else ""), file=sys.stderr)
        return path


def shown(path: Path) -> str:
    """`path` as the JSON records it: relative to the checkout when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def plot(result: dict, path: Path) -> None:
    """Left: each run's dev curve (the main metric on the curve examples; the dev loss for the method study).
    Right: each run's held-out score, with the step-0 score beside it where the study has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["main_metric"]
    curve_key = "dev_loss" if result["study"] == "method" else metric
    runs = result["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    for run in runs:
        points = [(c["step"], c[curve_key]) for c in run["curve"] if c.get(curve_key) is not None]
        if points:
            steps, values = zip(*points, strict=True)
            n = run["num_virtual_tokens"]
            label = run["label"] if run["label"].startswith("N=") else f"{run['label']} (N={n})"
            (line,) = left.plot(steps, values, marker="o", markersize=3, label=label)
            kept = dict(points).get(run.get("best_step"))
            if kept is not None:  # the prompt the run kept (its best dev score)
                left.plot([run["best_step"]], [kept], marker="*", markersize=11, color=line.get_color())
    budget = result["budget"]
    where = "first " + str(budget["dev_loss_examples"] if curve_key == "dev_loss" else budget["curve_limit"])
    left.set_xlabel("optimizer step")
    left.set_ylabel(f"dev {'loss' if curve_key == 'dev_loss' else metric} ({where} dev examples)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, title="* the prompt each run kept", title_fontsize=7)
    y = range(len(runs))
    held = [r["held_out"][metric] for r in runs]
    has_step0 = all("step0" in r for r in runs)
    height = 0.38 if has_step0 else 0.6
    right.barh([i + (height / 2 if has_step0 else 0) for i in y], held, height=height, label="trained")
    for i, value in enumerate(held):
        right.text(value, i + (height / 2 if has_step0 else 0), f" {value:.1f}", va="center", fontsize=8)
    if has_step0:
        start = [r["step0"][metric] for r in runs]
        right.barh([i - height / 2 for i in y], start, height=height, color="tab:gray", label="step 0")
        for i, value in enumerate(start):
            right.text(value, i - height / 2, f" {value:.1f}", va="center", fontsize=8)
        right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    right.set_xlim(0, max([*held, *(r["step0"][metric] for r in runs if "step0" in r)]) * 1.15)
    right.set_yticks(list(y), [r["label"] for r in runs], fontsize=8)
    right.invert_yaxis()
    held_where = budget["held_out"]
    split = held_where["split"] if held_where["split"] != "dev" else f"dev {held_where['offset']}+"
    right.set_xlabel(f"held-out {metric} ({split}, {held_where['limit']} examples)")
    right.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{result['study']}: {result['question']} ({result['task']}, {result['model']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(paths: list[Path]) -> str:
    """The README's tables, one per study JSON: benchmarks/render_docs.py renders them (`make docs` writes them)."""
    from render_docs import Results, study

    return "\n\n".join(study(Results(path.parent), path.name) for path in paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=[*STUDIES, "table"])
    parser.add_argument("files", nargs="*", type=Path, help="table: the study JSONs")
    parser.add_argument("--task", default=None, help="default: the study's own (squad; transfer: squad-qg)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--run", default=None, help="do only this run of the study (then write nothing else)")
    parser.add_argument("--report", action="store_true", help="only write the JSON and chart from the runs done")
    parser.add_argument("--segments", type=int, default=0, help="method: at most this many segments now (0: all)")
    parser.add_argument("--segment-steps", type=int, default=20, help="method: steps per segment (one evaluation)")
    parser.add_argument("--max-steps", type=int, default=400, help="method: the most steps a run takes")
    # Smaller budgets, for a smoke test of the whole path (use another --runs and --output with them).
    parser.add_argument("--steps", type=int, default=0, help="override the quality JSON's steps")
    parser.add_argument("--eval-every", type=int, default=0, help="override the quality JSON's evaluation interval")
    parser.add_argument("--curve-limit", type=int, default=0, help="override the dev examples of the curves")
    parser.add_argument("--eval-max-length", type=int, default=0, help="override the held-out evaluations' length")
    parser.add_argument("--test-limit", type=int, default=0, help="override the held-out examples")
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N examples only")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores, at most 2)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "study"), help="where adapters and predictions go")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--untouched", default="", help="default: OFFSET:COUNT of the untouched dev examples "
                        "(150:150)")  # fmt: skip
    parser.add_argument("--allow-dirty", action="store_true", help="train and report from uncommitted code, storing "
                        "its diff beside the JSON and in each run folder")  # fmt: skip
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    # OpenMP's threads sleep while they wait, as the command line has them (softtool.threads): spinning threads on a
    # shared machine made a training step 16x slower here (13 s against 0.8 s alone).
    from softtool.threads import prepare_process

    prepare_process()
    args.command = " ".join([sys.executable, "benchmarks/study.py", *argv])
    if args.study == "table":
        print(table(args.files))
        return 0
    # Before any training, and for --run too: its runs are what the report writes into --output.
    tree = provenance.check_tree(args.output, args.allow_dirty)
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    study = Study(args, tree)
    if args.run:
        done = study.do(study.find(args.run))
        print(f"{args.study} {args.run}: {'done' if done else 'more segments to go'}", file=sys.stderr)
        return 0
    if not args.report:
        for run in study.runs:
            study.do(run)
    study.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
