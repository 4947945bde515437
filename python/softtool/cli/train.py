"""`softtool train`: learn a soft prompt for a task against a frozen model, from the command line."""

from __future__ import annotations

import sys

import click

from softtool.errors import SofttoolError

TASKS = ("squad", "squad-qg", "cnndm", "translation")


def unescape_template(template: str | None) -> str | None:
    """Shells pass "\\n" literally; templates need real newlines (the tasks' own templates have them)."""
    return None if template is None else template.replace("\\n", "\n").replace("\\t", "\t")


def _h(cls_name: str, field: str) -> str:
    from softtool.distributed import DistributedOptions
    from softtool.prompts.encoder import PromptConfig
    from softtool.training.options import TrainOptions, help_of
    from softtool.training.run import DataOptions

    classes = {"prompt": PromptConfig, "train": TrainOptions, "data": DataOptions, "dist": DistributedOptions}
    return help_of(classes[cls_name], field)


@click.command(name="train", context_settings={"show_default": True})
@click.option("--task", type=click.Choice(TASKS), required=True, help="the task to learn")
@click.option(
    "--data",
    required=True,
    help="data folder holding the train and dev splits (e.g. train.json + dev.json, train.en.gz + train.de.gz)",
)
@click.option(
    "--model", "model_name", default="smollm2-135m", help="base model: embedded name, folder, .gguf or hub id"
)
@click.option("--method", type=click.Choice(["prompt", "ptuning"]), default="prompt", help=_h("prompt", "method"))
@click.option("--num-virtual-tokens", type=int, default=20, help=_h("prompt", "num_virtual_tokens"))
@click.option("--template", default=None, help=_h("prompt", "template"))
@click.option("--init", type=click.Choice(["vocab", "text", "random"]), default="vocab", help=_h("prompt", "init"))
@click.option("--init-text", default=None, help=_h("prompt", "init_text"))
@click.option("--encoder", type=click.Choice(["lstm", "mlp"]), default="lstm", help=_h("prompt", "encoder"))
@click.option("--encoder-hidden-size", type=int, default=0, help=_h("prompt", "encoder_hidden_size"))
@click.option("--max-steps", type=int, default=None, help="optimizer steps (default 300 unless --epochs)")
@click.option("--epochs", type=float, default=None, help=_h("train", "epochs"))
@click.option("--batch-size", type=int, default=8, help=_h("train", "batch_size"))
@click.option("--grad-accumulation", type=int, default=1, help=_h("train", "grad_accumulation"))
@click.option(
    "--lr", type=float, default=None, help="AdamW learning rate  [default: 0.03 for prompt, 0.001 for ptuning]"
)
@click.option("--warmup-steps", type=int, default=10, help=_h("train", "warmup_steps"))
@click.option(
    "--schedule", type=click.Choice(["linear", "cosine", "constant"]), default="linear", help=_h("train", "schedule")
)
@click.option("--max-grad-norm", type=float, default=1.0, help=_h("train", "max_grad_norm"))
@click.option("--max-length", type=int, default=256, help=_h("train", "max_length"))
@click.option("--eval-every", type=int, default=50, help=_h("train", "eval_every"))
@click.option("--eval-limit", type=int, default=64, help=_h("train", "eval_limit"))
@click.option("--eval-generate/--no-eval-generate", default=False, help=_h("train", "eval_generate"))
@click.option("--checkpoint-every", type=int, default=100, help=_h("train", "checkpoint_every"))
@click.option("--prefix-cache/--no-prefix-cache", default=True, help=_h("train", "prefix_cache"))
@click.option("--train-limit", type=int, default=None, help=_h("data", "train_limit"))
@click.option("--train-split", default="train", help=_h("data", "train_split"))
@click.option("--dev-split", default=None, help=_h("data", "dev_split"))
@click.option("--src", default="en", help="translation: source language code")
@click.option("--tgt", default="de", help="translation: target language code")
@click.option("--seed", type=int, default=0, help=_h("train", "seed"))
@click.option("--device", default="auto", help=_h("train", "device"))
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", help=_h("train", "dtype")
)
@click.option("--autocast/--no-autocast", default=False, help=_h("train", "autocast"))
@click.option("--device-map", default=None, help=_h("dist", "device_map"))
@click.option("--fsdp", is_flag=True, help=_h("dist", "fsdp"))
@click.option("--dist-backend", type=click.Choice(["auto", "nccl", "gloo"]), default="auto", help=_h("dist", "backend"))
@click.option(
    "--trust-remote-code", is_flag=True, help="allow the model folder's own Python code (only if you trust it)"
)
@click.option("--output", "-o", required=True, help="output folder: adapter, metrics, loss.png, checkpoints/")
@click.option("--resume", is_flag=True, help="continue the run in --output from its last checkpoint")
@click.option("--overwrite", is_flag=True, help="replace a run already in --output")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or summary")
def train(
    task,
    data,
    model_name,
    method,
    num_virtual_tokens,
    template,
    init,
    init_text,
    encoder,
    encoder_hidden_size,
    max_steps,
    epochs,
    batch_size,
    grad_accumulation,
    lr,
    warmup_steps,
    schedule,
    max_grad_norm,
    max_length,
    eval_every,
    eval_limit,
    eval_generate,
    checkpoint_every,
    prefix_cache,
    train_limit,
    train_split,
    dev_split,
    src,
    tgt,
    seed,
    device,
    dtype,
    autocast,
    device_map,
    fsdp,
    dist_backend,
    trust_remote_code,
    output,
    resume,
    overwrite,
    quiet,
) -> None:
    """Train a soft prompt (prompt tuning or P-tuning) against a frozen causal LM.

    \b
    Example:
      softtool train --task translation --data ../shared/data/multi30k \\
        --method prompt --num-virtual-tokens 20 --max-steps 200 --output runs/de

    The output folder holds the adapter (PEFT-compatible), metrics.jsonl/.csv, loss.png and
    checkpoints/; Ctrl-C saves a checkpoint and --resume continues from it.

    \b
    Several GPUs or processes (--batch-size stays the global batch; see docs/distributed.md):
      torchrun --nproc_per_node 4 -m softtool train ...        # DDP, one GPU per process
      torchrun --nproc_per_node 4 -m softtool train --fsdp ... # base model sharded over the GPUs
      softtool train --device-map auto ...                     # one process over all GPUs
    """
    import torch

    from softtool.distributed import DistributedOptions
    from softtool.prompts.encoder import PromptConfig
    from softtool.training import DataOptions, TrainOptions, train_prompt

    if max_steps is None and epochs is None:
        max_steps = 300
    if lr is None:
        # A bare table needs large steps (Lester et al. use 0.3); the encoder's weights need small ones.
        lr = 0.03 if method == "prompt" else 1e-3
    try:
        prompt = PromptConfig(
            method=method,
            num_virtual_tokens=num_virtual_tokens,
            init=init,
            init_text=init_text,
            encoder=encoder,
            encoder_hidden_size=encoder_hidden_size,
            template=template,
        )
        options = TrainOptions(
            lr=lr,
            warmup_steps=warmup_steps,
            schedule=schedule,
            max_grad_norm=max_grad_norm,
            grad_accumulation=grad_accumulation,
            batch_size=batch_size,
            max_steps=max_steps or 0,
            epochs=epochs or 0.0,
            seed=seed,
            eval_every=eval_every,
            eval_limit=eval_limit,
            eval_generate=eval_generate,
            checkpoint_every=checkpoint_every,
            max_length=max_length,
            prefix_cache=prefix_cache,
            dtype=dtype,
            autocast=autocast,
            device=device,
        )
        data_opts = DataOptions(
            task=task,
            data=data,
            train_split=train_split,
            dev_split=dev_split,
            train_limit=train_limit,
            task_options={"src": src, "tgt": tgt} if task == "translation" else {},
        )
        dist_options = DistributedOptions(backend=dist_backend, device_map=device_map, fsdp=fsdp)
    except ValueError as exc:
        raise SofttoolError(f"bad option: {exc}") from exc
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    summary = train_prompt(
        data_opts,
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
