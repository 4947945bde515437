"""One training run end to end: read and encode the data, load the frozen model, train, and write the
output folder (adapter, metrics.jsonl/.csv, loss.png, checkpoints/, run.json).

run.json records what defines the run (task, data, model, prompt and optimization options), so a
folder holding a different run is refused unless --overwrite, and --resume checks it continues the
same one.

Under torchrun every rank runs train_prompt; rank 0 alone prepares and writes the output folder.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from softtool.adapter import CONFIG_FILE, META_FILE, WEIGHTS_FILE, Adapter, AdapterMeta, save_adapter
from softtool.classify import rank, warn_unseen_labels
from softtool.data.options import DataOptions
from softtool.distributed import DistributedContext, DistributedOptions, distributed_context, shard_base_fsdp
from softtool.errors import SofttoolError
from softtool.fileio import atomic_write_json, remove_stale_temps
from softtool.prompts.encoder import PromptConfig, build_prompt_module
from softtool.prompts.template import Template
from softtool.training.batching import Feature, make_feature
from softtool.training.checkpoint import CHECKPOINT_DIR, clean_checkpoint_dir
from softtool.training.checkpoint import FILES as CHECKPOINT_FILES
from softtool.training.loop import Trainer, TrainResult
from softtool.training.options import TrainOptions
from softtool.training.report import LOSS_PLOT, METRICS_CSV, METRICS_JSONL, plot_loss, print_summary
from softtool.training.tracking import clear_trackers, require

RUN_FILE = "run.json"
_OUTPUT_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE, METRICS_JSONL, METRICS_CSV, LOSS_PLOT, RUN_FILE)
# Options that may change between a run and its resumption without making it a different run.
_RESUMABLE = ("max_steps", "epochs", "eval_every", "checkpoint_every", "device", "report_to")


def _run_identity(data: DataOptions, model_name: str, prompt: PromptConfig, options: TrainOptions) -> dict[str, Any]:
    train = {k: v for k, v in options.to_dict().items() if k not in _RESUMABLE}
    data_dict = asdict(data)
    data_dict["data"] = str(Path(data.data).expanduser().resolve()) if Path(data.data).exists() else data.data
    return {"data": data_dict, "model": model_name, "prompt": asdict(prompt), "train": train}


def _holds_run(output: Path) -> list[str]:
    """The files of a run in `output` (relative names). run.json alone is not a run: it is written just before
    training starts, so a folder holding only it comes from a run that stopped before its first step."""
    names = [name for name in _OUTPUT_FILES if name != RUN_FILE and (output / name).is_file()]
    names += [f"{CHECKPOINT_DIR}/{name}" for name in CHECKPOINT_FILES if (output / CHECKPOINT_DIR / name).is_file()]
    return names


def check_output(output: Path, identity: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding another run (unless overwrite), or, on resume, one that is not this run.

    Writes nothing, so it runs before any work; prepare_output does the writing once the model and data loaded.
    """
    import json

    if output.exists() and not output.is_dir():
        raise SofttoolError(f"--output {output} is a file; give a folder")
    run_file = output / RUN_FILE
    if resume:
        if not run_file.is_file():
            raise SofttoolError(f"--resume: {output} holds no run ({RUN_FILE} missing); start without --resume")
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError) as exc:
            raise SofttoolError(f"{run_file} is unreadable ({exc}); start again with --overwrite") from exc
        if previous != identity:
            changed = sorted(k for k in identity if not isinstance(previous, dict) or previous.get(k) != identity[k])
            raise SofttoolError(
                f"--resume: {output} holds a different run (differs in {', '.join(changed)}); "
                "use the same options, or another --output"
            )
        return
    if _holds_run(output) and not overwrite:
        raise SofttoolError(
            f"{output} already holds a training run; pass --overwrite to replace it, "
            "--resume to continue it, or choose another --output"
        )


def prepare_output(output: Path, identity: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    """Check the folder (check_output), clear the files an earlier run wrote there, and write run.json.

    Only files softtool writes are removed (the output files, the checkpoint, temporary files an interrupted
    write left); anything else in the folder or in checkpoints/ stays, and so does checkpoints/ when it holds
    anything else.
    """
    check_output(output, identity, resume=resume, overwrite=overwrite)
    if output.is_dir():
        for name in _OUTPUT_FILES:
            remove_stale_temps(output, name)
            (output / f".{name}.tmp").unlink(missing_ok=True)  # metrics.csv's writer uses one fixed name
        clean_checkpoint_dir(output)
    if resume:
        return
    clear_trackers(output)
    for name in _holds_run(output):
        (output / name).unlink()
    checkpoints = output / CHECKPOINT_DIR
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output / RUN_FILE, identity)


def wrap_in_chat(tokenizer, template: Template, model_name: str) -> Template:
    """`template` as the user turn of the tokenizer's chat template (--chat-template); one line when it has none."""
    from softtool.prompts.chat import chat_template

    wrapped = chat_template(tokenizer, template)
    if wrapped is None:
        raise SofttoolError(
            f"--chat-template: {model_name}'s tokenizer has no chat template (a base model); drop the flag"
        )
    return wrapped


def encode_features(
    tokenizer, template: Template, task, examples, max_length: int, vocab_size: int, desc: str, progress: bool
) -> tuple[list[Feature], int]:
    from softtool.data import encode_example

    features, truncated = [], 0
    for ex in tqdm(examples, desc=desc, unit="ex", disable=not progress, dynamic_ncols=True, leave=False):
        enc = encode_example(tokenizer, template, task, ex, max_length=max_length, with_target=True)
        truncated += enc.truncated
        features.append(make_feature(template, enc.pieces, enc.target_ids, vocab_size))
    return features, truncated


@dataclass
class TrainSummary:
    output: Path
    result: TrainResult
    counts: dict[str, int]
    seconds: float


def train_prompt(
    data: DataOptions,
    prompt: PromptConfig,
    options: TrainOptions,
    output: str | Path,
    *,
    model_name: str = "smollm2-135m",
    trust_remote_code: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    model=None,
    tokenizer=None,
    dist_options: DistributedOptions | None = None,
    dist: DistributedContext | None = None,
) -> TrainSummary:
    """Train a soft prompt and write the output folder. `model`/`tokenizer` skip loading (tests, scripts).

    Under torchrun / accelerate launch it joins the process group (or uses `dist`) and trains on its shard.
    """
    from softtool.data import default_dev_split, get_task, load_split
    from softtool.models import load_model, load_tokenizer

    dist_options = dist_options or DistributedOptions()
    if dist_options.fsdp and options.eval_generate:
        # Ranks stop generating at different lengths, but FSDP needs every rank in every model call.
        raise SofttoolError("--fsdp cannot be combined with --eval-generate; evaluate the adapter with softtool eval")
    if dist is None:
        with distributed_context(options.device, dist_options) as ctx:
            return train_prompt(
                data, prompt, options, output, model_name=model_name, trust_remote_code=trust_remote_code,
                resume=resume, overwrite=overwrite, progress=progress, model=model, tokenizer=tokenizer,
                dist_options=dist_options, dist=ctx,
            )  # fmt: skip
    progress = progress and dist.is_main
    if options.report_to != "none":
        require(options.report_to)  # before any work: a missing package is one line, not a failed run
    started = time.perf_counter()
    output = Path(output)
    task = get_task(data.task, **data.task_options)
    train_split = load_split(data.data, data.train_split, task=task, limit=data.train_limit)
    if hasattr(task, "fit"):
        # The user's own task: the train split decides what its options leave open (softtool.data.user_tasks).
        tokenizer = tokenizer or load_tokenizer(model_name)
        task = task.fit(train_split, tokenizer)
    if prompt.init == "text":
        tokenizer = tokenizer or load_tokenizer(model_name)
        prompt = prompt.resolved(task.instruction_prompt, tokenizer)
    template = Template.parse(prompt.template) if prompt.template else task.default_template(prompt.num_virtual_tokens)
    missing = [f for f in template.fields if f not in task.fields]
    if missing:
        raise SofttoolError(
            f"--template {template}: field(s) {missing} are not fields of task {task.name} (it has {list(task.fields)})"
        )
    if getattr(task, "chat_template", False):
        tokenizer = tokenizer or load_tokenizer(model_name)
        template = wrap_in_chat(tokenizer, template, model_name)
    identity = _run_identity(data, model_name, prompt, options)
    dist.on_main(check_output, output, identity, resume=resume, overwrite=overwrite)
    device = dist.device
    torch.manual_seed(options.seed)

    dev_name = data.dev_split or default_dev_split(data.data)
    dev_split = load_split(data.data, dev_name, task=task, limit=options.eval_limit)
    if task.name == "classify":
        warn_unseen_labels(task, dev_split)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_name)
    if model is None:
        tqdm.write(f"loading {model_name} ...") if progress else None
        # FSDP shards from host memory, so a base larger than one GPU never lands whole on one.
        model = load_model(
            model_name,
            dtype=options.dtype,
            device="cpu" if dist_options.fsdp else str(device),
            trust_remote_code=trust_remote_code,
            device_map=dist_options.device_map,
        )
    if dist_options.fsdp:
        model = shard_base_fsdp(model, dist)
    if dist_options.device_map:
        device = model.get_input_embeddings().weight.device
    vocab_size = model.get_input_embeddings().weight.shape[0]
    train_feats, train_trunc = encode_features(
        tokenizer, template, task, train_split.examples, options.max_length, vocab_size, "encoding train", progress
    )
    dev_feats, dev_trunc = encode_features(
        tokenizer, template, task, dev_split.examples, options.max_length, vocab_size, "encoding dev", progress
    )
    counts = {
        "train_examples": len(train_feats),
        "dev_examples": len(dev_feats),
        "train_truncated": train_trunc,
        "dev_truncated": dev_trunc,
        "train_skipped_empty": train_split.skipped_empty,
        "dev_skipped_empty": dev_split.skipped_empty,
    }

    module = build_prompt_module(prompt, model, tokenizer, seed=options.seed)
    generate_metrics = None
    if options.eval_generate and dev_split.examples:
        generate_metrics = _dev_metrics(model, tokenizer, template, task, dev_split.examples, options, dist)
    trainer = Trainer(
        model,
        module,
        options,
        train_feats,
        dev_feats,
        pad_id=tokenizer.pad_token_id,
        vocab_size=vocab_size,
        # Under FSDP a block's weights are freed after its forward; the prefix cache's keys/values would
        # need them again in a backward FSDP does not expect, so the full rows go through the model instead.
        prefix_tokens=template.num_virtual_tokens if template.is_prefix and not dist_options.fsdp else 0,
        output_dir=output,
        device=device,
        generate_metrics=generate_metrics,
        main_metric=task.main_metric,
        dist=dist,
    )
    # Only now, with the data and model loaded: a run that fails before this point leaves the folder as it was.
    dist.on_main(prepare_output, output, identity, resume=resume, overwrite=overwrite)
    result = trainer.run(resume=resume, progress=progress)
    summary = TrainSummary(output, result, counts, time.perf_counter() - started)
    if dist.is_main:
        _write_outputs(summary, model, model_name, template, task, prompt, options, vocab_size, progress)
    dist.barrier()  # no rank exits before rank 0 has written
    return summary


