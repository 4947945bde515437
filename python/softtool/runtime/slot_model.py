"""The prompted model as the runtime and the exported graph run it: a frozen causal LM plus a prompt table,
over a KV cache of fixed-size rows ("slots") written in place.

    forward(input_ids [B, S], position_ids [B, S], [prompt_table], past k/v per layer [B, kv_heads, C, head_dim],
            [target_ids [B, T]])
      -> last-position logits [B, V] (or top-k log-probs and ids), then present k/v per layer (same shapes),
         then with target_ids: the log-prob of target_ids[b, s] after input position s for s < T, and the top
         SCORE_TOP_K log-probs and ids there ([B, T], [B, T, K], [B, T, K]; scoring a prompt's own tokens)

Each row of the cache is one sequence and its buffer index is the token's position: the new keys and values
are written at `position_ids` (a scatter, in place when the caller binds present to past's memory), and a
query at position p sees exactly the buffer entries 0..p. So rows of different lengths share a batch with
no padding in the cache and no per-step copy or reorder, and a finished row's slot can take a new sequence
at once (continuous batching, softtool.runtime.decode). Tokens that must be ignored (left padding of a
prefill) are written to the last column, a scratch entry no real position reaches.

Attention is computed per key/value head group (the query heads of a group attend to the same buffer), so
the cache is never expanded to the query heads. The same module runs eagerly in the PyTorch backend (in
place) and is traced by `softtool export` (functional scatter), so both backends compute the same thing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from softtool.export_meta import SCORE_TOP_K, TARGET_INPUT, TARGET_OUTPUTS
from softtool.models import cap_final_logits
from softtool.prompts.embedding import merge_embeddings

SLOT_ATTENTION = "softtool_slots"


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Attention of query [B, Hq, S, D] over the slot buffers key/value [B, Hkv, C, D] with an additive mask
    [B, 1, S, C]; returns ([B, S, Hq, D], None) like transformers' attention functions.

    The caller's module keeps its own projections, query/key norms and rotary embedding; `scaling` (Gemma's
    query_pre_attn_scalar**-0.5) and `softcap` (Gemma 2's attention logit capping) are applied as transformers'
    eager attention applies them. A sliding window arrives in the mask (see slot_masks), not as `sliding_window`.
    """
    b, hq, s, d = query.shape
    hkv = key.shape[1]
    groups = hq // hkv
    # Query head h uses key/value head h // groups (transformers' repeat_kv order): fold the group into rows.
    q = query.reshape(b, hkv, groups * s, d)
    scores = torch.matmul(q, key.transpose(2, 3)) * (scaling if scaling is not None else d**-0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(b, hkv, groups, s, -1) + attention_mask.unsqueeze(2)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.view(b, hkv, groups * s, -1), value)
    return out.view(b, hq, s, d).transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SLOT_ATTENTION, slot_attention)


_register()


@contextlib.contextmanager
def _attention(model: nn.Module, name: str) -> Iterator[None]:
    """Run `model` with attention implementation `name` for one forward, then restore its own."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def slot_mask(positions: torch.Tensor, capacity: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Additive mask [B, 1, S, C]: the query at position p sees buffer entries 0..p of its own row, and with a
    sliding `window` only the last `window` of them (p - window < k <= p, as transformers' sliding layers)."""
    keys = torch.arange(capacity, device=positions.device).view(1, 1, -1)
    query = positions.unsqueeze(-1)
    allowed = keys <= query
    if window is not None:
        allowed = allowed & (keys > query - window)
    # The dtype's minimum, not -inf, so no row is ever all -inf (as in transformers' eager masks).
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=positions.device)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=positions.device), neg).unsqueeze(1)


def slot_masks(config, positions: torch.Tensor, capacity: int, dtype: torch.dtype):
    """The mask the decoder takes: one tensor, or for models with sliding-window layers among full ones (Gemma 2/3,
    Qwen2/3 with use_sliding_window, whose config lists `layer_types`) transformers' mapping {"full_attention": ...,
    "sliding_attention": ...}, which the decoder hands to each layer by its type instead of building its own masks.
    A model with a window and no layer types (Mistral, Mixtral, Phi-3, Starcoder2) slides every layer: transformers
    builds its one mask with create_sliding_window_causal_mask whenever config.sliding_window is set, and takes a
    ready 4-D mask as it is, so the window must be in this one."""
    layer_types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if not layer_types:
        return slot_mask(positions, capacity, dtype, int(window) if window else None)
    full = slot_mask(positions, capacity, dtype)
    if "sliding_attention" not in layer_types or not window:
        return full
    masks = {kind: full for kind in layer_types}
    masks["sliding_attention"] = slot_mask(positions, capacity, dtype, int(window))
    return masks


