"""`softtool bench --train`: softtool's training step against PEFT prompt tuning, like for like.

Both sides train the same prompt table (one vocabulary-sampled init), on the same model, examples,
batches in the same order, with the same AdamW and learning rate, and the same mean target-token
loss. softtool's step is its shared-prefix path (softtool.training: the prompt runs once per batch
and its keys/values are broadcast to every row); `softtool-naive` is the same code with the prompt
concatenated to every row, which is what PEFT does. Losses after K steps must agree (to `loss_rtol`),
which shows the speed is not bought with a different computation.
"""

from __future__ import annotations

import time
from typing import Any

from softtool.bench.limits import machine_info
from softtool.bench.measure import set_threads
from softtool.bench.options import TrainBenchOptions
from softtool.errors import SofttoolError

SIDES = ("peft", "softtool-naive", "softtool")


def _examples(options: TrainBenchOptions, task, count: int) -> list:
    from softtool.data import Example, load_split

    if options.inputs is not None:
        name = task.fields[0]
        pool = [
            Example(str(i), {name: text}, [ref])
            for i, (text, ref) in enumerate(zip(options.inputs, options.references or [], strict=True))
        ]
    else:
        pool = load_split(options.data, options.split, task=task, limit=count).examples
    if not pool:
        raise SofttoolError(f"{options.data}: split {options.split!r} has no examples")
    return [pool[i % len(pool)] for i in range(count)]  # cycle a small inline pool


def _features(options, tokenizer, task, template, examples, vocab):
    from softtool.data import encode_example
    from softtool.training.batching import make_feature

    out = []
    for ex in examples:
        # The budget is for text and target; the virtual tokens come on top, so every N sees the same text.
        budget = options.max_length + template.num_virtual_tokens
        enc = encode_example(tokenizer, template, task, ex, max_length=budget, with_target=True)
        out.append(make_feature(template, enc.pieces, enc.target_ids, vocab))
    return out


def _softtool_side(model, table, batches, options, vocab, pad, shared_prefix: bool):
    import torch

    from softtool.training.batching import collate
    from softtool.training.forward import batch_loss

    prompt = torch.nn.Parameter(table.clone())
    optimizer = torch.optim.AdamW([prompt], lr=options.lr)
    n = table.shape[0]

    def step(features):
        batch = collate(features, pad, prefix_tokens=n if shared_prefix else 0)
        loss_sum, count = batch_loss(model, batch.to(prompt.device), prompt, vocab)
        loss = loss_sum / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return _time_steps(step, batches, options)


def _peft_side(model, table, batches, options, pad):
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    n, hidden = table.shape
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n, token_dim=hidden)
    peft_model = get_peft_model(model, config)
    peft_model.prompt_encoder.to(table.device)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(table)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr)
    device = table.device

    def step(features):
        # PEFT takes text ids only and prepends the prompt itself; rows right-padded like softtool's.
        rows = [f.input_ids[n:] + f.target_ids for f in features]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (row, f) in enumerate(zip(rows, features, strict=True)):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, len(row) - len(f.target_ids) : len(row)] = torch.tensor(f.target_ids)
        loss = peft_model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    # Prompt tuning wraps the base model without changing it, so the next side gets it as it was.
    return _time_steps(step, batches, options)


def _time_steps(step, batches, options) -> dict[str, Any]:
    losses, times = [], []
    for i, features in enumerate(batches):
        t0 = time.perf_counter()
        losses.append(step(features))
        if i >= options.warmup:
            times.append(time.perf_counter() - t0)
    return {"losses": losses, "step_times_s": times}


def run_train_bench(options: TrainBenchOptions, command: str = "", progress=None) -> dict[str, Any]:

    from softtool.data import get_task
    from softtool.models import load_model, load_tokenizer
    from softtool.prompts.encoder import PromptConfig, initial_table

    set_threads(options.threads)
    say = progress or (lambda msg: None)
    tokenizer = load_tokenizer(options.model)
    model = load_model(options.model, device=options.device)
    task = get_task(options.task, **({"src": "en", "tgt": "de"} if options.task == "translation" else {}))
    embed = model.get_input_embeddings().weight
    vocab, pad = embed.shape[0], tokenizer.pad_token_id
    total = options.warmup + options.steps
    examples = _examples(options, task, options.batch_size * total)
    results = []
    for n in options.num_virtual_tokens:
        template = task.default_template(n)
        features = _features(options, tokenizer, task, template, examples, vocab)
        batches = [features[i * options.batch_size : (i + 1) * options.batch_size] for i in range(total)]
        table = initial_table(
            PromptConfig(num_virtual_tokens=n, init="vocab"), model.get_input_embeddings(), seed=options.seed
        )
        table = table.to(embed.device)
        tokens_per_pass = sum(len(f.input_ids) + len(f.target_ids) for b in batches[options.warmup :] for f in b)
        side_runs = {}
        for side in SIDES:
            say(f"training {side} with {n} virtual tokens")
            try:
                if side == "peft":
                    run = _peft_side(model, table, batches, options, pad)
                else:
                    run = _softtool_side(model, table, batches, options, vocab, pad, side == "softtool")
            except ImportError as exc:
                results.append({"name": side, "num_virtual_tokens": n, "status": "skipped", "reason": str(exc)})
                continue
            seconds = sum(run["step_times_s"])
            side_runs[side] = run
            results.append(
                {
                    "name": side,
                    "num_virtual_tokens": n,
                    "status": "ok",
                    "samples_per_s": options.batch_size * options.steps / seconds,
                    "tokens_per_s": tokens_per_pass / seconds,
                    "step_p50_s": sorted(run["step_times_s"])[len(run["step_times_s"]) // 2],
                    "losses": run["losses"],
                    "final_loss": run["losses"][-1],
                }
            )
        peft = side_runs.get("peft")
        for r in results:
            if r["num_virtual_tokens"] != n or r["status"] != "ok":
                continue
            base = next((x for x in results if x["num_virtual_tokens"] == n and x["name"] == "peft"), None)
            r["speedup_vs_peft"] = (
                r["samples_per_s"] / base["samples_per_s"] if base and base["status"] == "ok" else None
            )
            r["speedup_vs_hf"] = None  # no plain-transformers row in training: nothing to train without a prompt
            if peft is not None:
                diffs = [abs(a - b) for a, b in zip(r["losses"], peft["losses"], strict=True)]
                r["max_loss_diff_vs_peft"] = max(diffs)
                r["losses_agree"] = diffs[-1] <= options.loss_rtol * abs(peft["losses"][-1])
    return {
        "kind": "train",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "machine": machine_info(options.threads),
        "options": options.to_dict(),
        "backends": results,
        "notes": [
            "one process, sides run one after another on the same frozen model; tokens/s counts every row's "
            "virtual, input and target tokens (the same count for every side)"
        ],
    }
