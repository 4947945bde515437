"""The genai form of an export (`softtool export --form genai`): a folder that onnxruntime-genai's `og.Model` loads.

onnxruntime-genai runs a decoder graph with its own loop (`og.Generator`: append_tokens, generate_next_token)
and learns what the graph is from `genai_config.json`. softtool's traced graph (SlotLM) fits that loop with
one change: genai reads logits as [batch, sequence, vocab], while the graph emits only the last position's.
This form returns them as [batch, 1, vocab] with the 1 fixed in the graph, which genai takes for last-token
logits (its "trimmed prefill logits": it then skips picking the last position itself). Everything else is
what genai's shared past/present buffer expects: past and present bound to one buffer of `max_length`
columns, zeroed by genai, the new entries written at `position_ids`, which genai counts from 0 for a
sequence without padding. Virtual tokens go in as ids (`V + t*N + j`), as with every softtool export;
genai passes ids through without checking them against its vocabulary.

What genai cannot run with this graph, and why:
  - several sequences in one generator: genai left-pads them, and the graph has no `attention_mask` input
    through which genai could say where the padding is (softtool writes padding at column C-1; genai would
    feed it at position 0, over the first real token). Run one sequence per generator.
  - beam search: genai shares the past/present buffer only for num_beams == 1 and otherwise feeds a past of
    length 0, into which the graph's in-place write cannot go.
  - --prompt-table-input and --top-k: genai feeds only ids and positions, and samples from full logits.

The folder is an ordinary export besides (softtool_export.json records `genai: true`), so softtool's own
runtime runs it too; `tests/test_genai_export.py` holds both to the same tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from softtool.export_meta import ExportMeta
from softtool.fileio import atomic_write_json

CONFIG_FILE = "genai_config.json"
# Decoder-only types onnxruntime-genai (0.18) lists as plain LLMs; any of them selects the same decoder-only model
# class, so a base model of another type is written as genai's generic "decoder".
GENAI_TYPES = ("gemma", "gemma2", "gemma3_text", "granite", "llama", "mistral", "olmo", "qwen2", "qwen3", "smollm3")


class LastTokenLogits(nn.Module):
    """SlotLM with its logits [B, V] returned as [B, 1, V]: the last position of genai's [B, S, V]."""

    def __init__(self, slot_lm: nn.Module):
        super().__init__()
        self.slot_lm = slot_lm

    def forward(self, *args):
        logits, *presents = self.slot_lm(*args)
        return (logits.unsqueeze(1), *presents)


def check_options(prompt_table_input: bool, top_k: int) -> None:
    """Refuse what the genai form cannot carry (ValueError, as ExportOptions' other checks)."""
    if prompt_table_input:
        raise ValueError("the genai form bakes the prompt table in (genai feeds only ids); drop --prompt-table-input")
    if top_k > 0:
        raise ValueError("the genai form emits full logits (genai samples from them); drop --top-k")


def genai_config(meta: ExportMeta, model_config: Any) -> dict[str, Any]:
    """genai_config.json for an export of `meta` whose base model has transformers config `model_config`.

    The search defaults are greedy with the first task's decoding defaults (no-repeat n-grams, repetition
    penalty), as `softtool generate` decodes; `max_length` (prompt plus new tokens) defaults to the model's
    context and sizes genai's cache, so set it per generator.
    """
    context = int(getattr(model_config, "max_position_embeddings", None) or 2048)
    model_type = getattr(model_config, "model_type", "")
    bos = getattr(model_config, "bos_token_id", None)
    decoding = meta.tasks[0].decoding
    provider_options = [{"cuda": {}}] if meta.device == "cuda" else []
    return {
        "model": {
            "type": model_type if model_type in GENAI_TYPES else "decoder",
            "bos_token_id": int(bos) if isinstance(bos, int) else meta.pad_token_id,
            "eos_token_id": list(meta.eos_token_ids),
            "pad_token_id": meta.pad_token_id,
            "vocab_size": meta.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": ExportMeta.MODEL_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "hidden_size": meta.hidden_size,
                "num_attention_heads": meta.num_heads,
                "num_key_value_heads": meta.num_kv_heads,
                "num_hidden_layers": meta.num_layers,
                "head_size": meta.head_dim,
                # No attention_mask: the graph masks by position (genai feeds a mask only to a graph that has one).
                "inputs": {
                    "input_ids": "input_ids",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": context,
            "min_length": 0,
            # The graph writes into its past buffer in place: genai must bind past and present to one buffer.
            "past_present_share_buffer": True,
            "no_repeat_ngram_size": int(decoding.get("no_repeat_ngram_size", 0)),
            "repetition_penalty": float(decoding.get("repetition_penalty", 1.0)),
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, meta: ExportMeta, model_config: Any) -> Path:
    path = Path(folder) / CONFIG_FILE
    atomic_write_json(path, genai_config(meta, model_config))
    return path
