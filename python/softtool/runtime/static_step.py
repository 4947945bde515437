"""The decode step at fixed shapes, so that it can be captured once and replayed (CUDA graphs).

A static engine has `slots` rows over a cache of `capacity` positions, both fixed for its life. It decodes
with one step per slot bucket (1, 2, 4, ..., slots): the step over the first b slots, b the smallest bucket
that holds every busy slot; idle slots inside it compute a pad token into the scratch column. Everything
the step reads lives in device buffers of fixed address (`StaticSlots`): the cache, each slot's next token
and each slot's position. The step also writes them: each row's greedy choice becomes its next token and
its position moves on by one (a row at the scratch column stays there). So from one step to the next nothing
is copied to the device and the host decides nothing; what comes back is one pinned copy of the step's
result, the greedy ids with their log-probs, or the top-k (or logits) when a search needs more than the
greedy choice. Where the C++ search chose otherwise (sampling, penalties), the engine writes its tokens back
(`SlotModel.set_tokens`).

On cuda each bucket's step is captured once when the buffers are made (`torch.cuda.CUDAGraph` for the
PyTorch backend; ONNX Runtime captures its own graph per `gpu_graph_id`, and the few tensor operations
around it run on the same stream) and replayed every step. On the CPU the same step runs eagerly: the
buckets, the fixed buffers and the in-place updates are what the CPU tests check against the dynamic step.
Buffers and captured graphs are kept per (slots, capacity) by the model, so they outlive one `generate()`
call; capacities are rounded up (`round_capacity`) so that different workloads share them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

# Capacities are rounded up to a multiple of this, so that calls with slightly different rows share buffers.
CAPACITY_STEP = 128
# The text lengths a bucketed prefill pads to (texts only: a shared prefix is copied in), chosen from Multi30k's and
# SQuAD's by benchmarks/prefill_buckets.py (results/prefill_buckets.json: the padding they cost); longer texts round
# up to a multiple of CAPACITY_STEP.
PREFILL_LENGTHS = (16, 24, 40, 152, 200, 248, 336, 512)


def slot_buckets(slots: int) -> list[int]:
    """The batch sizes a static engine of `slots` rows steps with: powers of two below `slots`, and `slots`."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    buckets, b = [], 1
    while b < slots:
        buckets.append(b)
        b *= 2
    return [*buckets, slots]


def bucket_for(buckets: list[int], width: int) -> int:
    """The smallest bucket that holds slots 0..width-1."""
    for b in buckets:
        if b >= width:
            return b
    raise ValueError(f"no bucket holds {width} slots (buckets {buckets})")


