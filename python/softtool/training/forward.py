"""The model forward with a soft prompt, and its loss: embedding merge, and the shared-prefix path.

Embedding merge (softtool.prompts.embedding): ids < V go through the frozen embedding, ids >= V pick row
(id - V) of the prompt table, so virtual blocks can sit anywhere in the input (P-tuning's split templates).

Shared prefix: when every virtual token comes first, the prompt is the same for all rows, so it is
run through the model once (batch 1) and its per-layer keys/values are broadcast to the batch as a
cache. The gradient reaches the prompt through those cached keys/values. Loss and prompt gradient
match the naive path (prompt concatenated to every row) to float rounding, at a fraction of the cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from softtool.models import cap_final_logits
from softtool.prompts.embedding import merge_embeddings
from softtool.training.batching import IGNORE, Batch


def _decoder(model):
    # The transformer body without the LM head, so logits are computed only where there is a label.
    return getattr(model, model.base_model_prefix)


def prefix_cache(model, prompt_table: torch.Tensor, batch_size: int):
    """Run the prompt [N, H] once (batch 1) and return its KV cache broadcast to `batch_size` rows."""
    from transformers import DynamicCache

    dtype = model.get_input_embeddings().weight.dtype
    n = prompt_table.shape[0]
    positions = torch.arange(n, device=prompt_table.device).unsqueeze(0)
    out = _decoder(model)(inputs_embeds=prompt_table.to(dtype).unsqueeze(0), position_ids=positions, use_cache=True)
    layers = [
        (layer.keys.expand(batch_size, -1, -1, -1), layer.values.expand(batch_size, -1, -1, -1))
        for layer in out.cache.layers
    ]
    return DynamicCache(layers, config=model.config)


def _target_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the next-token predictions at labelled positions, and their count."""
    # With --device-map the last layers (and the head) may sit on another GPU than the labels.
    shifted = labels[:, 1:].to(hidden.device)
    keep = shifted != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    logits = cap_final_logits(logits.float(), model.config)  # the loss of the logits the model itself produces
    return F.cross_entropy(logits, shifted[keep].to(logits.device), reduction="sum"), int(keep.sum())


def loss_naive(model, batch: Batch, prompt_table: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, int]:
    """The reference path: the full rows (virtual ids included) through the model. Returns (sum loss, tokens)."""
    embeds = merge_embeddings(model, batch.input_ids, prompt_table, vocab_size)
    mask = batch.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = _decoder(model)(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    return _target_loss(model, hidden, batch.labels)


def loss_prefix(model, batch: Batch, prompt_table: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, int]:
    """The shared-prefix path (batch.prefix_tokens == N, rows right-padded). Returns (sum loss, tokens)."""
    n = batch.prefix_tokens
    bsz, width = batch.input_ids.shape
    cache = prefix_cache(model, prompt_table[:n], bsz)
    embeds = merge_embeddings(model, batch.input_ids, prompt_table, vocab_size)
    mask = torch.cat([batch.attention_mask.new_ones(bsz, n), batch.attention_mask], dim=1)
    positions = (n + torch.arange(width, device=embeds.device)).unsqueeze(0).expand(bsz, -1)
    hidden = _decoder(model)(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    ).last_hidden_state
    # The first target token is predicted from the last prompt position when a row has no text;
    # templates always carry text after the prefix, so predictions start inside the batch.
    return _target_loss(model, hidden, batch.labels)


def batch_loss(model, batch: Batch, prompt_table: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, int]:
    """Summed target-token loss and the number of target tokens, by the path the batch was built for."""
    if batch.prefix_tokens:
        return loss_prefix(model, batch, prompt_table, vocab_size)
    return loss_naive(model, batch, prompt_table, vocab_size)
