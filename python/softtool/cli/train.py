"""`softtool train`: learn a soft prompt for a task against a frozen model, from the command line.

The flags come from the fields of DataOptions, PromptConfig, TrainOptions, TranslationOptions and
DistributedOptions (softtool.options), which also hold their help text and checks.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

import click

from softtool.cli.common import configure_threads, output_folder_option, threads_option, unescape_template
from softtool.data.options import DataOptions
from softtool.data.tasks import TranslationOptions
from softtool.data.user_tasks import ClassifyOptions
from softtool.distributed import DistributedOptions
from softtool.errors import SofttoolError
from softtool.options import build, cli_fields, cli_options, given_on_command_line
from softtool.prompts.encoder import PromptConfig
from softtool.training.options import TrainOptions

DEFAULT_STEPS = 300
# A bare table needs large steps (Lester et al. use 0.3); the encoder's weights need small ones.
DEFAULT_LR = {"prompt": 0.03, "ptuning": 1e-3}

_TRAIN_OVERRIDES = {
    "max_steps": {"default": None, "show_default": f"{DEFAULT_STEPS} unless --epochs"},
    "lr": {"default": None, "show_default": "0.03 for prompt, 0.001 for ptuning"},
}


@click.command(name="train", context_settings={"show_default": True})
@cli_options(DataOptions, only=("task", "data"), override={"task": {"required": True}, "data": {"required": True}})
@click.option(
    "--model", "model_name", default="smollm2-135m", help="base model: embedded name, folder, .gguf or hub id"
)
@cli_options(PromptConfig)
@cli_options(TrainOptions, override=_TRAIN_OVERRIDES)
@cli_options(DataOptions, only=("train_limit", "train_split", "dev_split"))
@cli_options(TranslationOptions)
@cli_options(ClassifyOptions)
@click.option(
    "--verbalizer",
    default=None,
    help="classify: the text each label is written as, e.g. 'not_entailment=no,entailment=yes' (default: the label)",
)
@cli_options(DistributedOptions)
@threads_option
@click.option(
    "--trust-remote-code", is_flag=True, help="allow the model folder's own Python code (only if you trust it)"
)
@output_folder_option("output folder: adapter, metrics, loss.png, checkpoints/")
@click.option("--resume", is_flag=True, help="continue the run in --output from its last checkpoint")
@click.option("--overwrite", is_flag=True, help="replace a run already in --output")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or summary")
@click.pass_context
def train(ctx, model_name, threads, trust_remote_code, output, resume, overwrite, quiet, verbalizer, **values) -> None:
    """Train a soft prompt (prompt tuning or P-tuning) against a frozen causal LM.

    \b
    Example:
      softtool train --task translation --data ../shared/data/multi30k \\
        --method prompt --num-virtual-tokens 20 --max-steps 200 --output runs/de

    The output folder holds the adapter (PEFT-compatible), metrics.jsonl/.csv, loss.png and
    checkpoints/; Ctrl-C saves a checkpoint and --resume continues from it.

    \b
    Your own data (--task text or classify; docs/data.md, "Your own task"):
      softtool train --task classify --data ../shared/data/sst2 \\
        --template "Review: {sentence}\\nSentiment:" --output runs/sst2
      softtool train --task text --data my_prompt_completion_jsonl_folder --output runs/mine

    \b
    Several GPUs or processes (--batch-size stays the global batch; see docs/distributed.md):
      torchrun --nproc_per_node 4 -m softtool train ...        # DDP, one GPU per process
      torchrun --nproc_per_node 4 -m softtool train --fsdp ... # base model sharded over the GPUs
      softtool train --device-map auto ...                     # one process over all GPUs
    """
    from softtool.data import get_task
    from softtool.data.readers import split_files
    from softtool.prompts.template import Template

    values["template"] = unescape_template(values["template"])
    if values["max_steps"] is None:
        values["max_steps"] = 0 if values["epochs"] else DEFAULT_STEPS
    if values["lr"] is None:
        values["lr"] = DEFAULT_LR[values["method"]]
    prompt = build(PromptConfig, values)
    options = build(TrainOptions, values)
    task_options = asdict(build(TranslationOptions, values)) if values["task"] == "translation" else {}
    task_options.update(user_task_options(ctx, values, verbalizer))
    data_options = build(DataOptions, values, task_options=task_options)
    dist_options = build(DistributedOptions, values)
    # Before any work: the splits exist, and a template takes the task's inputs.
    task = get_task(data_options.task, **task_options)
    for split in (data_options.train_split, data_options.dev_split):
        split_files(data_options.data, split, task=task)
    if prompt.template is not None and task.fields:
        task.check_template(Template.parse(prompt.template))

    configure_threads(threads)
    from softtool.training import train_prompt

    summary = train_prompt(
        data_options,
        prompt,
        options,
        output,
        model_name=model_name,
        trust_remote_code=trust_remote_code,
        resume=resume,
        overwrite=overwrite,
        progress=not quiet,
        dist_options=dist_options,
    )
    if summary.result.interrupted:
        click.echo(f"interrupted: checkpoint saved in {summary.output}/checkpoints; continue with --resume", err=True)
        sys.exit(130)


def user_task_options(ctx, values: dict, verbalizer: str | None) -> dict:
    """The task options of --task text/classify from their flags (the input is --template without its virtual
    blocks); those flags with another task are refused in one line."""
    from softtool.data.tasks import USER_TASKS
    from softtool.data.user_tasks import parse_verbalizer
    from softtool.prompts.template import Template

    task = values["task"]
    names = cli_fields(ClassifyOptions)
    given = sorted(given_on_command_line(ctx, names)) + (["verbalizer"] if verbalizer is not None else [])
    if task not in USER_TASKS:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise SofttoolError(f"{flags}: for --task text or classify, not {task}")
        return {}
    classify_only = [n for n in given if n in ("labels", "verbalizer")]
    if task == "text" and classify_only:
        raise SofttoolError(f"--{classify_only[0]}: for --task classify, not text")
    out = {name: values[name] for name in names if name in given}
    if "labels" in out:
        out["labels"] = tuple(out["labels"])
    if verbalizer is not None:
        out["verbalizer"] = parse_verbalizer(verbalizer)
    if values["template"]:
        out["input"] = Template.parse(values["template"]).text_only()
    return out
