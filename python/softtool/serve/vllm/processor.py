"""softtool's decoding processors as a vLLM logits processor: no-repeat n-gram blocking and repetition penalty.

This module runs inside the vLLM server, not in softtool (it imports vLLM, and nothing of softtool): start vLLM with

    PYTHONPATH=<softtool>/python vllm serve MODEL --enable-prompt-embeds \
        --logits-processors softtool.serve.vllm.processor:SofttoolProcessor

(scripts/vllm_server.sh does). vLLM has no no-repeat n-gram, and its repetition penalty counts the prompt's token
ids, which a request made of `prompt_embeds` does not have. So softtool sends, per request, in `vllm_xargs`:
`softtool_ngram` (n, 0 off), `softtool_penalty` (1.0 off) and `softtool_history`, the row's ids (virtual ones as
V + t*N + j, which match only themselves); the history this processor reads is those ids, then the request's
output. Both rules are those of softtool's search (cpp/src/logits_processors.cc, transformers' processors value
for value): the penalty divides a positive logit or multiplies a negative one, once per distinct token seen; then
every token that would complete an n-gram already in the history is banned. A request without these arguments is
left alone.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

NGRAM, PENALTY, HISTORY = "softtool_ngram", "softtool_penalty", "softtool_history"


class SofttoolProcessor(LogitsProcessor):
    """Per batch row (vLLM's persistent-batch index): (n, penalty, the prompt's ids, the live output ids)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, tuple[int, float, list[int], list[int]]] = {}

    @classmethod
    def validate_params(cls, params) -> None:
        args = params.extra_args or {}
        if NGRAM in args and (not isinstance(args[NGRAM], int) or args[NGRAM] < 0):
            raise ValueError(f"{NGRAM} must be an integer >= 0")
        if PENALTY in args and (not isinstance(args[PENALTY], int | float) or args[PENALTY] <= 0):
            raise ValueError(f"{PENALTY} must be a number > 0")

    def is_argmax_invariant(self) -> bool:
        return False  # both rules can change the greedy choice

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:  # vLLM's documented order: removed, added, moved
            self.rows.pop(index, None)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            args = params.extra_args or {}
            n, penalty = int(args.get(NGRAM, 0)), float(args.get(PENALTY, 1.0))
            if n > 0 or penalty != 1.0:
                self.rows[index] = (n, penalty, [int(t) for t in args.get(HISTORY, [])], output_ids)
            else:
                self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            first, second = self.rows.pop(a, None), self.rows.pop(b, None)
            if first is not None:
                self.rows[b] = first
            if second is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = second

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[-1]
        for index, (n, penalty, prompt, output) in self.rows.items():
            history = prompt + list(output)
            row = logits[index]
            if penalty != 1.0:
                seen = torch.tensor(sorted({t for t in history if 0 <= t < vocab}), dtype=torch.long, device=row.device)
                if len(seen):
                    scores = row[seen]
                    row[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
            banned = [t for t in banned_tokens(history, n) if 0 <= t < vocab]
            if banned:
                row[torch.tensor(banned, dtype=torch.long, device=row.device)] = -float("inf")
        return logits


def banned_tokens(history: list[int], n: int) -> set[int]:
    """The tokens that would repeat an n-gram of `history`: the last token of every earlier n-gram whose first
    n - 1 tokens are the history's last n - 1."""
    if n <= 0 or len(history) < n:
        return set()
    tail = history[len(history) - (n - 1) :] if n > 1 else []
    return {history[s + n - 1] for s in range(len(history) - n + 1) if history[s : s + n - 1] == tail}