def _write_outputs(summary: TrainSummary, model, model_name, template, task, prompt, options, vocab_size, progress):
    """The adapter, the loss plot and the summary table (rank 0)."""
    result, output, counts = summary.result, summary.output, summary.counts

    meta = AdapterMeta(
        base_model=model_name,
        num_virtual_tokens=template.num_virtual_tokens,
        token_dim=result.best_table.shape[1],
        vocab_size=vocab_size,
        template=str(template),
        task=task.name,
        method=prompt.method,
        task_options=task.options,
        init=prompt.init,
        init_text=prompt.init_text if prompt.init == "text" else None,
        decoding=dict(task.decoding),
        metrics={**result.state.best_metrics, "best_step": result.state.best_step, **counts},
        train_options={**options.to_dict(), "prompt": asdict(prompt), "steps_done": result.state.step},
    )
    save_adapter(output, Adapter(result.best_table, meta), model.config)
    plot_loss(
        output,
        result.state.history,
        title=f"{task.name}: {prompt.method}, {template.num_virtual_tokens} virtual tokens, {model_name}",
    )
    if progress:
        _print(summary)


def _dev_metrics(model, tokenizer, template, task, examples, options: TrainOptions, dist=None):
    from softtool.evaluate import predict, search_options
    from softtool.runtime.torch_backend import TorchGenerator

    generator = TorchGenerator(
        model, tokenizer, template, torch.zeros(template.num_virtual_tokens, model.config.hidden_size)
    )
    so = replace(search_options(tokenizer, 1, task.max_target_tokens), **task.decoding)

    def metrics(table: torch.Tensor) -> dict[str, float]:
        generator.set_prompt(table)
        if task.name == "classify":  # ranked, as eval scores it
            ranked = rank(
                generator,
                task,
                examples,
                eos=True,
                max_length=options.max_length + task.max_target_tokens,
                batch_size=options.batch_size,
                progress=False,
                dist=dist,
            )
            scores = task.score(ranked.predictions, [ex.references for ex in examples])
            return {k: float(scores[k]) for k in ("accuracy", "macro_f1")}
        preds = predict(
            generator,
            task,
            examples,
            options=so,
            batch_size=options.batch_size,
            max_length=options.max_length + task.max_target_tokens,
            progress=False,
            dist=dist,
        )
        scores = task.score(preds.texts, [ex.references for ex in examples])
        return {k: float(v) for k, v in scores.items() if isinstance(v, int | float)}

    return metrics


def _print(summary: TrainSummary) -> None:
    st = summary.result.state
    rows = [
        (
            "steps",
            f"{st.step} / {summary.result.total_steps}" + (" (interrupted)" if summary.result.interrupted else ""),
        ),
        ("time", f"{summary.seconds:.1f} s (training {st.seconds:.1f} s)"),
        ("examples", f"{summary.counts['train_examples']} train, {summary.counts['dev_examples']} dev"),
        (
            "truncated / skipped",
            f"{summary.counts['train_truncated'] + summary.counts['dev_truncated']} / "
            f"{summary.counts['train_skipped_empty'] + summary.counts['dev_skipped_empty']}",
        ),
    ]
    for key, value in st.best_metrics.items():
        if key != "step":
            rows.append((f"best {key}", f"{value:.4f}" if isinstance(value, float) else str(value)))
    rows.append(("best step", str(st.best_step)))
    rows += [
        ("adapter", str(summary.output)),
        ("loss plot", str(summary.output / LOSS_PLOT)),
        ("metrics", str(summary.output / METRICS_JSONL)),
        ("resume with", "--resume (same options)" if summary.result.interrupted else "-"),
    ]
    print_summary(rows)
