"""The CUDA export form: a Llama-family decoder written node by node around ONNX Runtime's fused attention.

`softtool export --device cuda` writes this graph instead of the traced one (export/onnx.py) when the model
is one it knows (`gqa_unsupported` says why not otherwise). The traced graph computes attention from
MatMuls, a mask and a ScatterND, with shape arithmetic between them; this one is what onnxruntime-genai's
builder writes for such models, so that ONNX Runtime can capture its decode step as a CUDA graph:

- GroupQueryAttention (com.microsoft) does rotary, the KV write and attention in one node per layer. Its
  past and present share one buffer per layer ([B, kv_heads, C, head_dim], the slot layout: position p of a
  row sits in column p); `seqlens_k` (each row's last position) says where the new entry goes and how far
  each row attends, and `total_sequence_length` (a CPU scalar) is the buffer's width.
- Reshapes, splits and the top-k take constant shapes, so nothing in the graph computes a shape from a
  tensor on the device and ONNX Runtime inserts no Memcpy node (either would forbid capture).
- RMSNorm with the residual add is SkipSimplifiedLayerNormalization; q, k, v are one MatMul, so are gate
  and up.

The interface is the traced graph's plus one input:

    input_ids [B, S], position_ids [B, S], total_sequence_length [] (int32, on the CPU), [prompt_table],
    past_key_values.{i}.key/value [B, kv_heads, C, head_dim]
      -> logits [B, V] or topk_values/topk_indices [B, k], present.{i}.key/value (bound to past's memory)

Three calls use it. Decode: S = 1, position_ids = each row's position, C the cache's capacity. Prefill (a
first prompt, in GroupQueryAttention's terms): rows right-padded to S, their positions 0..L-1 and -1 on
the padding, over a cache exactly S wide (total_sequence_length = S); each row's logits are those of its
last real token (the largest position). A chunk after a cached prefix (the task's virtual tokens, copied
into columns 0..P-1): one row (GroupQueryAttention refuses a multi-token chunk over a past for more rows
unless given query_seqlens, which onnxruntime 1.31 lacks), its text at positions P..P+L-1, right-padded to
a fixed length S with position -(p+1) at column p, over a cache P + S wide (total_sequence_length = P + S,
never S: that would make it a first prompt). seqlens_k is the largest of max(p, -1 - p), so the chunk's
padding is written too (columns the row overwrites before it reads them) and GroupQueryAttention places
the chunk at P; the -1 of a first prompt's padding counts as 0 there. Virtual tokens are ids as
everywhere (V + t*N + j, read from the prompt table).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The models whose decoder this file writes: transformers' Llama layout (SmolLM2 among them), and the families that
# differ from it only in what GroupQueryAttention and a norm node cover: Qwen2 (q/k/v biases), Qwen3 (RMSNorm over
# each head of q and k before the rotary embedding), Mistral (a sliding window on every layer: local_window_size).
GQA_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
OPSET = 17
# ONNX IR version of the written model: 10 is read by every onnxruntime since 1.17 (1.31 reads at most 13).
IR_VERSION = 10


def gqa_unsupported(model) -> str | None:
    """Why `model` cannot be written in this form (None when it can)."""
    config = model.config
    if config.model_type not in GQA_MODEL_TYPES:
        return f"model type {config.model_type!r} (the CUDA graph form covers {', '.join(GQA_MODEL_TYPES)})"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 16:
        return f"head size {head_dim} (GroupQueryAttention takes multiples of 16)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the form writes SiLU)"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope == "dynamic":
        return "dynamic rotary scaling (its frequencies depend on the sequence length)"
    layer_types = set(getattr(config, "layer_types", None) or ())
    if "sliding_attention" in layer_types and "full_attention" in layer_types:
        return "sliding-window layers among full ones (the form gives every layer the same window)"
    return None


def sliding_window(config) -> int | None:
    """The window every layer slides over (Mistral; Qwen2/3 with use_sliding_window on every layer), or None."""
    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or ())
    if window and (not layer_types or layer_types == {"sliding_attention"}):
        return int(window)
    return None


class _Graph:
    """Nodes, initializers and value names of the graph being written."""

    def __init__(self, dtype: str):
        import onnx

        self.np_dtype = np.float16 if dtype == "fp16" else np.float32
        self.onnx_dtype = onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.FLOAT
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def weight(self, name: str, tensor) -> str:
        """A model tensor as an initializer in the graph's float type."""
        return self.const(name, tensor.detach().float().cpu().numpy().astype(self.np_dtype))

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs) -> Any:
        """Add a node; returns its output name (or names, when `outputs` is a count above 1 or a list)."""
        from onnx import helper

        self._count += 1
        names = outputs if isinstance(outputs, list) else [f"{op_type}_{self._count}_{i}" for i in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, inputs, names, name=f"{op_type}_{self._count}", domain=domain, **attrs)
        )
        return names[0] if len(names) == 1 else names