def round_capacity(capacity: int) -> int:
    """`capacity` rounded up to a multiple of CAPACITY_STEP."""
    return -(-capacity // CAPACITY_STEP) * CAPACITY_STEP


def prefill_length(width: int, limit: int) -> int:
    """The fixed length a prefill of texts up to `width` tokens runs at: the smallest of PREFILL_LENGTHS that holds
    it, past the last a multiple of CAPACITY_STEP; at most `limit` (what the cache holds), at least `width`."""
    length = next((b for b in PREFILL_LENGTHS if b >= width), round_capacity(width))
    return max(width, min(length, limit))


def prefill_shape(rows: int, width: int, slots: int, limit: int) -> tuple[int, int]:
    """The (rows, length) bucket of a prefill of `rows` rows up to `width` tokens into a cache of `slots` rows:
    rows as the decode step's slot buckets, length as `prefill_length`."""
    return bucket_for(slot_buckets(slots), rows), prefill_length(width, limit)


@dataclass
class PrefillBuffers:
    """The fixed buffers of one prefill shape: ids and positions [rows, length] (on the host; a capturing backend
    keeps device copies beside them) and the temporary cache the rows are prefilled into, then copied out of."""

    ids: torch.Tensor
    positions: torch.Tensor
    kv: list[torch.Tensor]
    captured: object = None  # a backend's captured prefill of these buffers (cuda), made at the shape's first use


@dataclass
class StaticSlots:
    """The fixed buffers of one static engine, and its step per bucket (captured on cuda)."""

    slots: int
    capacity: int
    kv: list[torch.Tensor]  # per layer key, value: [slots, kv_heads, capacity, head_dim]
    tokens: torch.Tensor  # [slots, 1] int64: each slot's next input token
    positions: torch.Tensor  # [slots, 1] int64: each slot's next position (scratch = capacity - 1 when idle)
    buckets: list[int]
    stream: object = None  # torch.cuda.Stream on cuda: every operation of this engine runs on it
    steps: dict[int, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    body: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None  # the step itself, per bucket
    order: torch.Tensor | None = None  # [slots] int64: beam search's reorder, slot i continues slot order[i]
    beam_steps: dict[int, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    captured: bool = False
    capture_seconds: float = 0.0
    host: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # pinned copies per (bucket, kind)
    event: object = None

    @property
    def scratch(self) -> int:
        return self.capacity - 1

    def reset(self, pad_token_id: int) -> None:
        """Every slot idle: a pad token at the scratch column."""
        self.tokens.fill_(pad_token_id)
        self.positions.fill_(self.scratch)

    def bucket(self, width: int) -> int:
        return bucket_for(self.buckets, width)


def advance(head: tuple[torch.Tensor, ...], tokens: torch.Tensor, positions: torch.Tensor, scratch: int):
    """After a step over rows [:b]: their greedy choice becomes their next token and their positions move
    on (a row at the scratch column stays there). Returns (full, top1): the head as one float32 tensor
    (top-k log-probs then their ids; or the logits) and [b, 2] (the greedy choice's log-prob, its id).
    Ids travel as float32, exact below 2**24 (every vocabulary)."""
    if len(head) == 2:
        values, indices = head
        best = indices[:, :1]
        best_value = values[:, :1]
        full = torch.cat([values, indices.to(torch.float32)], dim=1)
    else:
        logits = head[0]
        best = logits.argmax(dim=-1, keepdim=True)  # torch.argmax's ties: the first maximum, as the search
        best_value = logits.gather(-1, best) - torch.logsumexp(logits, dim=-1, keepdim=True)
        full = logits
    tokens.copy_(best)
    positions.add_(1).clamp_(max=scratch)
    top1 = torch.cat([best_value, best.to(torch.float32)], dim=1)
    return full, top1


def reorder_rows(st: StaticSlots, bucket: int) -> None:
    """Beam search's reorder of slots [:bucket] on the device: each slot's cache row and position become those of
    slot st.order[i] (an index copy; the identity for idle slots). Part of the beam step, so it is captured too."""
    index = st.order[:bucket]
    for t in st.kv:
        t[:bucket].copy_(t[:bucket].index_select(0, index))
    st.positions[:bucket].copy_(st.positions[:bucket].index_select(0, index))


def split_head(full: np.ndarray, top_k: int) -> tuple[np.ndarray, ...]:
    """The host copy of `advance`'s `full` back as the search's head: (values, ids) or (logits,)."""
    if top_k:
        return np.ascontiguousarray(full[:, :top_k]), full[:, top_k:].astype(np.int64)
    return (full,)


def to_host(st: StaticSlots, bucket: int, kind: str, tensor: torch.Tensor) -> np.ndarray:
    """`tensor` on the host: on cuda one asynchronous copy into a pinned buffer and one wait for it (the
    step's only synchronization); on the CPU the tensor itself."""
    if tensor.device.type == "cpu":
        return tensor.numpy()
    host = st.host.get((bucket, kind))
    if host is None:
        host = st.host[(bucket, kind)] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    st.event.record(st.stream)
    st.event.synchronize()
    return host.numpy()


def capture_graphs(
    st: StaticSlots, body: Callable[[int], tuple[torch.Tensor, torch.Tensor]], warmup: int = 2, into=None
):
    """Capture `body(bucket)` for every bucket as a torch CUDA graph on the engine's stream (largest first,
    sharing one memory pool) and make `into` (st.steps by default) replay them. Runs while every slot is idle:
    the warm-up runs write only the scratch column, and tokens and positions are restored before capture."""
    into = st.steps if into is None else into
    start = time.perf_counter()
    pool = torch.cuda.graph_pool_handle()
    saved = (st.tokens.clone(), st.positions.clone())
    for bucket in sorted(st.buckets, reverse=True):
        with torch.cuda.stream(st.stream):
            for _ in range(warmup):  # lets cuBLAS and the allocator set up outside the capture
                body(bucket)
            st.tokens.copy_(saved[0])
            st.positions.copy_(saved[1])
        st.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=st.stream):
            outputs = body(bucket)
        into[bucket] = _replay(graph, outputs)
    st.captured = True
    st.capture_seconds += time.perf_counter() - start


def _replay(graph, outputs):
    def run():
        graph.replay()
        return outputs

    return run
