"""What a backend gives the decode loop: a KV cache of `slots` rows, each row its own sequence.

A backend (PyTorch in torch_backend, ONNX Runtime in onnx_backend) implements one method, `_forward`: run
the prompted model (softtool.runtime.slot_model) on some tokens at given positions over given cache rows,
writing their keys and values in place, and return the last position's logits (or top-k). Everything else
is shared and lives here:

    reserve(slots, capacity)        allocate the cache: per layer, keys and values [slots, kv_heads, capacity, head_dim]
    prefill(slots, rows, task_ids)  run the rows' prompts and write their cache into those slots -> head
    step(tokens, positions)         one token for each of the first len(tokens) slots -> head
    reorder(order)                  beam search: slot i continues slot order[i]
    prefill_scored(...)             prefill, plus each prompt token's log-prob given the tokens before it (echo)

A head is a tuple of numpy arrays: (logits [n, V],) or (topk_values [n, k], topk_indices [n, k]).

For a prefix template (every virtual token first) each task's prompt keys/values are computed once and
copied into a slot at prefill, so requests never re-run the prompt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from softtool.errors import SofttoolError
from softtool.prompts.template import Template
from softtool.runtime.logprobs import TokenLogprob, prompt_scores

Head = tuple[np.ndarray, ...]
Scored = tuple[np.ndarray, np.ndarray, np.ndarray]  # target log-probs [B, T], top values and ids [B, T, K]


class SlotModel(ABC):
    """The shared part of every backend: cache buffers, prefill, step and reorder over `_forward`."""

    template: Template
    tokenizer: object
    vocab_size: int
    num_virtual: int
    num_tasks: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_device: torch.device
    kv_dtype: torch.dtype
    pad_token_id: int
    precompute_prompt: bool = True

    def _init_slots(self) -> None:
        self.task_templates: dict[int, Template] = {}
        self.kv: list[torch.Tensor] = []
        self.capacity = 0
        self._prefix: list[torch.Tensor] | None = None

    # -- what a backend implements ------------------------------------------------------------------
    @abstractmethod
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, kv: Sequence[torch.Tensor]) -> Head:
        """Run tokens `ids` [B, S] at `positions` [B, S] over cache rows `kv` (per layer key, value, each
        [B, kv_heads, C, head_dim], contiguous), writing the new keys/values into them; return the head."""

    # A backend that can also score given target ids (slot_model.SlotLM's target_ids) says so and implements
    # _forward_scored; the ONNX backend can for exports of format 3 or later.
    can_score_prompt = False

    def _forward_scored(
        self, ids: torch.Tensor, positions: torch.Tensor, kv: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> tuple[Head, Scored]:
        """`_forward`, plus the log-prob of targets[b, s] after input position s (s < targets.shape[1]) and the
        top candidates there."""
        raise SofttoolError(f"{getattr(self, 'where', 'this model')} cannot score prompt tokens; re-export it")

    # -- cache --------------------------------------------------------------------------------------
    def _empty(self, rows: int, capacity: int) -> list[torch.Tensor]:
        shape = (rows, self.num_kv_heads, capacity, self.head_dim)
        return [torch.zeros(shape, dtype=self.kv_dtype, device=self.kv_device) for _ in range(2 * self.num_layers)]

    def reserve(self, slots: int, capacity: int) -> None:
        """A cache of `slots` rows of `capacity` positions (the last one is scratch); reused when big enough."""
        if slots < 1 or capacity < 2:
            raise ValueError(f"need at least one slot and two positions, got {slots} x {capacity}")
        if self.kv and self.kv[0].shape[0] == slots and self.kv[0].shape[2] == capacity:
            return
        self.kv = []  # free the old cache before allocating the new one
        self.kv = self._empty(slots, capacity)
        self.capacity = capacity

    def template_of(self, task: int) -> Template:
        """Task `task`'s template: its own when it differs from `template` (several adapters or an export's
        tasks in one generator), else `template`."""
        return self.task_templates.get(int(task), self.template)

    @property
    def shares_prefix(self) -> bool:
        """Whether every task's virtual tokens come first, so their keys/values are computed once per task."""
        templates = [self.template_of(t) for t in range(max(self.num_tasks, 1))]
        return bool(self.precompute_prompt and self.num_virtual and all(t.is_prefix for t in templates))

    def prompt_changed(self) -> None:
        """Drop the per-task prompt cache (the prompt table changed)."""
        self._prefix = None

    def _prefix_kv(self) -> list[torch.Tensor]:
        """Every task's prompt keys/values [tasks, kv_heads, N, head_dim] per layer (computed once)."""
        if self._prefix is None:
            n, tasks = self.num_virtual, self.num_tasks
            ids = self.vocab_size + torch.arange(tasks * n, dtype=torch.long).view(tasks, n)
            positions = torch.arange(n, dtype=torch.long).expand(tasks, n).contiguous()
            kv = self._empty(tasks, n + 1)
            self._forward(ids, positions, kv)
            self._prefix = [t[:, :, :n].clone() for t in kv]
        return self._prefix

    # -- the three operations ------------------------------------------------------------------------
    def prefill(self, slots: Sequence[int], rows: Sequence[Sequence[int]], task_ids: Sequence[int]) -> Head:
        """Run `rows` (full ids, virtual ones included) and leave their cache in `slots`; returns their head.

        The rows run together, left-padded, on a temporary cache (padding goes to its scratch column), and
        each row's entries are then copied into its slot.
        """
        return self._prefill(slots, rows, task_ids, score=False)[0]

    def prefill_scored(
        self, slots: Sequence[int], rows: Sequence[Sequence[int]], task_ids: Sequence[int]
    ) -> tuple[Head, list[list[TokenLogprob | None]]]:
        """`prefill`, plus per row and position the token's log-prob given the tokens before it and the best
        candidates there (runtime.logprobs.prompt_scores: None for virtual tokens and the first scored-less one)."""
        if not self.can_score_prompt:
            raise SofttoolError(f"{getattr(self, 'where', 'this model')} cannot score prompt tokens; re-export it")
        return self._prefill(slots, rows, task_ids, score=True)

    def _prefill(self, slots, rows, task_ids, score: bool) -> tuple[Head, list[list[TokenLogprob | None]]]:
        n = self.num_virtual if self.shares_prefix else 0
        texts = [list(row[n:]) for row in rows]
        width = max(len(t) for t in texts)
        if width == 0:
            raise SofttoolError("every row is empty after the prompt; give some input text")
        lengths = [n + len(t) for t in texts]
        if max(lengths) > self.capacity - 1:
            raise SofttoolError(f"an input of {max(lengths)} tokens does not fit the cache ({self.capacity - 1})")
        scratch = n + width
        temp = self._empty(len(rows), scratch + 1)
        if n:
            tasks = torch.as_tensor(list(task_ids), dtype=torch.long, device=self.kv_device)
            for buf, prompt in zip(temp, self._prefix_kv(), strict=True):
                buf[:, :, :n] = prompt.index_select(0, tasks)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        positions = torch.full((len(rows), width), scratch, dtype=torch.long)
        for i, text in enumerate(texts):
            if text:
                ids[i, width - len(text) :] = torch.as_tensor(text, dtype=torch.long)
                positions[i, width - len(text) :] = torch.arange(n, n + len(text))
        scores: list[list[TokenLogprob | None]] = []
        if score:
            # Column c is scored on the id in column c + 1; virtual ids are scored as 0 and their values dropped.
            targets = ids[:, 1:].masked_fill(ids[:, 1:] >= self.vocab_size, 0)
            head, scored = self._forward_scored(ids, positions, temp, targets)
            scores = [
                prompt_scores(row, n, width - len(text), scored, i, self.vocab_size)
                for i, (row, text) in enumerate(zip(rows, texts, strict=True))
            ]
        else:
            head = self._forward(ids, positions, temp)
        for i, (slot, length) in enumerate(zip(slots, lengths, strict=True)):
            for dst, src in zip(self.kv, temp, strict=True):
                dst[slot, :, :length] = src[i, :, :length]
        return head, scores

    # A backend that can run on strided views of the cache (PyTorch) attends only to the columns in use;
    # ONNX Runtime binds contiguous memory, so it gets whole rows.
    views_ok = False

    def step(self, tokens: np.ndarray, positions: np.ndarray) -> Head:
        """Feed token[i] at positions[i] to slot i, for the first len(tokens) slots; returns their head.

        A slot at the scratch position is idle: it computes a pad token whose entry nobody reads.
        """
        rows = len(tokens)
        positions = np.asarray(positions, dtype=np.int64)
        kv = [t[:rows] for t in self.kv]
        if self.views_ok:
            busy = positions[positions != self.scratch]
            width = int(busy.max()) + 1 if len(busy) else 1
            if width < self.capacity:
                # Only columns 0..width-1 hold anything a busy row attends to; an idle row writes its pad
                # token into the last of them (its own row, never read before a prefill overwrites it).
                positions = np.where(positions == self.scratch, width - 1, positions)
                kv = [t[:, :, :width] for t in kv]
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).view(rows, 1)
        pos = torch.as_tensor(positions).view(rows, 1)
        return self._forward(ids, pos, kv)

    def reorder(self, order: np.ndarray) -> None:
        """Beam search: slot i takes the cache of slot order[i] (for the first len(order) slots)."""
        index = torch.as_tensor(np.asarray(order, dtype=np.int64), device=self.kv_device)
        for t in self.kv:
            t[: len(index)] = t.index_select(0, index)

    @property
    def scratch(self) -> int:
        """The cache column that absorbs writes nobody reads (padding, idle slots)."""
        return self.capacity - 1
