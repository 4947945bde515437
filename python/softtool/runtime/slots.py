"""What a backend gives the decode loop: a KV cache of `slots` rows, each row its own sequence.

A backend (PyTorch in torch_backend, ONNX Runtime in onnx_backend) implements one method, `_forward`: run
the prompted model (softtool.runtime.slot_model) on some tokens at given positions over given cache rows,
writing their keys and values in place, and return the last position's logits (or top-k). Everything else
is shared and lives here:

    reserve(slots, capacity)        allocate the cache: per layer, keys and values [slots, kv_heads, capacity, head_dim]
    prefill(slots, rows, task_ids)  run the rows' prompts and write their cache into those slots -> head
    step(tokens, positions)         one token for each of the first len(tokens) slots -> head
    reorder(order)                  beam search: slot i continues slot order[i]
    beam_step(st, tokens, order)    the same on the static step: reorder on the device, then the step
    prefill_scored(...)             prefill, plus each prompt token's log-prob given the tokens before it (echo)

A head is a tuple of numpy arrays: (logits [n, V],) or (topk_values [n, k], topk_indices [n, k]).

For a prefix template (every virtual token first) each task's prompt keys/values are computed once and
copied into a slot at prefill, so requests never re-run the prompt: the rows' texts run together over their
tasks' prompts, or in the gqa form (right_padded_prefill) one row per call, as a chunk after its prompt.

A prefill runs at the rows' own width, or (`buckets`) at a fixed (rows, length) shape on buffers kept per
shape (static_step.prefill_shape): what a backend captures on cuda as it captures the decode step.

The static step (softtool.runtime.static_step) is the other way to decode: fixed buffers per (slots,
capacity), one step per slot bucket, the tokens and positions kept on the device and advanced by the step
itself, captured as a CUDA graph on cuda. A backend gives it `_device_head` (the step's head as device
tensors) and, on cuda, `_capture`.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from softtool.errors import SofttoolError
from softtool.prompts.template import Template
from softtool.runtime import static_step
from softtool.runtime.logprobs import TokenLogprob, prompt_scores
from softtool.runtime.static_step import PrefillBuffers, StaticSlots

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
    top_k: int = 0  # >0: the head is the top-k log-probs and ids
    # Prefill pads on the right over a cache exactly as wide as the rows (GroupQueryAttention's first prompt)
    # instead of on the left into the scratch column.
    right_padded_prefill: bool = False
    cuda_graphs: bool = True  # capture the static step on cuda
    stream = None  # on cuda, the torch stream every static engine of this model runs on

    def _init_slots(self) -> None:
        self.task_templates: dict[int, Template] = {}
        self.kv: list[torch.Tensor] = []
        self.capacity = 0
        self._prefix: list[torch.Tensor] | None = None
        self._static: dict[tuple[int, int], StaticSlots] = {}
        self._prefill_shapes: dict[tuple[int, int, int], PrefillBuffers] = {}  # (rows, length, prefix) -> buffers

    # -- what a backend implements ------------------------------------------------------------------
    @abstractmethod
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, kv: Sequence[torch.Tensor]) -> Head:
        """Run tokens `ids` [B, S] at `positions` [B, S] over cache rows `kv` (per layer key, value, each
        [B, kv_heads, C, head_dim], contiguous), writing the new keys/values into them; return the head."""

    def _device_head(self, st: StaticSlots, bucket: int) -> tuple[torch.Tensor, ...]:
        """The static step's head for slots [:bucket] of `st` as device tensors (a backend that supports the
        static step implements it): the model run on st.tokens, st.positions and st.kv, cache written in place."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def _capture(self, st: StaticSlots, body) -> None:
        """Make st.steps replay a captured graph of `body(bucket)` per bucket (on cuda; torch's by default)."""
        static_step.capture_graphs(st, body)

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

    @contextlib.contextmanager
    def scratch_cache(self, slots: int, capacity: int):
        """A fresh cache of `slots` x `capacity` for work beside decoding (rank classification between two decode
        steps of a server); the cache in use, with the rows being decoded, is put back afterwards untouched."""
        saved = (self.kv, self.capacity)
        self.kv, self.capacity = self._empty(slots, capacity), capacity
        try:
            yield
        finally:
            self.kv, self.capacity = saved

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
        """Drop the per-task prompt cache (the prompt table changed) and capture the kept static steps again
        (a captured graph reads the table it was captured with)."""
        self._prefix = None
        for pf in self._prefill_shapes.values():
            pf.captured = None  # captured again at their next use
        for st in self._static.values():
            st.beam_steps.clear()  # captured again by the next beam search (static_slots with beams)
            if st.captured:
                with self.stream_context():
                    self._capture(st, st.body)

    def _prefix_kv(self) -> list[torch.Tensor]:
        """Every task's prompt keys/values [tasks, kv_heads, N, head_dim] per layer (computed once)."""
        if self._prefix is None:
            n, tasks = self.num_virtual, self.num_tasks
            ids = self.vocab_size + torch.arange(tasks * n, dtype=torch.long).view(tasks, n)
            positions = torch.arange(n, dtype=torch.long).expand(tasks, n).contiguous()
            # GroupQueryAttention takes a prompt as a first prompt only over a cache exactly as wide (several rows
            # over a wider one would be a chunk after a past, which it takes for one row alone).
            kv = self._empty(tasks, n if self.right_padded_prefill else n + 1)
            self._forward(ids, positions, kv)
            self._prefix = [t[:, :, :n].clone() for t in kv]
        return self._prefix

    # -- the three operations ------------------------------------------------------------------------
    def prefill(
        self,
        slots: Sequence[int],
        rows: Sequence[Sequence[int]],
        task_ids: Sequence[int],
        *,
        prompt_only_ok=False,
        buckets: bool = False,
    ) -> Head | None:
        """Run `rows` (full ids, virtual ones included) and leave their cache in `slots`; returns their head.

        The rows run together, left-padded, on a temporary cache (padding goes to its scratch column), and
        each row's entries are then copied into its slot; with a shared prefix only the text runs, over the task's
        prompt keys/values copied in first. `prompt_only_ok`: rows that are only their task's shared prompt are
        allowed (rank classification prefills all but a prompt's last token); the slots then get the prompt's
        keys/values and the head is None. `buckets`: run at a fixed (rows, length) shape (static_step.prefill_shape)
        on buffers kept per shape, which a backend may capture on cuda; the same tokens as the exact shape.
        """
        return self._prefill(slots, rows, task_ids, score=False, prompt_only_ok=prompt_only_ok, buckets=buckets)[0]

    def prefill_scored(
        self, slots: Sequence[int], rows: Sequence[Sequence[int]], task_ids: Sequence[int]
    ) -> tuple[Head, list[list[TokenLogprob | None]]]:
        """`prefill`, plus per row and position the token's log-prob given the tokens before it and the best
        candidates there (runtime.logprobs.prompt_scores: None for virtual tokens and the first scored-less one)."""
        if not self.can_score_prompt:
            raise SofttoolError(f"{getattr(self, 'where', 'this model')} cannot score prompt tokens; re-export it")
        return self._prefill(slots, rows, task_ids, score=True)

    def _prefill(
        self, slots, rows, task_ids, score: bool, prompt_only_ok: bool = False, buckets: bool = False
    ) -> tuple[Head | None, list[list[TokenLogprob | None]]]:
        n = self.num_virtual if self.shares_prefix else 0
        texts = [list(row[n:]) for row in rows]
        width = max(len(t) for t in texts)
        if width == 0 and n and prompt_only_ok and not score:
            index = torch.as_tensor(list(slots), dtype=torch.long, device=self.kv_device)
            tasks = torch.as_tensor(list(task_ids), dtype=torch.long, device=self.kv_device)
            for dst, prompt in zip(self.kv, self._prefix_kv(), strict=True):
                dst[:, :, :n].index_copy_(0, index, prompt.index_select(0, tasks))
            return None, []
        if width == 0:
            raise SofttoolError("every row is empty after the prompt; give some input text")
        lengths = [n + len(t) for t in texts]
        if max(lengths) > self.capacity - 1:
            raise SofttoolError(f"an input of {max(lengths)} tokens does not fit the cache ({self.capacity - 1})")
        if n and self.right_padded_prefill:
            return self._prefill_chunks(slots, texts, task_ids, n, buckets), []
        if buckets and not score:
            rows_b, width_b = static_step.prefill_shape(
                len(rows), width, self.kv[0].shape[0], self.capacity - n - (0 if self.right_padded_prefill else 1)
            )
            pf = self._prefill_buffers(rows_b, width_b, n)
        else:
            pf = PrefillBuffers(*self._prefill_inputs(len(rows), width, n))
        ids, positions, temp = pf.ids, pf.positions, pf.kv
        ids.fill_(self.pad_token_id)
        if self.right_padded_prefill:
            # Rows from column 0, padding after them at position -1 (the graph takes each row's largest position
            # as its last token), over a cache exactly as wide as the rows.
            positions.fill_(-1)
            for i, text in enumerate(texts):
                ids[i, : len(text)] = torch.as_tensor(text, dtype=torch.long)
                positions[i, : len(text)] = torch.arange(len(text))
        else:
            scratch = temp[0].shape[2] - 1
            if n:
                # Rows past the real ones (a bucket's) take task 0's prompt: they only compute into scratch.
                chosen = list(task_ids) + [0] * (ids.shape[0] - len(rows))
                tasks = torch.as_tensor(chosen, dtype=torch.long, device=self.kv_device)
                for buf, prompt in zip(temp, self._prefix_kv(), strict=True):
                    buf[:, :, :n] = prompt.index_select(0, tasks)
            positions.fill_(scratch)
            cols = ids.shape[1]
            for i, text in enumerate(texts):
                if text:
                    ids[i, cols - len(text) :] = torch.as_tensor(text, dtype=torch.long)
                    positions[i, cols - len(text) :] = torch.arange(n, n + len(text))
        scores: list[list[TokenLogprob | None]] = []
        if score:
            # Column c is scored on the id in column c + 1; virtual ids are scored as 0 and their values dropped.
            targets = ids[:, 1:].masked_fill(ids[:, 1:] >= self.vocab_size, 0)
            head, scored = self._forward_scored(ids, positions, temp, targets)
            scores = [
                prompt_scores(row, n, 0 if self.right_padded_prefill else width - len(text), scored, i, self.vocab_size)
                for i, (row, text) in enumerate(zip(rows, texts, strict=True))
            ]
        else:
            head = self._run_prefill(pf)
            head = tuple(a[: len(rows)] for a in head)
        # One copy per layer tensor for all rows, the temporary cache's whole width: past a row's length it holds
        # padding or nothing, columns the row writes (at its positions) before it ever reads them.
        index = torch.as_tensor(list(slots), dtype=torch.long, device=self.kv_device)
        for dst, src in zip(self.kv, temp, strict=True):
            dst[:, :, : src.shape[2]].index_copy_(0, index, src[: len(rows)])
        return head, scores

    def _prefill_chunks(self, slots, texts, task_ids, n: int, buckets: bool) -> Head:
        """A shared prefix in the gqa form (export/gqa.py): one call per row, its text as a chunk over the task's
        prompt keys/values (GroupQueryAttention takes a chunk after a past for one row at a time), right-padded to a
        fixed length when `buckets`, its padding at -(p+1) so that seqlens_k places the chunk after the prompt."""
        prefix = self._prefix_kv()
        heads = []
        for slot, text, task in zip(slots, texts, task_ids, strict=True):
            length = static_step.prefill_length(len(text), self.capacity - n) if buckets else len(text)
            pf = self._prefill_buffers(1, length, n) if buckets else PrefillBuffers(*self._prefill_inputs(1, length, n))
            pf.ids.fill_(self.pad_token_id)
            pf.ids[0, : len(text)] = torch.as_tensor(text, dtype=torch.long)
            columns = torch.arange(n, n + length)
            pf.positions[0] = torch.where(columns < n + len(text), columns, -1 - columns)
            for buf, prompt in zip(pf.kv, prefix, strict=True):
                buf[:, :, :n] = prompt[int(task)]
            heads.append(self._run_prefill(pf))
            for dst, src in zip(self.kv, pf.kv, strict=True):
                dst[int(slot), :, : src.shape[2]] = src[0]
        return tuple(np.concatenate(parts) for parts in zip(*heads, strict=True))

    def _prefill_inputs(self, rows: int, width: int, n: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """A prefill's ids and positions [rows, width] and its temporary cache: as wide as the rows in the gqa form
        (after the prefix for a chunk), else prefix, rows and a scratch column."""
        cache = n + width + (0 if self.right_padded_prefill else 1)
        ids = torch.empty((rows, width), dtype=torch.long)
        return ids, torch.empty_like(ids), self._empty(rows, cache)

    def _prefill_buffers(self, rows: int, width: int, n: int) -> PrefillBuffers:
        """The fixed buffers of one prefill bucket, made once and kept (a captured prefill reads them)."""
        key = (rows, width, n)
        pf = self._prefill_shapes.get(key)
        if pf is None:
            pf = self._prefill_shapes[key] = PrefillBuffers(*self._prefill_inputs(rows, width, n))
        return pf

    def _run_prefill(self, pf: PrefillBuffers) -> Head:
        """A prefill's forward on its buffers; a backend replays a captured graph of it per bucket on cuda."""
        return self._forward(pf.ids, pf.positions, pf.kv)

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

    # -- the static step ------------------------------------------------------------------------------
    def stream_context(self):
        """Where an engine's device work runs: the model's stream on cuda (shared with ONNX Runtime and the
        captured graphs), nothing special on the CPU."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def static_slots(self, slots: int, capacity: int, beams: bool = False) -> StaticSlots:
        """The fixed buffers of a static engine of `slots` rows and at least `capacity` positions, every slot
        idle: kept ones when there are (the smallest that fits), else new ones, captured on cuda. They become
        the cache prefill writes into. `beams`: with beam search's step too (reorder, then the step), made (and
        captured) now while every slot is idle."""
        fits = [st for (n, c), st in self._static.items() if n == slots and c >= capacity]
        st = min(fits, key=lambda s: s.capacity) if fits else self._make_static(slots, capacity)
        self.kv, self.capacity = st.kv, st.capacity
        with self.stream_context():
            st.reset(self.pad_token_id)
            if beams and not st.beam_steps:
                st.order.copy_(torch.arange(slots, device=self.kv_device))
                self._make_beam_steps(st)
        return st

    def _make_beam_steps(self, st: StaticSlots) -> None:
        """st.beam_steps: per bucket, the reorder on the device then the bucket's step (captured, where the step
        is, by a backend that captures both as one graph; here the step's own capture follows the reorder)."""

        def run(bucket: int):
            static_step.reorder_rows(st, bucket)
            return st.steps[bucket]()

        st.beam_steps.update({b: functools.partial(run, b) for b in st.buckets})

    def beam_step(self, st: StaticSlots, tokens: np.ndarray, order: np.ndarray | None) -> Head:
        """Beam search's step on the static buffers for the first len(tokens) slots: slot i continues slot order[i]
        (None: every slot its own), then takes token[i]; returns their head. Run in stream_context."""
        rows = len(tokens)
        bucket = st.bucket(rows)
        st.tokens[:rows, 0] = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).to(self.kv_device)
        if order is None:
            full, _ = st.steps[bucket]()
        else:
            whole = np.concatenate([np.asarray(order, dtype=np.int64), np.arange(rows, bucket)])
            st.order[:bucket] = torch.as_tensor(whole).to(self.kv_device)
            full, _ = st.beam_steps[bucket]()
        head = static_step.split_head(static_step.to_host(st, bucket, "full", full), self.top_k)
        return tuple(np.ascontiguousarray(a[:rows]) for a in head)

    def _make_static(self, slots: int, capacity: int) -> StaticSlots:
        capacity = static_step.round_capacity(capacity)
        cuda = self.kv_device.type == "cuda"
        if cuda and self.stream is None:
            self.stream = torch.cuda.Stream(self.kv_device)
        with self.stream_context():
            st = StaticSlots(
                slots=slots,
                capacity=capacity,
                kv=self._empty(slots, capacity),
                tokens=torch.full((slots, 1), self.pad_token_id, dtype=torch.long, device=self.kv_device),
                positions=torch.full((slots, 1), capacity - 1, dtype=torch.long, device=self.kv_device),
                buckets=static_step.slot_buckets(slots),
                order=torch.arange(slots, device=self.kv_device),
                stream=self.stream,
                event=torch.cuda.Event() if cuda else None,
            )

        def body(bucket: int):
            head = self._device_head(st, bucket)
            return static_step.advance(head, st.tokens[:bucket], st.positions[:bucket], st.scratch)

        st.body = body
        if cuda and self.cuda_graphs:
            with self.stream_context():
                self._capture(st, body)
        else:
            st.steps = {b: functools.partial(body, b) for b in st.buckets}
        self._static[(slots, capacity)] = st
        return st

    @property
    def capture_seconds(self) -> float:
        """Time spent capturing static steps (once per kept engine)."""
        return sum(st.capture_seconds for st in self._static.values())

    def static_step(self, st: StaticSlots, bucket: int, greedy_only: bool) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """One static step over slots [:bucket]; returns (head, each row's greedy id) on the host. greedy_only:
        the head is each row's greedy choice alone ([b, 1] log-prob and id), all that plain greedy search reads."""
        with self.stream_context():
            full, top1 = st.steps[bucket]()
            if greedy_only:
                host = static_step.to_host(st, bucket, "top1", top1)
                head = (np.ascontiguousarray(host[:, :1]), host[:, 1:].astype(np.int64))
            else:
                head = static_step.split_head(static_step.to_host(st, bucket, "full", full), self.top_k)
        best = head[1][:, 0] if len(head) == 2 else head[0].argmax(axis=-1)
        return head, best

    def set_slots(self, st: StaticSlots, slots, tokens, positions=None) -> None:
        """Write the next tokens (and positions) of `slots` into the static buffers: rows just admitted, or rows
        whose search chose other than the greedy id the step wrote."""
        with self.stream_context():
            index = torch.as_tensor(np.asarray(slots, dtype=np.int64)).to(self.kv_device)
            st.tokens[index, 0] = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).to(self.kv_device)
            if positions is not None:
                st.positions[index, 0] = torch.as_tensor(np.asarray(positions, dtype=np.int64)).to(self.kv_device)
