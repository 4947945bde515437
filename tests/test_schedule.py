"""The learning-rate schedule is transformers' `get_scheduler` (linear, cosine, constant, each with warmup), it is
chosen with --lr-scheduler (or its older name --schedule), and loss.png plots it on a second axis."""

from __future__ import annotations

import json

import click
import pytest
import torch

from softtool.training import DataOptions, TrainOptions, train_prompt
from softtool.training.options import SCHEDULES
from softtool.training.report import loss_figure

SOURCES = ["A man rides a bike.", "Two dogs play.", "A girl reads.", "The cat sleeps."]
TARGETS = ["Ein Mann fährt Rad.", "Zwei Hunde spielen.", "Ein Mädchen liest.", "Die Katze schläft."]


def transformers_lrs(name: str, lr: float, warmup: int, steps: int) -> list[float]:
    """The learning rate of each step as transformers' own scheduler gives it."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_a_run_steps_with_transformers_learning_rates(tmp_path, tiny_model_dir, schedule):
    from softtool.prompts.encoder import PromptConfig

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"{split}.en").write_text("\n".join(SOURCES) + "\n")
        (data / f"{split}.de").write_text("\n".join(TARGETS) + "\n")
    options = TrainOptions(
        lr=0.1, warmup_steps=2, schedule=schedule, max_steps=6, batch_size=2, eval_every=0, eval_limit=2,
        checkpoint_every=0, max_length=48, device="cpu",
    )  # fmt: skip
    train_prompt(
        DataOptions(task="translation", data=str(data), task_options={"src": "en", "tgt": "de"}),
        PromptConfig(num_virtual_tokens=2),
        options,
        tmp_path / "out",
        model_name=str(tiny_model_dir),
        progress=False,
    )
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    logged = [row["lr"] for row in rows if row["kind"] == "train"]
    want = transformers_lrs(SCHEDULES[schedule], 0.1, 2, 6)
    assert logged == pytest.approx(want, rel=1e-12, abs=0)
    assert logged[0] == 0.0 and logged[2] == pytest.approx(0.1)  # warmup rises from 0 to the full rate


def test_lr_scheduler_is_the_flag_and_schedule_still_works():
    from softtool.cli.train import train

    base = ["--task", "translation", "--data", "d", "--output", "o"]
    for flag in ("--lr-scheduler", "--schedule"):
        ctx = train.make_context("train", [*base, flag, "cosine"])
        assert ctx.params["schedule"] == "cosine"
    with pytest.raises(click.BadParameter, match="cosine_with_restarts"):
        train.make_context("train", [*base, "--lr-scheduler", "cosine_with_restarts"])
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainOptions(max_steps=1, schedule="warmup_stable_decay")


def test_loss_plot_shows_the_learning_rate_on_a_second_axis():
    lrs = transformers_lrs("cosine", 0.03, 3, 12)
    history = [{"kind": "train", "step": s + 1, "loss": 3.0 - 0.1 * s, "lr": lr} for s, lr in enumerate(lrs)]
    history.append({"kind": "eval", "step": 12, "dev_loss": 2.5})
    fig = loss_figure(history, "run")
    loss_ax, lr_ax = fig.axes
    assert lr_ax.get_ylabel() == "learning rate" and loss_ax.get_ylabel().startswith("cross-entropy")
    (line,) = lr_ax.get_lines()
    assert list(line.get_ydata()) == lrs and list(line.get_xdata()) == list(range(1, 13))
    assert "learning rate" in [t.get_text() for t in loss_ax.get_legend().get_texts()]
