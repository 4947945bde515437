"""Rank classification on the slot cache: the log-likelihood of each of a few continuations (the labels) after each
prompt, the way lm-evaluation-harness and Lester et al. (2021) score classification.

It runs on a cache of its own (SlotModel.scratch_cache), so it can run between two decode steps of a server without
touching the rows being decoded. A prompt is computed once: every token but its last is prefilled into one slot (a task's shared virtual-token prefix
is copied in, as for generation), and that slot's cache is copied to one row per choice. One batched forward then
feeds each row the prompt's last token followed by its choice, and the model's target scoring
(`SlotModel._forward_scored`: the log-softmax gathered where the model runs) gives the log-prob of every choice token.
Starting from the prompt's last token is what lets the first choice token be scored like the others, so a graph that
returns only its top-k candidates (an export with --top-k) still scores every label exactly.

Per example that is one prefill of the prompt plus len(choices) short rows over its cache, where the usual peer runs
len(choices) full rows of prompt + label.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from softtool.errors import SofttoolError
from softtool.runtime.slots import SlotModel

# Rows (examples x choices) in one scoring forward.
DEFAULT_MAX_ROWS = 64


def score_choices(
    model: SlotModel,
    rows: Sequence[Sequence[int]],
    task_ids: Sequence[int],
    choices: Sequence[Sequence[int]],
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Per row (full ids, virtual ones included) and choice (token ids), the summed log-prob of the choice's tokens
    after the row: float64 [len(rows), len(choices)]. Rows are processed max_rows // len(choices) at a time.
    `timings`: where to add the seconds of the two parts, "prefill_s" (the prompts, and their caches copied to one
    row per choice) and "score_s" (the choices' forward), so a benchmark can say which one bounds it."""
    if not choices or any(len(c) == 0 for c in choices):
        raise ValueError("every choice needs at least one token")
    if any(len(r) == 0 for r in rows):
        raise ValueError("every row needs at least one token")
    if not model.can_score_prompt:
        raise SofttoolError(
            f"{getattr(model, 'where', 'this model')} cannot score labels (no target scoring in its graph); "
            "re-export it in the traced form"
        )
    out = np.zeros((len(rows), len(choices)), dtype=np.float64)
    per = max(1, max_rows // len(choices))
    for start in range(0, len(rows), per):
        part = [list(r) for r in rows[start : start + per]]
        out[start : start + len(part)] = _score_part(
            model, part, list(task_ids[start : start + per]), choices, timings if timings is not None else {}
        )
    return out


def _score_part(model: SlotModel, rows: list[list[int]], tasks: list[int], choices, timings: dict) -> np.ndarray:
    n_choices, width = len(choices), max(len(c) for c in choices)
    # Each row's prompt but its last token, then that token and the choice: positions up to len(row) - 1 + width.
    with model.scratch_cache(len(rows) * n_choices, max(map(len, rows)) + width + 1):
        t0 = time.perf_counter()
        firsts = [i * n_choices for i in range(len(rows))]
        model.prefill(firsts, [r[:-1] for r in rows], tasks, prompt_only_ok=True)
        source = torch.as_tensor(firsts, dtype=torch.long, device=model.kv_device).repeat_interleave(n_choices)
        for t in model.kv:
            t.copy_(t.index_select(0, source))
        total = len(rows) * n_choices
        ids = torch.full((total, width), model.pad_token_id, dtype=torch.long)
        positions = torch.full((total, width), model.scratch, dtype=torch.long)
        targets = torch.zeros((total, width), dtype=torch.long)
        for i, row in enumerate(rows):
            for j, choice in enumerate(choices):
                k = i * n_choices + j
                fed = [row[-1], *choice[:-1]]
                ids[k, : len(fed)] = torch.as_tensor(fed)
                positions[k, : len(fed)] = torch.arange(len(row) - 1, len(row) - 1 + len(fed))
                targets[k, : len(choice)] = torch.as_tensor(choice)
        t1 = time.perf_counter()
        _, scored = model._forward_scored(ids, positions, model.kv, targets)
        timings["prefill_s"] = timings.get("prefill_s", 0.0) + t1 - t0
        timings["score_s"] = timings.get("score_s", 0.0) + time.perf_counter() - t1
    logprobs = np.asarray(scored[0], dtype=np.float64).reshape(len(rows), n_choices, width)
    lengths = np.array([len(c) for c in choices])
    mask = np.arange(width)[None, :] < lengths[:, None]  # [choices, width]
    return (logprobs * mask[None]).sum(-1)
