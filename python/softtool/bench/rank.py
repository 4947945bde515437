"""The classify workload of `softtool bench` (task classify): rank classification of a dev set, softtool against
the usual peer.

The workload is a classify adapter's (its template and labels) on the first `limit` examples of a split: every
label is scored after every example (label + EOS, what a trained prompt learned; softtool.classify), and the
best label is the prediction. Every backend (softtool.bench.rank_backends: hf-rank, torch, onnx) gets the same
token rows in the same batches: the examples sorted by length and cut into `batch_size` examples each, as
`softtool eval` ranks them. So the peer scores as many examples per forward as softtool does (its forward then
holds batch_size x labels rows), and sorting keeps the padding of both small.

softtool.bench.runner runs the backends (each in a fresh process by default) and `compare_with_peer` adds to
each result its predictions, accuracy, speedup over hf-rank, and its agreement with the peer: the share of
identical predictions and the largest score difference (within `score_atol`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from softtool.bench.options import BenchOptions
from softtool.errors import SofttoolError

PEER = "hf-rank"


@dataclass
class RankWorkload:
    """What every backend ranks: the examples' full ids (virtual ones included), the labels' ids, the batches."""

    rows: list[list[int]]
    choices: list[list[int]]  # per label, its ids after the input, then EOS
    labels: list[str]
    references: list[str]  # the gold label of each row
    batches: list[list[int]]  # row indices, the rows sorted by length, batch_size a batch
    adapter_dir: Path
    task_options: dict[str, Any]
    template: str
    num_virtual_tokens: int
    vocab_size: int
    pad_token_id: int
    data_source: str
    truncated: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "adapter_dir": str(self.adapter_dir)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RankWorkload:
        return cls(**{**data, "adapter_dir": Path(data["adapter_dir"])})

    def model_tokens(self, shared_prompt: bool) -> int:
        """Tokens the model runs over the workload, padding excluded: the peer's example + label but its last
        token per (example, label); softtool's example but its last token once (shared_prompt), then per label
        the example's last token and the label but its last. A prefix prompt's virtual tokens run once for the
        whole workload there (their keys and values are copied into each row), other templates' once per row."""
        labels = sum(map(len, self.choices))
        if shared_prompt:
            from softtool.prompts.template import Template

            prefix = self.num_virtual_tokens if Template.parse(self.template).is_prefix else 0
            return prefix + sum(len(r) - 1 - prefix for r in self.rows) + len(self.rows) * labels
        return sum(len(self.choices) * len(r) for r in self.rows) + len(self.rows) * (labels - len(self.choices))


def build_rank_workload(options: BenchOptions, model, tokenizer) -> RankWorkload:
    """The classify adapter's task on the split's first `limit` examples, encoded as `softtool eval` encodes them."""
    from softtool.adapter import check_compatible, load_adapter
    from softtool.classify import label_choices, warn_unseen_labels
    from softtool.data import encode_example, get_task, load_split
    from softtool.prompts.template import Template, assemble_ids

    adapter = load_adapter(options.adapter)
    if adapter.meta.task != "classify":
        raise SofttoolError(
            f"adapter {options.adapter} is for task {adapter.meta.task}; the classify workload ranks the labels of a "
            "classify adapter (softtool train --task classify)"
        )
    check_compatible(adapter, model)
    task = get_task("classify", **adapter.meta.task_options)
    template = Template.parse(adapter.meta.template)
    split = load_split(options.data, options.split, task=task, limit=options.limit)
    examples = split.examples[: options.limit]
    if not examples:
        raise SofttoolError(f"{options.data}: split {options.split!r} has no examples")
    warn_unseen_labels(task, split)
    choices = label_choices(task, tokenizer, eos=True)
    vocab = model.get_input_embeddings().weight.shape[0]
    # softtool.classify.rank's budget: 512 tokens for the example and its longest label.
    budget = 512 - max(map(len, choices))
    encoded = [encode_example(tokenizer, template, task, ex, max_length=budget, with_target=False) for ex in examples]
    rows = [assemble_ids(template, e.pieces, vocab, 0) for e in encoded]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    truncated = sum(e.truncated for e in encoded)
    notes = [f"{truncated} example(s) longer than {budget} tokens were shortened, as eval does"] if truncated else []
    return RankWorkload(
        rows=rows,
        choices=choices,
        labels=list(task.labels),
        references=[ex.target.strip() for ex in examples],
        batches=[order[lo : lo + options.batch_size] for lo in range(0, len(order), options.batch_size)],
        adapter_dir=Path(options.adapter),
        task_options=dict(adapter.meta.task_options),
        template=str(template),
        num_virtual_tokens=template.num_virtual_tokens,
        vocab_size=vocab,
        pad_token_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        data_source=str(split.source or options.data),
        truncated=truncated,
        notes=notes,
    )


def compare_with_peer(results: list[dict[str, Any]], workload: RankWorkload, task, options: BenchOptions) -> None:
    """Add to each ok result its predictions, metrics, speedup over the peer, agreement with the peer's
    predictions and scores, and whether it met its target."""
    peer = next((r for r in results if r["name"] == PEER and r["status"] == "ok"), None)
    peer_scores = np.asarray(peer["scores"]) if peer else None
    targets = options.targets or {}
    for r in results:
        if r["status"] != "ok":
            continue
        scores = np.asarray(r["scores"])
        best = scores.argmax(axis=1)
        r["predictions"] = [workload.labels[int(i)] for i in best]
        r["metrics"] = dict(task.score(r["predictions"], [[ref] for ref in workload.references]))
        r["metric"] = r["metrics"].get("accuracy")
        r["speedup_vs_hf_rank"] = r["examples_per_s"] / peer["examples_per_s"] if peer else None
        if peer_scores is not None:
            same = best == peer_scores.argmax(axis=1)
            r["same_predictions_as_peer"] = float(same.mean())
            r["max_abs_score_diff_vs_peer"] = float(np.abs(scores - peer_scores).max())
            r["agrees_with_peer"] = bool(same.all()) and r["max_abs_score_diff_vs_peer"] <= options.score_atol
        if r["name"] in targets:
            r["target_speedup"] = targets[r["name"]]
            r["target_met"] = r["speedup_vs_hf_rank"] is not None and r["speedup_vs_hf_rank"] >= targets[r["name"]]