class _SlotCache:
    """Just enough of transformers' Cache for one forward: write the new keys/values at their positions."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor, in_place: bool):
        self.past = past
        self.in_place = in_place
        heads = past[0][0].shape[1]
        rows = torch.arange(positions.shape[0], device=positions.device)
        # Broadcast to [B, Hkv, S]: entry (b, h, s) goes to buffer[b, h, positions[b, s]].
        self.index = (
            rows.view(-1, 1, 1),
            torch.arange(heads, device=positions.device).view(1, -1, 1),
            positions.unsqueeze(1),
        )
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = list(past)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.past[layer_idx]
        if self.in_place:
            k.index_put_(self.index, key_states.to(k.dtype))
            v.index_put_(self.index, value_states.to(v.dtype))
        else:  # traced: a functional scatter (ONNX ScatterND), made in place by binding present to past
            k = k.index_put(self.index, key_states.to(k.dtype))
            v = v.index_put(self.index, value_states.to(v.dtype))
        self.present[layer_idx] = (k, v)
        return k, v


class SlotLM(nn.Module):
    """`model` with its prompt table, over slot buffers (see the module docstring for the signature).

    table_as_input: the prompt table is the third input instead of a constant (tasks added at run time).
    top_k: return the top-k log-probs and ids instead of full logits.
    in_place: write the new keys/values into the given buffers (eager use) instead of returning new tensors.
    head_weight_first: compute logits as (W @ h^T)^T, so an exported graph stores a tied embedding once (a
    plain Linear makes the exporter fold a transposed copy of it); int8 export keeps the plain Linear, whose
    MatMul the weight-only quantizer can pack.
    """

    def __init__(
        self,
        model: nn.Module,
        prompt_table: torch.Tensor | None,
        vocab_size: int,
        *,
        table_as_input: bool = False,
        top_k: int = 0,
        in_place: bool = False,
        head_weight_first: bool = False,
    ):
        super().__init__()
        self.model = model
        # The wrapper takes the model's mode: a module is made in training mode, and torch.onnx.export puts its
        # argument back in the mode it found it in, which would leave the base model training (dropout on: GPT-2's
        # 0.1 made the export's own verification fail against the model it had just traced).
        self.train(model.training)
        self.vocab_size = int(vocab_size)
        self.table_as_input = table_as_input
        self.top_k = int(top_k)
        self.in_place = in_place
        self.head_weight_first = head_weight_first
        self.num_layers = int(model.config.num_hidden_layers)
        if not table_as_input:
            hidden = model.get_input_embeddings().weight.shape[1]
            table = prompt_table if prompt_table is not None else torch.zeros(1, hidden)
            self.register_buffer("prompt_table", table.detach().clone(), persistent=False)

    def set_table(self, prompt_table: torch.Tensor) -> None:
        self.prompt_table = prompt_table.detach().clone()

    def forward(self, input_ids, position_ids, *rest):
        if self.table_as_input:
            table, flat = rest[0], rest[1:]
        else:
            table, flat = self.prompt_table, rest
        past = [(flat[2 * i], flat[2 * i + 1]) for i in range(self.num_layers)]
        targets = flat[2 * self.num_layers] if len(flat) > 2 * self.num_layers else None
        embeds = merge_embeddings(self.model.get_input_embeddings(), input_ids, table, self.vocab_size)
        mask = slot_masks(self.model.config, position_ids, past[0][0].shape[2], embeds.dtype)
        cache = _SlotCache(past, position_ids, self.in_place)
        with _attention(self.model, SLOT_ATTENTION):
            out = self.model.get_decoder()(
                inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
            )
        # Only the last position leaves the model: generation needs nothing else, and [B, S, V] is large.
        logits = self._logits(out.last_hidden_state[:, -1, :])
        presents = [t for pair in cache.present for t in pair]
        if self.top_k:
            result = (*_top(torch.log_softmax(logits, dim=-1), self.top_k), *presents)
        else:
            result = (logits, *presents)
        if targets is not None:
            result += self._score(out.last_hidden_state, targets)
        return result

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [..., V] of hidden states [..., H] (the final soft-capping of Gemma 2 included)."""
        head = self.model.get_output_embeddings()
        if self.head_weight_first and getattr(head, "bias", None) is None:
            logits = torch.matmul(head.weight, hidden.transpose(-1, -2)).transpose(-1, -2)
        else:
            logits = head(hidden)
        return cap_final_logits(logits.float(), self.model.config)

    def _score(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """For the first T = targets.shape[1] input positions: the log-prob of targets[b, s] given the tokens up to
        s, and the SCORE_TOP_K best log-probs and ids there. The head runs on those T positions only (T = 0 costs
        nothing), and the log-softmax stays inside: [B, T, V] never leaves the model."""
        logprobs = torch.log_softmax(self._logits(hidden[:, : targets.shape[1]]), dim=-1)
        chosen = torch.gather(logprobs, -1, targets.unsqueeze(-1)).squeeze(-1)
        return chosen, *_top(logprobs, SCORE_TOP_K)


def _top(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best log-probs and their ids, best first. The values are gathered by the ids rather than taken from
    TopK's own output: an fp16 export keeps TopK in float32 (onnxruntime's converter blocks it), and the converter
    then mistypes a TopK output that is also a float32 graph output, so the graph would not load."""
    ids = torch.topk(logprobs, k, dim=-1).indices
    return torch.gather(logprobs, -1, ids), ids


def io_names(
    num_layers: int, *, table_as_input: bool, top_k: int, targets: bool = False
) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in forward's argument order."""
    inputs = ["input_ids", "position_ids"] + (["prompt_table"] if table_as_input else [])
    outputs = ["topk_values", "topk_indices"] if top_k else ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    if targets:
        inputs.append(TARGET_INPUT)
        outputs += TARGET_OUTPUTS
    return inputs, outputs