def build_gqa_graph(model, table, facts: dict[str, Any], *, dtype: str, top_k: int, table_as_input: bool):
    """The decoder of `model` (gqa_unsupported(model) is None) with prompt `table` [rows, H] as an onnx.ModelProto."""
    import torch

    from onnx import TensorProto, helper

    config = model.config
    decoder = model.get_decoder()
    g = _Graph(dtype)
    hidden, vocab = facts["hidden_size"], facts["vocab_size"]
    heads, kv_heads, head_dim = facts["num_heads"], facts["num_kv_heads"], facts["head_dim"]
    eps = float(config.rms_norm_eps)
    i64 = lambda *v: np.asarray(v, dtype=np.int64)  # noqa: E731 - a short constant maker

    # Embeddings: ids below V from the frozen table, V + r from row r of the prompt table.
    embed = g.weight("embed_tokens", model.get_input_embeddings().weight)
    is_virtual = g.op("GreaterOrEqual", ["input_ids", g.const("vocab_size", i64(vocab))])
    text_ids = g.op("Where", [is_virtual, g.const("zero_id", i64(0)), "input_ids"])
    text = g.op("Gather", [embed, text_ids])
    # Only the lower bound is clamped: an upper one would need the table's row count, a shape on the CPU when
    # the table is an input. The runtime refuses ids past the table before they reach the graph.
    rows = g.op("Max", [g.op("Sub", ["input_ids", "vocab_size"]), "zero_id"])
    if table_as_input:
        prompts = g.op("Cast", ["prompt_table"], to=g.onnx_dtype) if dtype == "fp16" else "prompt_table"
    else:
        prompts = g.weight("prompt_table", table)
    virtual = g.op("Gather", [prompts, rows])
    x = g.op("Where", [g.op("Unsqueeze", [is_virtual, g.const("last_axis", i64(-1))]), virtual, text])

    # Each row's last column is where its new entries end and how far it attends (seqlens_k): the largest of
    # max(p, -1 - p), so a chunk's padding (-(p+1) at column p) counts with its column and a first prompt's (-1)
    # as 0. The largest position is the row's last real token, whose logits leave the graph.
    positions32 = g.op("Cast", ["position_ids"], to=TensorProto.INT32)
    columns = g.op("Max", [positions32, g.op("Sub", [g.const("minus_one", np.asarray(-1, np.int32)), positions32])])
    seqlens = g.op("ReduceMax", [columns], axes=[1], keepdims=0)
    # ArgMax on floats: ONNX Runtime's CUDA ArgMax takes no integers (exact for positions below 2**24).
    last = g.op("ArgMax", [g.op("Cast", ["position_ids"], to=TensorProto.FLOAT)], axis=1, keepdims=1)

    # Rotary tables from the model's own rotary module (its scaling included), half width as the op takes them.
    limit = int(getattr(config, "max_position_embeddings", 4096))
    with torch.no_grad():
        probe = torch.zeros(1, 1, head_dim)
        cos, sin = decoder.rotary_emb(probe, torch.arange(limit).unsqueeze(0))
    cos_cache = g.weight("cos_cache", cos[0, :, : head_dim // 2])
    sin_cache = g.weight("sin_cache", sin[0, :, : head_dim // 2])

    def linear(x_in: str, name: str, *modules) -> str:
        """One MatMul for several projections of the same input: weights [in, sum(out)] (+ their biases)."""
        weight = torch.cat([m.weight for m in modules], dim=0).t()
        biases = [m.bias for m in modules]
        out = g.op("MatMul", [x_in, g.weight(f"{name}.weight", weight)])
        if all(b is not None for b in biases):
            out = g.op("Add", [out, g.weight(f"{name}.bias", torch.cat(biases))])
        return out

    norm = g.op(
        "SimplifiedLayerNormalization",
        [x, g.weight("layers.0.input_layernorm", decoder.layers[0].input_layernorm.weight)],
        axis=-1,
        epsilon=eps,
        stash_type=1,
    )
    residual = x
    outputs = []
    # transformers' window of w keys (p - w < k <= p) is GroupQueryAttention's local_window_size w: checked against
    # transformers by the export's verification, whose rows outgrow a tiny Mistral's window (w - 1 was off by a key).
    window = sliding_window(config)
    local = {"local_window_size": window} if window else {}

    def head_norm(x_in: str, name: str, module, count: int) -> str:
        """RMSNorm over each head of a projection [B, S, count * D] (Qwen3's q_norm / k_norm)."""
        split = g.op("Reshape", [x_in, g.const(f"{name}.heads", i64(0, 0, count, head_dim))])
        normed = g.op(
            "SimplifiedLayerNormalization",
            [split, g.weight(f"{name}.weight", module.weight)],
            axis=-1,
            epsilon=float(getattr(module, "variance_epsilon", eps)),
            stash_type=1,
        )
        return g.op("Reshape", [normed, g.const(f"{name}.flat", i64(0, 0, count * head_dim))])

    for i, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        if getattr(attn, "q_norm", None) is not None:
            # The norms come between the projections and the rotary embedding: q, k and v go in apart.
            q = head_norm(linear(norm, f"layers.{i}.q_proj", attn.q_proj), f"layers.{i}.q_norm", attn.q_norm, heads)
            k = head_norm(linear(norm, f"layers.{i}.k_proj", attn.k_proj), f"layers.{i}.k_norm", attn.k_norm, kv_heads)
            qkv_inputs = [q, k, linear(norm, f"layers.{i}.v_proj", attn.v_proj)]
        else:
            qkv_inputs = [linear(norm, f"layers.{i}.qkv", attn.q_proj, attn.k_proj, attn.v_proj), "", ""]
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        outputs += [present_k, present_v]
        context, _, _ = g.op(
            "GroupQueryAttention",
            [*qkv_inputs, past_k, past_v, seqlens, "total_sequence_length", cos_cache, sin_cache],
            [f"layers.{i}.attention", present_k, present_v],
            domain="com.microsoft",
            num_heads=heads,
            kv_num_heads=kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            scale=float(getattr(attn, "scaling", head_dim**-0.5)),
            **local,
        )
        attn_out = linear(context, f"layers.{i}.o_proj", attn.o_proj)
        norm, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            [
                attn_out,
                residual,
                g.weight(f"layers.{i}.post_attention_layernorm", layer.post_attention_layernorm.weight),
            ],
            [f"layers.{i}.post_norm", "", "", f"layers.{i}.attn_residual"],
            domain="com.microsoft",
            epsilon=eps,
        )
        mlp = layer.mlp
        gate_up = linear(norm, f"layers.{i}.gate_up", mlp.gate_proj, mlp.up_proj)
        size = int(mlp.gate_proj.weight.shape[0])
        gate, up = g.op("Split", [gate_up, g.const(f"layers.{i}.split", i64(size, size))], 2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        mlp_out = linear(act, f"layers.{i}.down_proj", mlp.down_proj)
        last_layer = i + 1 == len(decoder.layers)
        next_norm = decoder.norm if last_layer else decoder.layers[i + 1].input_layernorm
        norm, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            [
                mlp_out,
                residual,
                g.weight("norm" if last_layer else f"layers.{i + 1}.input_layernorm", next_norm.weight),
            ],
            [f"layers.{i}.out_norm", "", "", f"layers.{i}.mlp_residual"],
            domain="com.microsoft",
            epsilon=eps,
        )

    # The last real token's hidden state [B, H]: a gather along the sequence at each row's largest position.
    index = g.op(
        "Expand", [g.op("Unsqueeze", [last, g.const("seq_axis", i64(2))]), g.const("gather_shape", i64(1, 1, hidden))]
    )
    final = g.op("Reshape", [g.op("GatherElements", [norm, index], axis=1), g.const("rows_shape", i64(-1, hidden))])
    head = model.get_output_embeddings()
    tied = head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    head_weight = embed if tied else g.weight("lm_head", head.weight)
    logits = g.op("Gemm", [final, head_weight], transB=1)
    if getattr(head, "bias", None) is not None:
        logits = g.op("Add", [logits, g.weight("lm_head.bias", head.bias)])
    if dtype == "fp16":
        logits = g.op("Cast", [logits], to=TensorProto.FLOAT)
    if top_k:
        log_probs = g.op("LogSoftmax", [logits], axis=-1)
        head_outputs = ["topk_values", "topk_indices"]
        g.op("TopK", [log_probs, g.const("top_k", i64(top_k))], head_outputs, axis=-1)
    else:
        head_outputs = ["logits"]
        g.op("Identity", [logits], head_outputs)

    kv_shape = ["batch", kv_heads, "capacity", head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    if table_as_input:
        inputs.append(helper.make_tensor_value_info("prompt_table", TensorProto.FLOAT, ["table_rows", hidden]))
    for i in range(len(decoder.layers)):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", g.onnx_dtype, kv_shape))
    if top_k:
        head_info = [
            helper.make_tensor_value_info("topk_values", TensorProto.FLOAT, ["batch", top_k]),
            helper.make_tensor_value_info("topk_indices", TensorProto.INT64, ["batch", top_k]),
        ]
    else:
        head_info = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", vocab])]
    present_info = [helper.make_tensor_value_info(name, g.onnx_dtype, kv_shape) for name in outputs]
    graph = helper.make_graph(g.nodes, "softtool_gqa", inputs, head_info + present_info, g.initializers)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        ir_version=IR_VERSION,
        producer_name="softtool",
    )
    return proto, [i.name for i in inputs], head_outputs + outputs
