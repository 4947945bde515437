"""Self-check of a fresh export: ONNX Runtime against the PyTorch model on a sample batch, prefill and decode.

Both sides are fed the same tokens (PyTorch's greedy choice at every step), so the logit difference is
measured on identical inputs at every step, and "the argmax agrees at every step" is exactly "greedy
decoding gives the same tokens". The reference is plain transformers (its own attention, a left-padded 2-D
mask, its own KV cache), not softtool's slot model, so the check also covers the slot cache and the wrapper.
The traced graph runs through plain `session.run` with numpy arrays, as any onnxruntime user would run it;
the gqa graph, whose past and present must share memory, through IO binding of OrtValues (no torch). The
traced prefill is also scored on its own next tokens (the graph's target_logprobs, what `serve` echoes) against
transformers' log-softmax at every position.
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
    """Feeds an exported graph step by step: a prefill of the rows, then one token per row per step."""

    def __init__(self, session, meta: ExportMeta, table: np.ndarray | None, device: str, capacity: int):
        from softtool.runtime.session import input_dtypes

        self.session, self.meta, self.device, self.capacity = session, meta, device, capacity
        self.kv_dtype = input_dtypes(session)["past_key_values.0.key"]
        self.table = table if meta.prompt_table_input else None
        self.names = [f"past_key_values.{i}.{kind}" for i in range(meta.num_layers) for kind in ("key", "value")]
        self.past: list[np.ndarray] = []
        self.positions = np.zeros(0, dtype=np.int64)
        self._scores = [name for name in meta.outputs if name in TARGET_OUTPUTS]  # last, after the presents

    def score(self, ids, positions) -> np.ndarray:
        """The traced graph's target_logprobs for a prefill of `ids` scored on its own next ids (virtual ones as
        0), on a fresh cache: [B, S-1], column c the log-prob of ids[:, c + 1]."""
        targets = np.where(ids[:, 1:] >= self.meta.vocab_size, 0, ids[:, 1:]).astype(np.int64)
        feeds = {**self._feeds(ids, positions), TARGET_INPUT: targets}
        feeds.update(zip(self.names, self._empty(len(ids), self.capacity), strict=True))
        return self.session.run([TARGET_OUTPUTS[0]], feeds)[0]

    def _empty(self, rows: int, width: int) -> list[np.ndarray]:
        shape = (rows, self.meta.num_kv_heads, width, self.meta.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in self.names]

    def prefill(self, rows: list[list[int]]) -> np.ndarray:
        lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
        if self.meta.kv_layout == "gqa":
            # Right-padded (padding at position -1) over a cache exactly as wide, then copied into full rows.
            width = int(lengths.max())
            ids = np.zeros((len(rows), width), dtype=np.int64)
            positions = np.full((len(rows), width), -1, dtype=np.int64)
            for b, row in enumerate(rows):
                ids[b, : len(row)] = row
                positions[b, : len(row)] = np.arange(len(row))
            temp = self._empty(len(rows), width)
            head = self._run_shared(ids, positions, temp)
            self.past = self._empty(len(rows), self.capacity)
            for full, part in zip(self.past, temp, strict=True):
                full[:, :, :width] = part
        else:
            ids, mask, _ = left_pad(rows, self.meta.pad_token_id)
            # Each row from position 0, its left padding in the scratch column.
            positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, self.capacity - 1)
            self.past = self._empty(len(rows), self.capacity)
            head = self._run(ids, positions)
        self.positions = lengths
        return head

    def step(self, tokens: np.ndarray) -> np.ndarray:
        ids, positions = tokens[:, None].astype(np.int64), self.positions[:, None]
        head = (
            self._run_shared(ids, positions, self.past) if self.meta.kv_layout == "gqa" else self._run(ids, positions)
        )
        self.positions = self.positions + 1
        return head

    def _feeds(self, ids, positions) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, "position_ids": positions}
        if self.table is not None:
            feeds["prompt_table"] = self.table
        return feeds

    def _run(self, ids, positions) -> np.ndarray:
        """The traced graph: plain session.run (its target scores left out); its present buffers become the next past."""
        feeds = self._feeds(ids, positions)
        feeds.update(zip(self.names, self.past, strict=True))
        outputs = self.session.run(self.meta.outputs[: len(self.meta.outputs) - len(self._scores)], feeds)
        self.past = outputs[-2 * self.meta.num_layers :]
        return self._dense(outputs[: 2 if self.meta.top_k else 1])

    def _run_shared(self, ids, positions, kv: list[np.ndarray]) -> np.ndarray:
        """The gqa graph: each layer's past and present bound to one buffer, written in place, read back into `kv`."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in self._feeds(ids, positions).items():
            binding.bind_cpu_input(name, value)
        binding.bind_cpu_input("total_sequence_length", np.asarray(kv[0].shape[2], dtype=np.int32))
        head = ["topk_values", "topk_indices"] if self.meta.top_k else ["logits"]
        for name in head:
            binding.bind_output(name, "cpu")
        values = [ort.OrtValue.ortvalue_from_numpy(buf, self.device, 0) for buf in kv]
        for name, value in zip(self.names, values, strict=True):
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
        self.session.run_with_iobinding(binding)
        for buf, value in zip(kv, values, strict=True):
            buf[...] = value.numpy()
        return self._dense([o.numpy() for o in binding.get_outputs()[: len(head)]])

    def _dense(self, head: list[np.ndarray]) -> np.ndarray:
        if self.meta.top_k:
            # Full logits are not in the graph: scatter the top-k log-probs (rest -inf) so argmax still compares.
            values, indices = head
            dense = np.full((values.shape[0], self.meta.vocab_size), -np.inf, dtype=np.float32)
            np.put_along_axis(dense, indices, values, axis=1)
            return dense
        logits = head[0].astype(np.float32)
        return logits[:, -1] if logits.ndim == 3 else logits  # the genai form's [B, 1, V]


def verify_export(folder: Path, model, table, meta: ExportMeta, *, device: str, steps: int) -> dict[str, Any]:
    """Run both sides on the sample batch for `steps` greedy steps; returns the report (passed, diffs, agreement)."""
    import torch
    from transformers import AutoTokenizer

    from softtool.runtime.session import create_session

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    rows, _ = sample_rows(tokenizer, meta)
    ids, mask, ref_positions = left_pad(rows, meta.pad_token_id)
    capacity = ids.shape[1] + steps + 1
    reference = TorchReference(model, table, meta.vocab_size)
    session = create_session(folder / ExportMeta.MODEL_FILE, device)
    ort_side = OrtStepper(session, meta, table.numpy().astype(np.float32), device, capacity)

    # The prompt scores (target_logprobs) of the prefill, on the columns where a real token follows a real one.
    score_diff = None
    if meta.target_top_k:
        # The traced graph's prefill layout: each row from position 0, its left padding in the scratch column.
        got = ort_side.score(ids, np.where(mask == 1, ref_positions, capacity - 1))
        reference.step(ids, mask, ref_positions)  # a throwaway prefill: its logits at every position
        want = np.take_along_axis(
            reference.first_logprobs[:, :-1], np.minimum(ids[:, 1:], meta.vocab_size - 1)[..., None], -1
        )
        real = (mask[:, :-1] == 1) & (ids[:, 1:] < meta.vocab_size)
        score_diff = float(np.abs(got - want[..., 0])[real].max())
        reference.cache = None

    diffs, agree = [], []
    for step in range(steps):
        want = reference.step(ids, mask, ref_positions)
        got = ort_side.prefill(rows) if step == 0 else ort_side.step(ids[:, 0])
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
