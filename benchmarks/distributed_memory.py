"""GPU memory per device of each way to train a soft prompt on a 7B model (computed, not measured on a GPU).

Weights: bf16 = 2 bytes x parameters, split as each layout splits them. Activations: the bytes autograd
saves for the backward pass into the prompt, counted exactly by running the model on PyTorch's meta
device (shapes only, no memory, no GPU) under saved_tensors_hooks with the frozen weights, eager
attention and the naive path (prompt concatenated to every row; the prefix-cache path saves a little
less). Allocator slack and backward temporaries are not included: budget ~20% more. Backs the table in
docs/distributed.md. Run from the repository root:

    python benchmarks/distributed_memory.py --output benchmarks/results/distributed_memory_7b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from softtool.bench.limits import cpu_model, git_commit

# Llama-2-7B's shapes (6.74e9 parameters, untied embeddings).
LLAMA_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
GIB = 2**30


def _meta_model(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA_7B, "num_hidden_layers": layers})
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def saved_activation_bytes(batch: int, seq: int, virtual: int, targets: int, layers: int) -> int:
    """Bytes autograd keeps for backward when the loss is differentiated with respect to the prompt."""
    import torch
    import torch.nn.functional as F

    model = _meta_model(layers)
    hidden = LLAMA_7B["hidden_size"]
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = max(saved.get(storage._cdata, 0), storage.nbytes())
        return t

    prompt = torch.zeros(virtual, hidden, device="meta", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        embeds = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), model.get_input_embeddings()(ids)], 1)
        out = model.model(inputs_embeds=embeds).last_hidden_state
        # softtool projects only the target positions to the vocabulary, in float32.
        logits = model.get_output_embeddings()(out[:, -targets:]).float()
        F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.zeros(batch * targets, dtype=torch.long, device="meta")
        )
    return sum(saved.values())


def layouts(params: int, block_params: int, act: dict[int, int], global_batch: int, k: int) -> list[dict]:
    """Per-GPU bytes for each layout with k GPUs (only 1 GPU when the batch does not split evenly)."""
    weights = 2 * params
    blocks = 2 * block_params * LLAMA_7B["num_hidden_layers"]
    rest = weights - blocks  # embeddings, LM head, final norm: kept whole on every FSDP rank
    local = global_batch // k
    if global_batch % k:
        return [{"layout": "1 GPU", "gpus": 1, "weights": weights, "activations": act[global_batch]}]
    return [
        {"layout": "1 GPU", "gpus": 1, "weights": weights, "activations": act[global_batch]},
        {"layout": f"DDP, {k} ranks", "gpus": k, "weights": weights, "activations": act[local]},
        {"layout": f"--device-map auto, 1 process, {k} GPUs", "gpus": k, "weights": weights / k,
         "activations": act[global_batch] / k},
        # FSDP holds 1/k of the blocks, plus the block being run and the one prefetched, unsharded.
        {"layout": f"--fsdp, {k} ranks", "gpus": k, "weights": blocks / k + rest + 2 * 2 * block_params,
         "activations": act[local]},
    ]  # fmt: skip


def _machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seq", type=int, default=512, help="input + target tokens per row (without the virtual tokens)"
    )
    parser.add_argument("--virtual", type=int, default=20, help="virtual tokens")
    parser.add_argument(
        "--targets", type=int, default=32, help="target tokens per row (those projected to the vocabulary)"
    )
    parser.add_argument(
        "--batch", dest="batches", type=int, action="append", help="a global batch size (repeatable; default 1, 8, 32)"
    )
    parser.add_argument("--gpus", type=int, default=4, help="GPUs for the multi-GPU layouts")
    parser.add_argument("--output", type=Path, required=True)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    seq, virtual, targets, gpus, output = args.seq, args.virtual, args.targets, args.gpus, args.output
    batches = args.batches or [1, 8, 32]
    model = _meta_model(LLAMA_7B["num_hidden_layers"])
    params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.model.layers[0].parameters())
    needed = sorted({b for b in batches} | {b // gpus for b in batches if b // gpus})
    act = {b: saved_activation_bytes(b, seq, virtual, targets, LLAMA_7B["num_hidden_layers"]) for b in needed}
    prompt_state = virtual * LLAMA_7B["hidden_size"] * 4 * 4  # fp32 table, gradient, Adam m and v
    rows = []
    for batch in batches:
        for row in layouts(params, block_params, act, batch, gpus):
            total = row["weights"] + row["activations"] + prompt_state
            rows.append({"global_batch": batch, **row, "prompt_and_adam": prompt_state, "total": total,
                         "total_gib": round(total / GIB, 2), "weights_gib": round(row["weights"] / GIB, 2),
                         "activations_gib": round(row["activations"] / GIB, 2)})  # fmt: skip
    commit = git_commit(Path(__file__).resolve().parents[1]) or "unknown"
    record = {
        "benchmark": "distributed_memory",
        "computed_not_measured": True,
        "commit": commit,
        "machine": _machine(),
        "command": " ".join(["python", "benchmarks/distributed_memory.py", *argv]),
        "model": {"shapes": "Llama-2-7B", **LLAMA_7B, "parameters": params, "block_parameters": block_params},
        "seq": seq,
        "virtual_tokens": virtual,
        "target_tokens": targets,
        "activation_bytes_by_batch": act,
        "rows": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    for row in rows:
        print(
            f"B={row['global_batch']:>2}  {row['layout']:<40} weights {row['weights_gib']:6.2f} GiB  "
            f"activations {row['activations_gib']:6.2f} GiB  total {row['total_gib']:6.2f} GiB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
