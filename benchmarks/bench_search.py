"""Benchmark: one beam-search step of softtool's C++ core versus transformers' own step, same inputs.

Records real SmolLM2-135M logits (or --model's) for 16 Multi30k validation sentences (batch 16, beam 4: 64 rows of
49,152 logits) by decoding a few steps live, then times the post-forward work of step `--step` alone:

- C++: `BeamSearch.step(logits)` (log_softmax, processors, top-k, beam bookkeeping, all in C++).
- transformers: exactly the code `GenerationMixin._beam_search` runs between the forward pass and the
  next forward, calling transformers' own functions: log_softmax, the LogitsProcessorList, adding the
  running scores, `_get_top_k_continuations`, the StoppingCriteriaList, `_get_running_beams_for_next_
  iteration`, `_update_finished_beams`, the cache index `_flatten_beam_dim(running_beam_indices[...])`,
  `_check_early_stop_heuristic` and `_beam_search_has_unfinished_sequences` (the KV-cache reorder itself
  is excluded from both sides). transformers is timed with 1 and --torch-threads torch threads, the core
  with 1 thread and one per core; the speedup compares the best of each.

Before timing, both are replayed through steps 0..step-1 with the recorded logits, and the step's outputs
(tokens, cache indices, running scores) are checked to be identical. Writes
benchmarks/results/search_step.json.

    .venv/bin/python benchmarks/bench_search.py [--data ../shared/data] [--reps 30]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from softtool.bench.limits import cpu_model, git_commit

REPO = Path(__file__).resolve().parents[1]


def record_logits(model_name: str, data: Path, batch: int, beams: int, steps: int, opts_kwargs: dict) -> tuple:
    """Decode `steps` steps live with the model + the core; return the prompts (bare and left-padded), the
    per-step logits and the model."""
    from softtool import search
    from softtool.models import load_model, load_tokenizer

    tok = load_tokenizer(model_name)
    model = load_model(model_name)
    with gzip.open(data / "multi30k" / "val.en.gz", "rt", encoding="utf-8") as f:
        sentences = [next(f).strip() for _ in range(batch)]
    prompts = [
        tok(f"Translate English to German.\nEnglish: {s}\nGerman:", add_special_tokens=False)["input_ids"]
        for s in sentences
    ]
    vocab = model.config.vocab_size
    pad = tok.pad_token_id if tok.pad_token_id is not None else 2
    b = search.build_batch(
        [[np.array(p)] for p in prompts], 0, [("text", 0)], search.BatchOptions(vocab, 0, pad_id=pad)
    )
    s = search.make_search(search.SearchOptions(num_beams=beams, **opts_kwargs))
    width = b.input_ids.shape[1]
    s.start(prompts, left_padding=[width - len(p) for p in prompts])
    ids = torch.from_numpy(b.input_ids).repeat_interleave(beams, 0)
    mask = torch.from_numpy(b.attention_mask).repeat_interleave(beams, 0)
    pos = torch.from_numpy(b.position_ids).repeat_interleave(beams, 0)
    recorded = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        for _ in range(steps + 1):
            logits = out.logits[:, -1].float().numpy().copy()
            recorded.append(logits)
            r = s.step(logits)
            cache = out.cache
            cache.reorder_cache(torch.from_numpy(r.beam_indices))
            mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=mask.dtype)], 1)
            pos = pos[:, -1:] + 1
            out = model(
                input_ids=torch.from_numpy(r.next_tokens)[:, None],
                attention_mask=mask,
                position_ids=pos,
                cache=cache,
                use_cache=True,
            )
    padded = [[pad] * (width - len(p)) + p for p in prompts]
    return prompts, padded, recorded, model


class TransformersBeamStep:
    """The state and per-step post-forward code of transformers 5.x `_beam_search`, using its functions."""

    def __init__(self, model, padded: list[list[int]], beams: int, opts: dict):
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            NoRepeatNGramLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
        )
        from transformers.generation.stopping_criteria import (
            EosTokenCriteria,
            MaxLengthCriteria,
            StoppingCriteriaList,
        )

        self.m = model
        input_ids = torch.tensor(padded).repeat_interleave(beams, 0)
        self.batch, self.beams = len(padded), beams
        self.cur_len = self.prompt_len = input_ids.shape[1]
        self.max_length = self.prompt_len + opts["max_new_tokens"]
        self.length_penalty = opts.get("length_penalty", 1.0)
        self.early_stopping = opts.get("early_stopping", False)
        eos = torch.tensor(opts["eos_token_ids"])
        self.processors = LogitsProcessorList()
        if opts.get("repetition_penalty", 1.0) != 1.0:
            lengths = torch.tensor([row.index(next(t for t in row if t != opts["pad_token_id"])) for row in padded])
            self.processors.append(
                RepetitionPenaltyLogitsProcessor(
                    opts["repetition_penalty"], prompt_ignore_length=lengths.repeat_interleave(beams)
                )
            )
        if opts.get("no_repeat_ngram_size", 0):
            self.processors.append(NoRepeatNGramLogitsProcessor(opts["no_repeat_ngram_size"]))
        self.stopping = StoppingCriteriaList([MaxLengthCriteria(self.max_length), EosTokenCriteria(eos)])
        self.beams_to_keep = max(2, 1 + eos.shape[0]) * beams
        self.top_num_beam_mask = torch.cat(
            (torch.ones(beams, dtype=torch.bool), torch.zeros(self.beams_to_keep - beams, dtype=torch.bool))
        )
        b, n = self.batch, beams
        self.running_sequences = torch.full((b, n, self.max_length), opts["pad_token_id"], dtype=torch.int64)
        self.running_sequences[:, :, : self.cur_len] = self.m._unflatten_beam_dim(input_ids, b, n)
        self.sequences = self.running_sequences.clone()
        self.running_beam_scores = torch.zeros((b, n))
        self.running_beam_scores[:, 1:] = -1e9
        self.beam_scores = torch.full((b, n), -1e9)
        self.is_sent_finished = torch.zeros((b, n), dtype=torch.bool)
        self.unsatisfied = torch.ones((b, 1), dtype=torch.bool)
        self.running_beam_indices = torch.full((b, n, self.max_length - self.cur_len), -1, dtype=torch.int32)
        self.beam_indices = self.running_beam_indices.clone()

    def step(self, logits: torch.Tensor):
        m, b, n, cur_len = self.m, self.batch, self.beams, self.cur_len
        flat_running_sequences = m._flatten_beam_dim(self.running_sequences[:, :, :cur_len])
        log_probs = torch.nn.functional.log_softmax(logits, dim=-1)
        log_probs = self.processors(flat_running_sequences, log_probs)
        log_probs = m._unflatten_beam_dim(log_probs, b, n)
        log_probs = log_probs + self.running_beam_scores[:, :, None]
        log_probs = torch.reshape(log_probs, (b, -1))
        topk_log_probs, topk_running_sequences, topk_running_beam_indices = m._get_top_k_continuations(
            accumulated_log_probs=log_probs,
            running_sequences=self.running_sequences,
            running_beam_indices=self.running_beam_indices,
            cur_len=cur_len,
            decoder_prompt_len=self.prompt_len,
            do_sample=False,
            beams_to_keep=self.beams_to_keep,
            num_beams=n,
            batch_size=b,
        )
        hits = self.stopping(m._flatten_beam_dim(topk_running_sequences[:, :, : cur_len + 1]), None)
        hits = m._unflatten_beam_dim(hits, b, self.beams_to_keep)
        self.running_sequences, self.running_beam_scores, self.running_beam_indices = (
            m._get_running_beams_for_next_iteration(
                topk_log_probs=topk_log_probs,
                topk_running_sequences=topk_running_sequences,
                topk_running_beam_indices=topk_running_beam_indices,
                next_token_hits_stopping_criteria=hits,
                num_beams=n,
            )
        )
        self.sequences, self.beam_scores, self.beam_indices, self.is_sent_finished = m._update_finished_beams(
            sequences=self.sequences,
            topk_running_sequences=topk_running_sequences,
            beam_scores=self.beam_scores,
            topk_log_probs=topk_log_probs,
            beam_indices=self.beam_indices,
            topk_running_beam_indices=topk_running_beam_indices,
            is_early_stop_heuristic_unsatisfied=self.unsatisfied,
            is_sent_finished=self.is_sent_finished,
            next_token_hits_stopping_criteria=hits,
            top_num_beam_mask=self.top_num_beam_mask,
            num_beams=n,
            cur_len=cur_len,
            decoder_prompt_len=self.prompt_len,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
        )
        beam_idx = m._flatten_beam_dim(self.running_beam_indices[..., cur_len - self.prompt_len])
        next_tokens = m._flatten_beam_dim(self.running_sequences[:, :, cur_len])
        self.cur_len = cur_len + 1
        self.unsatisfied = m._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=self.unsatisfied,
            running_beam_scores=self.running_beam_scores,
            beam_scores=self.beam_scores,
            is_sent_finished=self.is_sent_finished,
            cur_len=self.cur_len,
            max_length=self.max_length,
            decoder_prompt_len=self.prompt_len,
            early_stopping=self.early_stopping,
            length_penalty=self.length_penalty,
        )
        finished = not m._beam_search_has_unfinished_sequences(
            self.unsatisfied, self.is_sent_finished, hits, self.early_stopping
        )
        return next_tokens, beam_idx, finished


def time_ms(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    from softtool.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model whose logits are recorded")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--step", type=int, default=3, help="which step to time (after replaying the earlier ones)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=2, help="also timed with 1 thread")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "search_step.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    load_at_start = os.getloadavg()[0]
    from softtool import search

    configs = {
        "plain": dict(max_new_tokens=64, eos_token_ids=[2], pad_token_id=2, length_penalty=1.0),
        "processors": dict(
            max_new_tokens=64, eos_token_ids=[2], pad_token_id=2, repetition_penalty=1.2, no_repeat_ngram_size=3
        ),
    }
    results = {}
    model = None
    for name, opts in configs.items():
        prompts, padded, logits, model = record_logits(args.model, args.data, args.batch, args.beams, args.step, opts)
        width = len(padded[0])
        pads = [width - len(p) for p in prompts]

        def core_at_step(threads: int, opts=opts, prompts=prompts, pads=pads, logits=logits):
            s = search.make_search(search.SearchOptions(num_beams=args.beams, num_threads=threads, **opts))
            s.start(prompts, left_padding=pads)
            for k in range(args.step):
                s.step(logits[k])
            return s

        def hf_at_step(opts=opts, padded=padded, logits=logits, model=model):
            h = TransformersBeamStep(model, padded, args.beams, opts)
            for k in range(args.step):
                h.step(torch.from_numpy(logits[k]))
            return h

        # Identical outputs at the timed step.
        r = core_at_step(1).step(logits[args.step])
        h = hf_at_step()
        tokens, beam_idx, _ = h.step(torch.from_numpy(logits[args.step]))
        identical = bool(
            np.array_equal(r.next_tokens, tokens.numpy()) and np.array_equal(r.beam_indices, beam_idx.numpy())
        )
        assert identical, f"{name}: the core and transformers chose different continuations"
        entry = {"identical_outputs": identical}
        x = torch.from_numpy(logits[args.step])
        for threads in sorted({1, args.torch_threads}):
            torch.set_num_threads(threads)
            it = iter([hf_at_step() for _ in range(args.reps + args.warmup)])
            entry[f"transformers_{threads}t_ms"] = time_ms(lambda it=it, x=x: next(it).step(x), args.reps, args.warmup)
        torch.set_num_threads(args.torch_threads)
        for threads in (1, os.cpu_count() or 1):
            states = iter([core_at_step(threads) for _ in range(args.reps + args.warmup)])
            entry[f"core_{threads}t_ms"] = time_ms(
                lambda st=states, y=logits[args.step]: next(st).step(y), args.reps, args.warmup
            )
        summary = {k: statistics.median(v) for k, v in entry.items() if k.endswith("_ms")}
        # The minimum is what each side costs when the shared machine does not preempt it.
        fastest = {k: min(v) for k, v in entry.items() if k.endswith("_ms")}
        best_core = min(v for k, v in summary.items() if k.startswith("core"))
        best_hf = min(v for k, v in summary.items() if k.startswith("transformers"))
        results[name] = {
            "options": opts,
            "identical_outputs": identical,
            "median_ms": summary,
            "min_ms": fastest,
            "speedup_min_core_vs_min_transformers": min(v for k, v in fastest.items() if k.startswith("transformers"))
            / min(v for k, v in fastest.items() if k.startswith("core")),
            "speedup_best_core_vs_best_transformers": best_hf / best_core,
            "samples_ms": {k: v for k, v in entry.items() if k.endswith("_ms")},
        }
        print(
            name,
            json.dumps(results[name]["median_ms"]),
            f"speedup {results[name]['speedup_best_core_vs_best_transformers']:.1f}x",
        )

    import transformers

    vocab = model.config.vocab_size
    commit = git_commit(REPO)
    report = {
        "benchmark": "one beam-search step, post-forward work only (see benchmarks/bench_search.py docstring)",
        "shape": {"batch": args.batch, "num_beams": args.beams, "rows": args.batch * args.beams, "vocab": vocab},
        "timed_step": args.step,
        "logits": f"{args.model}'s logits, Multi30k val sentences 1-{args.batch}, recorded live",
        "reps": args.reps,
        "warmup": args.warmup,
        "torch_threads": args.torch_threads,
        "results": results,
        "commit": commit,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_avg_1m": [load_at_start, os.getloadavg()[0]]},
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
        "command": " ".join([".venv/bin/python", "benchmarks/bench_search.py", *argv]),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
