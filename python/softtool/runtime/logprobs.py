"""Log-probabilities of tokens as the decode loop reports them (OpenAI's `logprobs` and `echo`).

Every value is the model's own log-probability: the log-softmax of its raw logits (after a final logit
soft-capping, which is part of the model), before anything the search applies (repetition penalty, n-gram
blocking, temperature, top-p, top-k). It says what a token is worth to the model, not how the search chose it.

- Generated tokens are scored from the rows the engine already has: the head of the prefill or step that chose
  them (full logits, or the log-probs of a top-k head), so no second model runs.
- Prompt tokens (`echo`) are scored by the prefill itself (`SlotModel.prefill_scored`): the model gathers the
  log-prob of each next input token from its log-softmax and returns it with the SCORE_TOP_K best candidates at
  that position, so full logits for every position never leave it (in an export: never leave the graph).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from softtool.export_meta import SCORE_TOP_K

# The largest `logprobs: k`: the candidates a prompt position is scored with, and OpenAI's maximum.
MAX_LOGPROBS = SCORE_TOP_K


@dataclass
class TokenLogprob:
    """One token and its log-prob given the tokens before it, with the k best candidates at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, log-prob), best first

    def keep(self, k: int) -> TokenLogprob:
        return TokenLogprob(self.token, self.logprob, self.top[:k])


def from_head(head: tuple[np.ndarray, ...], row: int, token: int, k: int) -> TokenLogprob:
    """Score `token` with row `row` of a head: (logits [n, V],) or (top-k log-probs [n, K], their ids [n, K]).

    A top-k head already holds log-probs over the whole vocabulary; the search draws from those K ids only, so the
    chosen token is among them.
    """
    if k > MAX_LOGPROBS:
        raise ValueError(f"logprobs k must be at most {MAX_LOGPROBS}, got {k}")
    if len(head) == 2:
        values, ids = head[0][row], head[1][row]
        hits = np.flatnonzero(ids == token)
        if not len(hits):
            raise ValueError(f"token {token} is not among the head's {len(ids)} candidates")
        order = np.argsort(-values, kind="stable")[:k]
        return TokenLogprob(int(token), float(values[hits[0]]), [(int(ids[i]), float(values[i])) for i in order])
    logits = np.asarray(head[0][row], dtype=np.float64)
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top: list[tuple[int, float]] = []
    if k:
        best = np.argpartition(-logprobs, k - 1)[:k]
        best = best[np.argsort(-logprobs[best], kind="stable")]
        top = [(int(i), float(logprobs[i])) for i in best]
    return TokenLogprob(int(token), float(logprobs[token]), top)


def prompt_scores(
    row: Sequence[int],
    text_start: int,
    column: int,
    scored: tuple[np.ndarray, np.ndarray, np.ndarray],
    batch_row: int,
    vocab_size: int,
) -> list[TokenLogprob | None]:
    """Per position of `row` (full ids), its TokenLogprob, or None for a virtual token and for a token with nothing
    scored before it (the row's first, or the first after a shared prefix, whose logits the prefill never computes).

    The prefill ran row[text_start:] with its first token in input column `column`; `scored` is the model's
    (target log-probs [B, T], top values [B, T, K], top ids [B, T, K]), position c scoring the token in column c + 1.
    """
    chosen, values, ids = (np.asarray(a[batch_row]) for a in scored)
    out: list[TokenLogprob | None] = [None] * len(row)
    for p in range(text_start + 1, len(row)):
        token = int(row[p])
        if token >= vocab_size:
            continue
        c = column + (p - text_start) - 1  # the column whose output predicts position p
        top = [(int(i), float(v)) for i, v in zip(ids[c], values[c], strict=True)]
        out[p] = TokenLogprob(token, float(chosen[c]), top)
    return out
