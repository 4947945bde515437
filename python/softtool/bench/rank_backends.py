"""The backends of the classify workload (softtool.bench.rank), and timing one of them.

    hf-rank  the peer: plain transformers as its users (and lm-evaluation-harness's HF model) score labels. Per
             batch, one row per (example, label) holding the example's ids and the label's ids but the last,
             right-padded, the soft prompt merged into inputs_embeds; one forward without any KV cache; the
             label tokens' log-probs (log-softmax of the logits that predict them) summed. No prefix is shared.
    torch    softtool.classify.rank_rows on the adapter's TorchGenerator (runtime.choices.score_choices: each
             example's prompt prefilled once, all but its last token, and every label scored over a copy of its
             KV cache with the model's target scoring)
    onnx     the same on the adapter's export (the traced form, which scores targets in the graph), ONNX Runtime

Each scores one batch of examples at a time (workload.batches, the same for all) and returns every label's summed
log-prob after each example; predictions are the best labels. A backend that cannot run raises
BackendUnavailable, as the generation backends do.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from softtool.bench.backends import BackendUnavailable
from softtool.bench.measure import peak_rss_mb, set_threads
from softtool.bench.options import BenchOptions
from softtool.bench.rank import RankWorkload
from softtool.errors import SofttoolError


class RankBackend:
    name = ""

    def __init__(self, options: BenchOptions, workload: RankWorkload) -> None:
        self.options = options
        self.workload = workload
        # Where the time of a backend that has parts goes: softtool's prefill_s and score_s (runtime.choices)
        self.timings: dict[str, float] = {}

    def load(self) -> None:
        """Load weights and graphs (timed apart from scoring)."""

    def score(self, batch: list[int]) -> np.ndarray:
        """Every label's summed log-prob after each example of `batch`: float64 [len(batch), labels]."""
        raise NotImplementedError


