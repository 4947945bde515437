"""What a run leaves for people to read: metrics.jsonl / metrics.csv, the loss plot, and the summary table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from softtool.fileio import atomic_write_bytes

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
LOSS_PLOT = "loss.png"


def write_metrics(output_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl and metrics.csv from the full history (one row per logged step or evaluation)."""
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    atomic_write_bytes(output_dir / METRICS_JSONL, lines.encode())
    columns = sorted({key for row in history for key in row}, key=lambda k: (k != "step", k != "kind", k))
    tmp = output_dir / f".{METRICS_CSV}.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(output_dir / METRICS_CSV)


def plot_loss(output_dir: Path, history: list[dict[str, Any]], title: str = "") -> Path:
    """Write loss.png (see `loss_figure`) into `output_dir`; returns its path."""
    fig = loss_figure(history, title)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    path = output_dir / LOSS_PLOT
    fig.savefig(path)
    plt.close(fig)
    return path


def loss_figure(history: list[dict[str, Any]], title: str = ""):
    """Training loss (raw and smoothed) and dev loss over optimizer steps, with each step's learning rate on a
    second y axis (right). Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
    dev = [(r["step"], r["dev_loss"]) for r in history if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train, strict=True)
        window = max(1, len(losses) // 20)
        if window > 1:  # with one point per window the smoothed line is the raw one
            ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss (per step)")
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(
            steps,
            smooth,
            color="tab:blue",
            linewidth=2,
            label=f"train loss (mean of {window} steps)" if window > 1 else "train loss",
        )
    if dev:
        steps, losses = zip(*dev, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="dev loss")
    handles, labels = ax.get_legend_handles_labels()
    rates = [(r["step"], r["lr"]) for r in history if r.get("kind") == "train" and "lr" in r]
    if rates:
        lr_ax = ax.twinx()
        steps, lrs = zip(*rates, strict=True)
        lr_ax.plot(steps, lrs, color="tab:gray", linestyle="--", linewidth=1.2, label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_ylim(bottom=0)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        more_handles, more_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per target token")
    ax.set_title(title or "soft prompt training")
    ax.grid(alpha=0.3)
    ax.legend(handles, labels)
    fig.tight_layout()
    return fig


def print_summary(rows: list[tuple[str, str]], title: str = "training summary") -> None:
    """A two-column table on stderr (rich), e.g. steps, time, best dev loss, where the files are."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    Console(stderr=True).print(table)
