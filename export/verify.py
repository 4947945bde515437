"""Self-check of a fresh export: ONNX Runtime against the PyTorch model on a sample batch, prefill and decode.

Both sides are fed the same tokens (PyTorch's greedy choice at every step), so the logit difference is
measured on identical inputs at every step, and "the argmax agrees at every step" is exactly "greedy
decoding gives the same tokens". The reference is plain transformers (its own attention, a left-padded 2-D
mask, its own KV cache), not softtool's slot model, so the check also covers the slot cache and the wrapper.
The graph runs through plain `session.run` with numpy arrays, as any onnxruntime user would run it. The prefill
is also scored on its own next tokens (the graph's target_logprobs, what `serve` echoes) against transformers'
log-softmax at every position.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import numpy as np

from softtool.export_meta import TARGET_INPUT, TARGET_OUTPUTS, ExportMeta

# Thresholds per dtype: (max |logit diff| that passes, fraction of steps whose argmax must agree).
# fp32 must match exactly in tokens; fp16 and int8 change the numbers, so only token agreement is checked.
THRESHOLDS = {"fp32": (1e-3, 1.0), "fp16": (None, 0.9), "int8": (None, 0.75)}

SAMPLE_TEXT = [
    "The Eiffel Tower was finished in 1889 and is 330 metres tall.",
    "A man in a red jacket rides a bicycle down a busy street.",
]


def sample_rows(tokenizer, meta: ExportMeta) -> tuple[list[list[int]], list[int]]:
    """Two rows of ids in the virtual-token convention, of different lengths, one per task (task 0 and the last)."""
    from softtool.prompts.template import Template, assemble_ids

    rows, tasks = [], []
    for i, task_id in enumerate([0, meta.num_tasks - 1]):
        template = Template.parse(meta.tasks[task_id].template)
        text = SAMPLE_TEXT[i % len(SAMPLE_TEXT)]
        fields = {name: text if k == 0 else "What is it about?" for k, name in enumerate(template.fields)}
        pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in template.render(fields)]
        rows.append(assemble_ids(template, pieces, meta.vocab_size, task_id))
        tasks.append(task_id)
    return rows, tasks


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask, position_ids for left padding, positions as transformers' generate makes them."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = row
        mask[b, width - len(row) :] = 1
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    return ids, mask, positions


class TorchReference:
    """transformers forward with inputs_embeds (prompt rows substituted) and its own KV cache."""

    def __init__(self, model, table, vocab_size: int):
        self.model, self.table, self.vocab_size = model, table, vocab_size
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache = None
        self.first_logprobs: np.ndarray | None = None

    def embed(self, ids):
        import torch

        ids = torch.as_tensor(ids)
        virtual = ids >= self.vocab_size
        emb = self.model.get_input_embeddings()(torch.where(virtual, 0, ids)).clone()
        emb[virtual] = self.table[(ids - self.vocab_size)[virtual]].to(emb.dtype)
        return emb

    def step(self, ids, mask, positions) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(
                inputs_embeds=self.embed(ids),
                attention_mask=torch.as_tensor(mask),
                position_ids=torch.as_tensor(positions),
                use_cache=True,
                **{self.cache_arg: self.cache},
            )
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values
        if self.first_logprobs is None:  # the prefill: every position's log-probs, for the graph's target scores
            self.first_logprobs = torch.log_softmax(out.logits.float(), dim=-1).numpy()
        return out.logits[:, -1, :].float().numpy()


class OrtStepper:
    """Feeds an exported graph step by step with plain session.run: its present buffers are the next past."""

    def __init__(self, session, meta: ExportMeta, table: np.ndarray | None, rows: int, capacity: int):
        from softtool.runtime.session import input_dtypes

        self.session, self.meta = session, meta
        dtypes = input_dtypes(session)
        self.table = table if meta.prompt_table_input else None
        shape = (rows, meta.num_kv_heads, capacity, meta.head_dim)
        self.past = [
            np.zeros(shape, dtype=dtypes[f"past_key_values.{i}.{kind}"])
            for i in range(meta.num_layers)
            for kind in ("key", "value")
        ]
        self._scores = [name for name in meta.outputs if name in TARGET_OUTPUTS]  # last, after the presents

    def score(self, ids, positions) -> np.ndarray:
        """The graph's target_logprobs for a prefill of `ids` scored on its own next ids (virtual ones as 0), on a
        fresh cache: [B, S-1], column c the log-prob of ids[:, c + 1]."""
        targets = np.where(ids[:, 1:] >= self.meta.vocab_size, 0, ids[:, 1:]).astype(np.int64)
        feeds = {"input_ids": ids, "position_ids": positions, TARGET_INPUT: targets}
        if self.table is not None:
            feeds["prompt_table"] = self.table
        names = [f"past_key_values.{i}.{kind}" for i in range(self.meta.num_layers) for kind in ("key", "value")]
        feeds.update((name, np.zeros_like(past)) for name, past in zip(names, self.past, strict=True))
        return self.session.run([TARGET_OUTPUTS[0]], feeds)[0]

    def step(self, ids, positions) -> np.ndarray:
        feeds = {"input_ids": ids, "position_ids": positions}
        if self.table is not None:
            feeds["prompt_table"] = self.table
        names = [f"past_key_values.{i}.{kind}" for i in range(self.meta.num_layers) for kind in ("key", "value")]
        feeds.update(zip(names, self.past, strict=True))
        outputs = self.session.run(self.meta.outputs[: len(self.meta.outputs) - len(self._scores)], feeds)
        self.past = outputs[-2 * self.meta.num_layers :]
        if self.meta.top_k:
            # Full logits are not in the graph: scatter the top-k log-probs (rest -inf) so argmax still compares.
            values, indices = outputs[0], outputs[1]
            dense = np.full((ids.shape[0], self.meta.vocab_size), -np.inf, dtype=np.float32)
            np.put_along_axis(dense, indices, values, axis=1)
            return dense
        return outputs[0].astype(np.float32)


def verify_export(folder: Path, model, table, meta: ExportMeta, *, device: str, steps: int) -> dict[str, Any]:
    """Run both sides on the sample batch for `steps` greedy steps; returns the report (passed, diffs, agreement)."""
    import torch
    from transformers import AutoTokenizer

    from softtool.runtime.session import create_session

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    rows, _ = sample_rows(tokenizer, meta)
    ids, mask, ref_positions = left_pad(rows, meta.pad_token_id)
    capacity = ids.shape[1] + steps + 1
    # The graph's positions: each row from 0, its left padding in the scratch column.
    positions = np.where(mask == 1, ref_positions, capacity - 1)
    reference = TorchReference(model, table, meta.vocab_size)
    session = create_session(folder / ExportMeta.MODEL_FILE, device)
    ort_side = OrtStepper(session, meta, table.numpy().astype(np.float32), len(rows), capacity)

    # The prompt scores (target_logprobs) of the prefill, on the columns where a real token follows a real one.
    score_diff = None
    if meta.target_top_k:
        got = ort_side.score(ids, positions)
        reference.step(ids, mask, ref_positions)  # a throwaway prefill: its logits at every position
        want = np.take_along_axis(
            reference.first_logprobs[:, :-1], np.minimum(ids[:, 1:], meta.vocab_size - 1)[..., None], -1
        )
        real = (mask[:, :-1] == 1) & (ids[:, 1:] < meta.vocab_size)
        score_diff = float(np.abs(got - want[..., 0])[real].max())
        reference.cache = None

    diffs, agree = [], []
    for _ in range(steps):
        want = reference.step(ids, mask, ref_positions)
        got = ort_side.step(ids, positions)
        if meta.top_k:
            # Compare log-probs on the graph's top-k ids only.
            want = torch.log_softmax(torch.from_numpy(want), -1).numpy()
            keep = np.isfinite(got)
            diffs.append(float(np.abs(np.where(keep, got - want, 0)).max()))
        else:
            diffs.append(float(np.abs(got - want).max()))
        chosen = want.argmax(-1)
        agree.extend((got.argmax(-1) == chosen).tolist())
        ids = chosen[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
        ref_positions = ref_positions[:, -1:] + 1
        positions = ref_positions

    max_diff, rate = max(diffs), float(np.mean(agree))
    limit_diff, limit_rate = THRESHOLDS[meta.dtype]
    failures = []
    if not all(math.isfinite(d) for d in diffs):
        failures.append("the graph's logits are not finite (NaN or infinity)")
    elif limit_diff is not None and max_diff > limit_diff:
        failures.append(f"max logit difference {max_diff:.3g} exceeds {limit_diff:g}")
    if rate < limit_rate:
        failures.append(f"greedy tokens agree on {rate:.1%} of {len(agree)} steps, below {limit_rate:.0%}")
    if score_diff is not None and not math.isfinite(score_diff):
        failures.append("the graph's prompt log-probs are not finite")
    elif score_diff is not None and limit_diff is not None and score_diff > limit_diff:
        failures.append(f"prompt log-prob difference {score_diff:.3g} exceeds {limit_diff:g}")
    return {
        "passed": not failures,
        "failure": "; ".join(failures),
        "device": device,
        "steps": steps,
        "batch": len(rows),
        "max_abs_logit_diff": max_diff if math.isfinite(max_diff) else None,
        "prefill_abs_logit_diff": diffs[0] if math.isfinite(diffs[0]) else None,
        "prompt_logprob_abs_diff": score_diff,
        "greedy_agreement": rate,
        "thresholds": {"max_abs_logit_diff": limit_diff, "greedy_agreement": limit_rate},
    }
