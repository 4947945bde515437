"""The module that gets exported: a frozen causal LM plus a prompt table, with flat tensor inputs and outputs.

ONNX exporters cannot see transformers' Cache objects or its mask helpers cleanly, so this wrapper takes the
KV cache as one tensor pair per layer, builds the additive 4-D causal mask itself, and hands the model a
duck-typed cache that only concatenates. Token ids follow the batch builder's convention: ids below the
vocabulary size V embed normally; id V + t*N + j reads row t*N + j of the prompt table.
"""

from __future__ import annotations

import torch
from torch import nn


class _FlatCache:
    """Just enough of transformers' Cache for one forward: append new keys/values to the given past ones."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(past)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        past_k, past_v = self.past[layer_idx]
        k = torch.cat([past_k, key_states], dim=2)
        v = torch.cat([past_v, value_states], dim=2)
        self.present[layer_idx] = (k, v)
        return k, v


def embed_with_prompts(
    input_ids: torch.Tensor, embed: nn.Embedding, prompt_table: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Embeddings for ids in the virtual-token convention (the graph's Gather + Where merge)."""
    is_virtual = input_ids >= vocab_size
    token_ids = torch.where(is_virtual, torch.zeros_like(input_ids), input_ids)
    # Clamp so the (unused) gather for normal tokens stays in range; out-of-table ids are refused before the graph.
    rows = torch.clamp(input_ids - vocab_size, min=0, max=prompt_table.shape[0] - 1)
    token_emb = embed(token_ids)
    prompt_emb = prompt_table.to(token_emb.dtype)[rows]
    return torch.where(is_virtual.unsqueeze(-1), prompt_emb, token_emb)


def causal_mask(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, S, P+S]: key k is visible to query i (absolute position P+i) when k <= P+i and real."""
    total = attention_mask.shape[1]
    past_len = total - query_len
    q_pos = torch.arange(query_len, device=attention_mask.device).unsqueeze(1) + past_len
    k_pos = torch.arange(total, device=attention_mask.device).unsqueeze(0)
    allowed = (k_pos <= q_pos).unsqueeze(0) & attention_mask.bool().unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    # The dtype's minimum, not -inf, so rows with no visible key (left padding) stay finite, as in transformers.
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, neg).unsqueeze(1)


class PromptedLM(nn.Module):
    """forward(input_ids, attention_mask, position_ids, beam_idx, [prompt_table], past k/v per layer...)
    -> last-position logits [B, V] (or top-k log-probs and ids), then present k/v per layer.

    `beam_idx` [B] picks, for each row, the row of the given past it continues: the beam-search reorder, or
    the task's precomputed prompt cache at prefill. Doing the gather in the graph keeps the cache on the
    device between steps. `prompt_table` is a buffer (an initializer in the graph) unless `table_as_input`,
    when it is the 5th input.
    """

    def __init__(
        self,
        model: nn.Module,
        prompt_table: torch.Tensor,
        vocab_size: int,
        *,
        table_as_input: bool = False,
        top_k: int = 0,
    ):
        super().__init__()
        self.model = model
        self.vocab_size = int(vocab_size)
        self.table_as_input = table_as_input
        self.top_k = int(top_k)
        self.num_layers = int(model.config.num_hidden_layers)
        if not table_as_input:
            self.register_buffer("prompt_table", prompt_table.detach().clone(), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, beam_idx, *rest):
        if self.table_as_input:
            table, flat_past = rest[0], rest[1:]
        else:
            table, flat_past = self.prompt_table, rest
        past = [
            (flat_past[2 * i].index_select(0, beam_idx), flat_past[2 * i + 1].index_select(0, beam_idx))
            for i in range(self.num_layers)
        ]
        embeds = embed_with_prompts(input_ids, self.model.get_input_embeddings(), table, self.vocab_size)
        mask = causal_mask(attention_mask, input_ids.shape[1], embeds.dtype)
        cache = _FlatCache(past)
        out = self.model.get_decoder()(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        # Only the last position's logits leave the graph: generation needs nothing else, and [B, S, V] is large.
        logits = self.model.get_output_embeddings()(out.last_hidden_state[:, -1, :]).float()
        presents = [t for pair in cache.present for t in pair]
        if self.top_k:
            values, indices = torch.topk(torch.log_softmax(logits, dim=-1), self.top_k, dim=-1)
            return (values, indices, *presents)
        return (logits, *presents)


def io_names(num_layers: int, *, table_as_input: bool, top_k: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in forward's argument order."""
    inputs = ["input_ids", "attention_mask", "position_ids", "beam_idx"] + (["prompt_table"] if table_as_input else [])
    outputs = ["topk_values", "topk_indices"] if top_k else ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs
