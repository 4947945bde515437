"""The PyTorch generation backend: the frozen model plus a prompt table, decoding with a KV cache.

Each step runs the model's forward once and hands the last-position logits to the C++ search core
(softtool.search: greedy or beam), which returns the next tokens and the beam reordering applied to
the cache. For prefix templates the prompt's keys/values are computed once per task and shared by
every row and every call. When the compiled core is missing, transformers' generate() on the same
merged embeddings is used instead (same results, no prefix sharing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from softtool.adapter import Adapter, AdapterMeta, check_compatible, load_adapter
from softtool.errors import SofttoolError
from softtool.prompts.template import Template, assemble_ids
from softtool.runtime.base import Generator, Rows, SearchOptions
from softtool.training.forward import merge_embeddings

try:
    from softtool import search as _search
except ImportError:  # the compiled core is not built: fall back to transformers' generate
    _search = None


class TorchGenerator(Generator):
    """Generate with `model` and a prompt table [tasks*N, H] placed by `template`."""

    def __init__(
        self,
        model,
        tokenizer,
        template: Template,
        prompt_table: torch.Tensor | None = None,
        meta: AdapterMeta | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.meta = meta
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.device = model.get_input_embeddings().weight.device
        self.use_search = _search is not None
        self._prefix_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.set_prompt(prompt_table)

    @classmethod
    def from_adapter(
        cls,
        path: str | os.PathLike,
        *,
        model=None,
        tokenizer=None,
        template: str | None = None,
        model_name: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> TorchGenerator:
        """Load an adapter folder and its base model (or use the `model` given)."""
        from softtool.models import load_model, load_tokenizer

        adapter: Adapter = load_adapter(path)
        name = model_name or adapter.meta.base_model
        if model is None or tokenizer is None:
            if not name:
                raise SofttoolError(f"{path}: the adapter does not name its base model; pass --model")
            model = model if model is not None else load_model(name, dtype=dtype, device=device)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name)
        check_compatible(adapter, model)
        tmpl = Template.parse(template or adapter.meta.template)
        if tmpl.num_virtual_tokens != adapter.meta.num_virtual_tokens:
            raise SofttoolError(
                f"template {tmpl} has {tmpl.num_virtual_tokens} virtual tokens but the adapter {path} "
                f"has {adapter.meta.num_virtual_tokens}; pass a template with [P:{adapter.meta.num_virtual_tokens}]"
            )
        return cls(model, tokenizer, tmpl, adapter.prompt_table, adapter.meta)

    def set_prompt(self, prompt_table: torch.Tensor | None) -> None:
        """Swap the prompt table (e.g. during training evaluation); drops the cached prefix keys/values."""
        n = self.template.num_virtual_tokens
        if n and prompt_table is None:
            raise ValueError(f"template {self.template} has virtual tokens but no prompt table was given")
        if prompt_table is not None and (prompt_table.ndim != 2 or prompt_table.shape[0] % max(n, 1)):
            raise ValueError(f"prompt table of shape {tuple(prompt_table.shape)} does not fit {n} virtual tokens")
        dtype = self.model.get_input_embeddings().weight.dtype
        self.table = None if prompt_table is None else prompt_table.detach().to(self.device, dtype)
        self._prefix_kv.clear()

    # -- helpers ------------------------------------------------------------------------------------
    def _row_ids(self, rows: Rows, task_ids: Sequence[int]) -> list[list[int]]:
        slots = sum(1 for kind, _ in self.template.layout if kind == "text")
        for i, row in enumerate(rows):
            if len(row) != slots:
                raise ValueError(f"row {i} has {len(row)} text pieces but the template {self.template} has {slots}")
        return [assemble_ids(self.template, row, self.vocab_size, t) for row, t in zip(rows, task_ids, strict=True)]

    @torch.inference_mode()
    def _task_prefix(self, task_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if task_id not in self._prefix_kv:
            from softtool.training.forward import prefix_cache

            n = self.template.num_virtual_tokens
            cache = prefix_cache(self.model, self.table[task_id * n : (task_id + 1) * n], 1)
            self._prefix_kv[task_id] = [(layer.keys, layer.values) for layer in cache.layers]
        return self._prefix_kv[task_id]

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, rows: Rows, task_ids: list[int] | None, options: SearchOptions) -> list[list[list[int]]]:
        if not rows:
            return []
        task_ids = list(task_ids) if task_ids is not None else [0] * len(rows)
        ids = self._row_ids(rows, task_ids)
        if self.use_search:
            return self._generate_search(ids, task_ids, options)
        return self._generate_hf(ids, options)

    @torch.inference_mode()
    def _generate_search(self, ids: list[list[int]], task_ids: list[int], options: SearchOptions):
        from transformers import DynamicCache

        searcher = _search.make_search(options)
        searcher.start([torch.tensor([t for t in row if t < self.vocab_size], dtype=torch.long).numpy() for row in ids])
        repeat = searcher.num_rows // len(ids)
        order = [i for i in range(len(ids)) for _ in range(repeat)]  # item-major, as the search expects
        n = self.template.num_virtual_tokens
        prefix = n > 0 and self.template.is_prefix
        rows = [ids[i][n:] if prefix else ids[i] for i in order]
        width = max(len(r) for r in rows)
        pad = options.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's last token is at the end
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = mask.cumsum(-1) - 1
        positions = positions.masked_fill(mask == 0, 1)
        cache = DynamicCache(config=self.model.config)
        if prefix:
            per_task = {t: self._task_prefix(t) for t in set(task_ids)}
            layers = []
            for layer in range(len(per_task[task_ids[0]])):
                keys = torch.cat([per_task[task_ids[i]][layer][0] for i in order])
                values = torch.cat([per_task[task_ids[i]][layer][1] for i in order])
                layers.append((keys, values))
            cache = DynamicCache(layers, config=self.model.config)
            mask = torch.cat([mask.new_ones(len(rows), n), mask], dim=1)
            positions = positions + n
        embeds = merge_embeddings(self.model, input_ids, self.table, self.vocab_size)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        last = positions[:, -1]
        identity = np.arange(len(rows))
        for _ in range(options.max_new_tokens):
            result = searcher.step(out.logits[:, -1].float().cpu().numpy())
            if searcher.is_done():
                break
            order_np = np.asarray(result.beam_indices)
            if not np.array_equal(order_np, identity):  # greedy never reorders: skip copying the whole cache
                beams = torch.as_tensor(order_np, dtype=torch.long, device=self.device)
                cache.reorder_cache(beams)
                mask, last = mask[beams], last[beams]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            last = last + 1
            tokens = torch.as_tensor(result.next_tokens, dtype=torch.long, device=self.device).unsqueeze(1)
            out = self.model(
                input_ids=tokens, attention_mask=mask, position_ids=last.unsqueeze(1), cache=cache, use_cache=True
            )
        return [[[int(t) for t in hyp.tokens] for hyp in item] for item in searcher.finalize()]

    @torch.inference_mode()
    def _generate_hf(self, ids: list[list[int]], options: SearchOptions):
        width = max(len(r) for r in ids)
        pad = options.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        table = self.table if self.table is not None else torch.zeros(1, 1)
        embeds = merge_embeddings(self.model, input_ids, table, self.vocab_size)
        kwargs = dict(
            max_new_tokens=options.max_new_tokens,
            min_new_tokens=options.min_new_tokens or None,
            num_beams=options.num_beams,
            length_penalty=options.length_penalty,
            early_stopping=options.early_stopping,
            repetition_penalty=options.repetition_penalty,
            no_repeat_ngram_size=options.no_repeat_ngram_size,
            num_return_sequences=options.num_return_sequences,
            do_sample=options.do_sample,
            eos_token_id=list(options.eos_token_ids),
            pad_token_id=pad,
        )
        if options.do_sample:
            torch.manual_seed(options.seed)
            kwargs.update(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        eos = set(options.eos_token_ids)
        seqs = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            seqs.append(row[:cut])
        k = options.num_return_sequences
        return [seqs[i * k : (i + 1) * k] for i in range(len(ids))]