class HfRankBackend(RankBackend):
    name = "hf-rank"

    def load(self) -> None:
        from softtool.adapter import load_adapter
        from softtool.models import load_model

        self.model = load_model(self.options.model, dtype=self.options.dtype, device=self.options.device)
        table = load_adapter(self.workload.adapter_dir).prompt_table
        self.table = table.to(device=self.model.device, dtype=self.model.dtype)

    def score(self, batch: list[int]) -> np.ndarray:
        import torch

        from softtool.prompts.embedding import merge_embeddings

        w = self.workload
        pairs = [(w.rows[i], choice) for i in batch for choice in w.choices]
        # Position t predicts token t + 1, so a row reads its example and its label but the label's last token.
        inputs = [row + choice[:-1] for row, choice in pairs]
        span = max(len(c) for c in w.choices)
        ids = torch.full((len(pairs), max(map(len, inputs))), w.pad_token_id, dtype=torch.long)
        where = torch.zeros((len(pairs), span), dtype=torch.long)
        targets = torch.zeros((len(pairs), span), dtype=torch.long)
        mask = torch.zeros((len(pairs), span), dtype=torch.bool)
        for k, ((row, choice), seq) in enumerate(zip(pairs, inputs, strict=True)):
            ids[k, : len(seq)] = torch.as_tensor(seq)
            where[k, : len(choice)] = torch.arange(len(row) - 1, len(row) - 1 + len(choice))
            targets[k, : len(choice)] = torch.as_tensor(choice)
            mask[k, : len(choice)] = True
        device = self.model.device
        with torch.inference_mode():
            embeds = merge_embeddings(self.model, ids.to(device), self.table, w.vocab_size)
            # Right padding: the pads come after every real token, so causal attention keeps them out of what is
            # read, and no attention mask is needed (lm-evaluation-harness passes none either). No cache: nothing
            # is decoded after this forward.
            logits = self.model(inputs_embeds=embeds, use_cache=False).logits
            # The log-softmax of only the positions that predict a label token (lm-evaluation-harness normalizes
            # every position; the same numbers, less work for the peer).
            picked = logits.gather(1, where.to(device).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
            logprobs = torch.log_softmax(picked.float(), dim=-1).gather(-1, targets.to(device).unsqueeze(-1))[..., 0]
            scores = (logprobs.double() * mask.to(device)).sum(-1)
        return scores.cpu().numpy().reshape(len(batch), len(w.choices))


class TorchRankBackend(RankBackend):
    name = "torch"
    runtime = "torch"

    def source_dir(self) -> Path:
        return self.workload.adapter_dir

    def runtime_kwargs(self) -> dict:
        return {"model_name": self.options.model, "device": self.options.device, "dtype": self.options.dtype}

    def load(self) -> None:
        from softtool.data import get_task
        from softtool.runtime import load_generator

        try:
            self.generator = load_generator(str(self.source_dir()), self.runtime, **self.runtime_kwargs())
        except SofttoolError as exc:
            raise BackendUnavailable(f"softtool.runtime cannot load the {self.runtime} backend: {exc}") from exc
        self.task = get_task("classify", **self.workload.task_options)

    def score(self, batch: list[int]) -> np.ndarray:
        from softtool.classify import rank_rows

        rows = [self.workload.rows[i] for i in batch]
        # What `softtool eval` runs per batch: a trained prompt's labels are scored with the EOS after them.
        scores, _ = rank_rows(self.generator, self.task, rows, [0] * len(rows), eos=True, timings=self.timings)
        return scores


class OnnxRankBackend(TorchRankBackend):
    name = "onnx"
    runtime = "onnx"

    def source_dir(self) -> Path:
        if not self.options.onnx_dir:
            raise BackendUnavailable("no export to run: the bench exports the adapter before the backends run")
        return Path(self.options.onnx_dir)

    def runtime_kwargs(self) -> dict:
        device = self.options.onnx_device
        return {"device": device, "strict_device": device != "cpu", "threads": self.options.threads}


RANK_BACKENDS: dict[str, type[RankBackend]] = {b.name: b for b in (HfRankBackend, TorchRankBackend, OnnxRankBackend)}


def run_rank_backend(name: str, options: BenchOptions, workload: RankWorkload, isolated: bool) -> dict[str, Any]:
    """Load one backend, score `warmup` batches untimed, then time `repeats` passes over every batch."""
    set_threads(options.threads)
    backend = RANK_BACKENDS[name](options, workload)
    start = time.perf_counter()
    try:
        backend.load()
        load_s = time.perf_counter() - start
        for batch in workload.batches[: options.warmup]:
            backend.score(batch)
    except BackendUnavailable as exc:
        return {"name": name, "status": "skipped", "reason": str(exc)}
    warmup_s = time.perf_counter() - start - load_s
    scores = np.zeros((len(workload.rows), len(workload.choices)))
    backend.timings.clear()  # the timed passes only
    passes = []
    for _ in range(options.repeats):
        t0 = time.perf_counter()
        for batch in workload.batches:
            scores[batch] = backend.score(batch)
        passes.append(time.perf_counter() - t0)
    total = sum(passes)
    return {
        "name": name,
        "status": "ok",
        "examples": len(workload.rows),
        "examples_per_s": len(workload.rows) * options.repeats / total,
        "pass_s": passes,
        "timed_s": total,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_isolated": isolated,
        # softtool's split of timed_s: the prompts' prefill (with the cache copies) and the labels' forward
        **{key: backend.timings[key] for key in ("prefill_s", "score_s") if key in backend.timings},
        "scores": scores.tolist(),
    }


def main(argv: list[str] | None = None) -> None:
    """Worker entry: `python -m softtool.bench.rank_backends SPEC.json RESULT.json` runs one backend alone."""
    spec_path, result_path = (argv or sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text())
    options = BenchOptions(**spec["options"])
    result = run_rank_backend(spec["backend"], options, RankWorkload.from_json(spec["workload"]), isolated=True)
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
