"""Presenting a benchmark result: a rich table on the terminal, the JSON file, and a PNG bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from softtool.console import Column
from softtool.console import print_table as print_rows
from softtool.fileio import atomic_write_json

REQUIRED_BACKEND_KEYS = ("name", "status", "tokens_per_s", "speedup_vs_peft", "speedup_vs_hf", "speedup_vs_hf_cb")


def _fmt(value: Any, spec: str = ".1f", suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"


def where(result: dict[str, Any]) -> str:
    """The hardware a result ran on, in words: the CPU and its threads, or the GPU and the dtype."""
    opts, machine = result["options"], result["machine"]
    if opts.get("device", "cpu") != "cpu":
        return f"{machine.get('gpu') or opts['device']}, {opts.get('dtype', 'float32')}"
    return f"{opts['threads']} threads on {machine['cpu_model']}"


def _ratio(value: Any) -> str:
    return _fmt(value, ".2f", "x")


def print_table(result: dict[str, Any], console=None, path: str | None = None) -> None:
    """The result as a table (narrowed at small widths, see softtool.console), then skipped rows, limits, notes."""
    from rich.console import Console

    console = console or Console()
    if result.get("kind") == "train":
        print_train_table(result, console, path)
        return
    if result.get("kind") == "rank":
        print_rank_table(result, console, path)
        return
    opts, metric = result["options"], result.get("main_metric") or "metric"
    search = "greedy" if opts["num_beams"] == 1 else f"beam {opts['num_beams']}"
    title = (
        f"{opts['task']} x{result['workload']['examples']}, {opts['batch_size']} slots/batch, "
        f"{opts['max_new_tokens']} new tokens, {search}, {where(result)}"
    )
    columns = [
        Column("backend", "left", essential=True),
        Column("tok/s", essential=True),
        Column("ex/s"),
        Column("vs peft"),
        Column("vs hf", essential=True),
        Column("vs hf-cb", essential=True),
        Column("vs hf-embeds"),
        Column("vs hf-static"),
        Column("steps vs hf"),
        Column("ttft s"),
        Column("peak MB"),
        Column(metric, essential=True),
        Column("same"),
    ]
    rows = []
    for r in result["backends"]:
        if r["status"] != "ok":
            rows.append([r["name"], f"[yellow]{r['status']}[/yellow]"] + ["-"] * (len(columns) - 2))
            continue
        same = r.get("identical_share")
        name = r["name"] + (f" ({r['examples']})" if r.get("examples") != result["workload"]["examples"] else "")
        rows.append(
            [
                name,
                _fmt(r["tokens_per_s"]),
                _fmt(r.get("examples_per_s", r.get("sequences_per_s")), ".2f"),
                _ratio(r.get("speedup_vs_peft")),
                _ratio(r.get("speedup_vs_hf")),
                _ratio(r.get("speedup_vs_hf_cb")),
                _ratio(r.get("speedup_vs_hf_embeds")),
                _ratio(r.get("speedup_vs_hf_static")),
                _ratio(r.get("row_steps_speedup_vs_hf")),
                _fmt(r["ttft_s"], ".3f"),
                _fmt(r["peak_rss_mb"], ".0f"),
                _fmt(r.get("metric"), ".2f"),
                "-" if same is None else f"{same:.0%}",
            ]
        )
    print_rows(console, title, columns, rows, rest_in=path)
    reference = next((r.get("identical_to") for r in result["backends"] if r.get("identical_to")), None)
    legend = "tok/s: useful tokens (to EOS) per second; steps vs hf: rows x decode steps of static batches"
    if reference:
        legend += f"; same: outputs identical to {reference}"
    console.print(legend)
    for r in result["backends"]:
        if r["status"] != "ok":
            console.print(f"[yellow]{r['name']} {r['status']}:[/yellow] {r.get('reason', '')}")
    paid = [
        f"{r['name']} {r.get('capture_s') or 0:.2f} s capture (and compile), {r['warmup_s']:.2f} s warm-up"
        for r in result["backends"]
        if r["status"] == "ok" and "warmup_s" in r
    ]
    if paid:
        console.print("paid once, not timed: " + "; ".join(paid))
    limits = result.get("limits") or {}
    if limits:
        console.print(
            f"machine limits ({where(result)}): {limits['memory_bandwidth_gbs']:.1f} GB/s copy bandwidth, "
            f"{limits['matmul_gflops']:.0f} GFLOP/s matmul; batch-1 decode bound "
            f"{limits.get('decode_bound_tokens_per_s_batch1', 0):.0f} tok/s, prefill bound "
            f"{limits.get('prefill_bound_tokens_per_s', 0):.0f} tok/s"
        )
        for r in result["backends"]:
            if r["status"] == "ok" and "share_of_compute_bound_prefill" in r:
                bw = r.get("share_of_bandwidth_bound")
                console.print(
                    f"  {r['name']}: prefill at {r['share_of_compute_bound_prefill']:.0%} of the compute bound"
                    + (f", batch-1 decode at {bw:.0%} of the bandwidth bound" if bw is not None else "")
                )
    for note in result.get("notes", []):
        console.print(f"[bold]note:[/bold] {note}")


def print_rank_table(result: dict[str, Any], console, path: str | None = None) -> None:
    """The classify workload: examples/s, speedup over the peer (and the target), accuracy, agreement."""
    opts, workload, peer = result["options"], result["workload"], result.get("peer", "hf-rank")
    title = (
        f"classify x{workload['examples']} ({len(workload['labels'])} labels), {opts['batch_size']} examples/batch, "
        f"{where(result)}"
    )
    columns = [
        Column("backend", "left", essential=True),
        Column("ex/s", essential=True),
        Column(f"vs {peer}", essential=True),
        Column("target"),
        Column("accuracy", essential=True),
        Column(f"same as {peer}", essential=True),
        Column("max |d score|"),
        Column("load s"),
        Column("peak MB"),
    ]
    rows = []
    for r in result["backends"]:
        if r["status"] != "ok":
            rows.append([r["name"], f"[yellow]{r['status']}[/yellow]"] + ["-"] * (len(columns) - 2))
            continue
        target = "-"
        if "target_speedup" in r:
            target = f"{r['target_speedup']:.1f}x " + ("met" if r["target_met"] else "[red]missed[/red]")
        same = r.get("same_predictions_as_peer")
        rows.append(
            [
                r["name"],
                _fmt(r["examples_per_s"], ".2f"),
                _ratio(r.get("speedup_vs_hf_rank")),
                target,
                _fmt(r.get("metric"), ".2f"),
                "-" if same is None else f"{same:.0%}" + ("" if r.get("agrees_with_peer") else " [red]no[/red]"),
                _fmt(r.get("max_abs_score_diff_vs_peer"), ".1e"),
                _fmt(r["load_s"], ".1f"),
                _fmt(r["peak_rss_mb"], ".0f"),
            ]
        )
    print_rows(console, title, columns, rows, rest_in=path)
    tokens = workload["model_tokens"]
    console.print(
        f"ex/s: examples ranked per second (every label scored); same: predictions identical to {peer}'s, and "
        f"every label score within {opts['score_atol']:g} ('no' otherwise). Tokens the model runs: "
        + ", ".join(f"{name} {count:,}" for name, count in tokens.items())
    )
    for r in result["backends"]:
        if r["status"] != "ok":
            console.print(f"[yellow]{r['name']} {r['status']}:[/yellow] {r.get('reason', '')}")
    for note in result.get("notes", []):
        console.print(f"[bold]note:[/bold] {note}")


def print_train_table(result: dict[str, Any], console, path: str | None = None) -> None:
    opts = result["options"]
    title = f"training: {opts['task']}, batch {opts['batch_size']}, {opts['steps']} timed steps"
    columns = [
        Column("backend", "left", essential=True),
        Column("N", essential=True),
        Column("samples/s", essential=True),
        Column("tokens/s"),
        Column("vs peft", essential=True),
        Column("loss after K"),
        Column("agree", essential=True),
    ]
    rows = []
    for r in result["backends"]:
        if r["status"] != "ok":
            rows.append(
                [r["name"], str(r.get("num_virtual_tokens", "")), f"[yellow]{r['status']}[/yellow]"] + ["-"] * 4
            )
            continue
        rows.append(
            [
                r["name"],
                str(r["num_virtual_tokens"]),
                _fmt(r["samples_per_s"], ".2f"),
                _fmt(r["tokens_per_s"], ".0f"),
                _ratio(r.get("speedup_vs_peft")),
                _fmt(r["final_loss"], ".4f"),
                {True: "yes", False: "[red]no[/red]", None: "-"}[r.get("losses_agree")],
            ]
        )
    print_rows(console, title, columns, rows, rest_in=path)
    console.print("N: virtual tokens; agree: losses after K steps within the bench's tolerance of PEFT's")
    for r in result["backends"]:
        if r["status"] != "ok":
            console.print(f"[yellow]{r['name']} {r['status']}:[/yellow] {r.get('reason', '')}")


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    return path


def write_chart(result: dict[str, Any], path: str | Path) -> Path | None:
    """A bar chart of tokens/s per backend (skipped ones left out), with the speedup over PEFT on each bar
    (classify: examples/s and the speedup over hf-rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["backends"] if r["status"] == "ok"]
    if not ok:
        return None
    kind = result.get("kind")
    key = {"train": "samples_per_s", "rank": "examples_per_s"}.get(kind, "tokens_per_s")
    base = "hf-rank" if kind == "rank" else "peft"
    labels = [r["name"] + (f"\nN={r['num_virtual_tokens']}" if "num_virtual_tokens" in r else "") for r in ok]
    values = [r[key] for r in ok]
    fig, ax = plt.subplots(figsize=(1.4 * len(ok) + 2.5, 4))
    colors = ["#999999" if r["name"].startswith(("peft", "hf")) else "#2a7ab0" for r in ok]
    bars = ax.bar(labels, values, color=colors)
    for bar, r in zip(bars, ok, strict=True):
        speedup = r.get(f"speedup_vs_{base.replace('-', '_')}")
        text = f"{bar.get_height():.1f}" + (f"\n{speedup:.2f}x {base}" if speedup else "")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(key.replace("_per_s", "/s"))
    opts = result["options"]
    if kind == "train":
        ax.set_title(f"training step, {opts['task']}, batch {opts['batch_size']}")
    elif kind == "rank":
        ax.set_title(f"rank classification, {opts['batch_size']} examples a batch")
    else:
        search = "greedy" if opts["num_beams"] == 1 else f"beam {opts['num_beams']}"
        ax.set_title(f"{opts['task']}, batch {opts['batch_size']}, {opts['max_new_tokens']} new tokens, {search}")
    ax.margins(y=0.25)
    ax.text(
        1.0,
        -0.18,
        f"{where(result)}, commit {result['machine']['git_commit']}",
        transform=ax.transAxes,
        ha="right",
        fontsize=7,
        color="#555555",
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
