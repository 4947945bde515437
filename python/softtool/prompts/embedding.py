"""Input embeddings with virtual tokens: the one place the id convention becomes vectors.

Ids below the vocabulary size V go through the frozen embedding; id V + t*N + j reads row t*N + j of the
prompt table. Training (both loss paths), the PyTorch runtime and the exported graph all call this
function, so the prompt lands in exactly the same space everywhere. It has no data-dependent branch, so it
traces into the ONNX graph as a Gather, a Gather and a Where.
"""

from __future__ import annotations

import torch
from torch import nn


def merge_embeddings(
    embed: nn.Module | nn.Embedding, input_ids: torch.Tensor, prompt_table: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Embeddings [B, T, H] for ids in the V + t*N + j convention.

    `embed` is the model's input-embedding module (or a model, whose `get_input_embeddings()` is used).
    The embedding module's own scaling (Gemma multiplies by sqrt(hidden)) applies to normal tokens only:
    prompt rows are stored in the space the decoder layers see.
    """
    if hasattr(embed, "get_input_embeddings"):
        embed = embed.get_input_embeddings()
    is_virtual = input_ids >= vocab_size
    text = embed(input_ids.masked_fill(is_virtual, 0))
    # Clamp so the (discarded) lookups for normal tokens stay inside the table; out-of-table ids are refused
    # before they reach here.
    rows = (input_ids - vocab_size).clamp(min=0, max=prompt_table.shape[0] - 1)
    virtual = prompt_table.to(text.dtype)[rows]
    return torch.where(is_virtual.unsqueeze(-1), virtual, text)
