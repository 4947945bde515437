"""Turning encoded examples into model inputs: token ids in the virtual-id convention (V + t*N + j),
right padding, and labels that mask everything except the target tokens.

Right padding keeps every row's real tokens contiguous with a shared prefix prompt, so the
prefix-cache path (softtool.training.forward) can use positions N + arange(T) for all rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from softtool.prompts.template import Template, assemble_ids

IGNORE = -100


@dataclass
class Feature:
    """One training row: the input ids (virtual ids included) and the target ids (EOS included)."""

    input_ids: list[int]
    target_ids: list[int]


def make_feature(
    template: Template, pieces: Sequence[Sequence[int]], target_ids: Sequence[int], vocab_size: int, task_id: int = 0
) -> Feature:
    return Feature(assemble_ids(template, pieces, vocab_size, task_id), list(target_ids))


@dataclass
class Batch:
    """A right-padded batch. With `prefix_tokens` > 0 the first that many ids of every row (the shared
    virtual prefix) were dropped from input_ids: the model sees them through the prefix cache."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, IGNORE except on target tokens
    prefix_tokens: int = 0

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.prefix_tokens
        )


def collate(features: Sequence[Feature], pad_id: int, prefix_tokens: int = 0) -> Batch:
    """Right-pad features into one batch; `prefix_tokens` drops that many leading (virtual) ids per row."""
    rows = [f.input_ids[prefix_tokens:] + f.target_ids for f in features]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (row, feat) in enumerate(zip(rows, features, strict=True)):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
        start = len(row) - len(feat.target_ids)
        labels[i, start : len(row)] = torch.tensor(feat.target_ids, dtype=torch.long)
    return Batch(ids, mask, labels, prefix_tokens)
