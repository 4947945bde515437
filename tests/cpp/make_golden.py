"""Write the golden files the C++ tests replay (tests/cpp/golden/*.txt), so ctest needs no Python.

Each file holds a search's options, its prompts, the raw logits transformers computed at every step of
its own generate() (output_logits=True) and the hypotheses (tokens without EOS, score) it returned. The
C++ search, fed those logits step by step, must reproduce the hypotheses.

Regenerate with:  .venv/bin/python tests/cpp/make_golden.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers import PARITY_PAD, PARITY_VOCAB, parity_llama  # noqa: E402

VERSION = 1
VOCAB = PARITY_VOCAB
PAD = PARITY_PAD
OUT = Path(__file__).resolve().parent / "golden"

CASES = {
    "greedy_eos": dict(num_beams=1, num_return_sequences=1, max_new_tokens=8, repetition_penalty=1.2),
    "beam3_eos": dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, length_penalty=0.8),
    "beam4_never_ngram": dict(
        num_beams=4, num_return_sequences=4, max_new_tokens=6, early_stopping="never", no_repeat_ngram_size=2
    ),
}


def strip(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@torch.no_grad()
def write_case(m: LlamaForCausalLM, name: str, opts: dict) -> None:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 2, 8)]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (ids != PAD).long()
    free = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    eos = int(free[0, width + 2])  # a token the model really emits mid-sequence
    early = opts.get("early_stopping", False)
    out = m.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=PAD,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
        **opts,
    )
    k = opts["num_return_sequences"]
    new = out.sequences[:, width:].tolist()
    if opts["num_beams"] > 1:
        scores = out.sequences_scores.tolist()
    else:
        logp = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1)
        scores = []
        for i, row in enumerate(new):
            n = len(strip(row, eos))
            n = n + 1 if n < len(row) else n
            scores.append(float(sum(logp[i, t, row[t]] for t in range(n))))
    lines = [
        f"# softtool golden v{VERSION}: {name}",
        "# regenerate: .venv/bin/python tests/cpp/make_golden.py",
        f"version {VERSION}",
        "options max_new_tokens {} num_beams {} num_return_sequences {} length_penalty {} early_stopping {} "
        "repetition_penalty {} no_repeat_ngram_size {} eos {} pad {}".format(
            opts["max_new_tokens"],
            opts["num_beams"],
            k,
            opts.get("length_penalty", 1.0),
            {False: 0, True: 1, "never": 2}[early],
            opts.get("repetition_penalty", 1.0),
            opts.get("no_repeat_ngram_size", 0),
            eos,
            PAD,
        ),
        f"prompts {len(prompts)}",
    ]
    lines += [" ".join(map(str, [width - len(p), len(p), *p])) for p in prompts]
    rows, vocab = out.logits[0].shape
    lines.append(f"steps {len(out.logits)} rows {rows} vocab {vocab}")
    for step in out.logits:
        lines += [" ".join(f"{v:.9g}" for v in row) for row in step.float().tolist()]
    lines.append(f"expected {len(prompts)} {k}")
    for i in range(len(prompts) * k):
        tokens = strip(new[i], eos)
        lines.append(" ".join(map(str, [f"{scores[i]:.9g}", len(tokens), *tokens])))
    (OUT / f"{name}.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    m = parity_llama()
    for name, opts in CASES.items():
        write_case(m, name, opts)
        print(f"wrote {OUT / name}.txt")


if __name__ == "__main__":
    main()
