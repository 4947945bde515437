"""`softtool serve --engine vllm`: softtool's task API in front of vLLM servers that decode from `prompt_embeds`.

vLLM cannot load a soft prompt, but its completions API takes a request's input as embeddings (`prompt_embeds`,
with `--enable-prompt-embeds`): the task's prompt table and the embedded text, in the template's order. softtool
keeps everything that is about tasks (templates, fields, prefix mode, stop strings, n, detokenizing, log-prob
entries, the task's decoding defaults) and vLLM does the decoding, batching and scaling out.

- `balancer`: the vLLM URLs, their health and least-outstanding-requests choice;
- `backend`: `VllmEngine`, the serve engine whose rows become vLLM requests (what `AsyncEngine` is for softtool's
  own decode loop);
- `processor`: the logits processor that runs inside vLLM (no-repeat n-gram and repetition penalty over the
  prompt's token ids, which vLLM does not see when it gets embeddings).

See docs/serve.md, "Scaling out".
"""
