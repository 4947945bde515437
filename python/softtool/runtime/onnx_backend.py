"""The ONNX Runtime generation backend: an exported folder (softtool export) driven by the C++ search core.

The KV cache never leaves the device between steps: the session runs with IO binding, each step's present
key/values are bound as the next step's past, and the beam reorder happens inside the graph (its beam_idx
input), so only the last position's logits (or top-k) come back to the host. For prefix templates the
prompt's keys/values are computed once per task when the generator loads and seed every request's cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from softtool.adapter import AdapterMeta
from softtool.errors import SofttoolError
from softtool.prompts.template import Template
from softtool.runtime.base import Generator, Rows, SearchOptions


def _search_module():
    try:
        from softtool import search
    except ImportError as exc:
        raise SofttoolError(
            "the ONNX backend needs the compiled search core (softtool._core); rebuild softtool with "
            "`pip install --no-build-isolation -e .`"
        ) from exc
    return search


def _batch_field(batch: Any, name: str) -> np.ndarray:
    value = batch[name] if isinstance(batch, Mapping) else getattr(batch, name)
    return np.ascontiguousarray(value, dtype=np.int64)


class OnnxGenerator(Generator):
    """Generate with an exported graph; tasks are rows of its prompt table (t*N .. t*N+N-1)."""

    def __init__(
        self,
        folder: Path,
        meta: dict[str, Any],
        session,
        device: str,
        tokenizer,
        table: np.ndarray,
        template: Template,
        *,
        precompute_prompt: bool = True,
    ):
        self.folder, self.export_meta, self.session, self.device = folder, meta, session, device
        self.tokenizer = tokenizer
        self.template = template
        self.vocab_size = int(meta["vocab_size"])
        self.num_virtual = int(meta["num_virtual_tokens"])
        self.num_layers = int(meta["num_layers"])
        self.meta = AdapterMeta(
            base_model=meta["base_model"],
            num_virtual_tokens=self.num_virtual,
            token_dim=int(meta["hidden_size"]),
            vocab_size=self.vocab_size,
            template=meta["template"],
            task=meta.get("task", "generic"),
            method=meta["tasks"][0].get("method", "prompt"),
            task_options=meta.get("task_options", {}),
        )
        from softtool.export.session import input_dtypes

        self._dtypes = input_dtypes(session)
        self._outputs = [o.name for o in session.get_outputs()]
        self._topk = "topk_values" in self._outputs
        self._ort_device = "cuda" if device == "cuda" else "cpu"
        self._table_value = None
        self._prefix = None
        self._precompute = precompute_prompt
        self.table = table
        self.num_tasks = table.shape[0] // max(self.num_virtual, 1)
        self._refresh_prompt()

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_export_dir(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        strict_device: bool = False,
        threads: int | None = None,
        template: str | None = None,
        optimization: str = "all",
        precompute_prompt: bool = True,
    ) -> OnnxGenerator:
        """Load an export folder. device "cuda" falls back to the CPU with a warning unless `strict_device`."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        from transformers import AutoTokenizer

        from softtool.export.onnx import MODEL_FILE, TABLE_FILE, TABLE_KEY, read_export_meta, resolve_device
        from softtool.export.session import create_session

        folder = Path(path)
        meta = read_export_meta(folder)
        device = resolve_device(device, strict_device)
        try:
            table = load_file(str(folder / TABLE_FILE))[TABLE_KEY].astype(np.float32)
        except (SafetensorError, OSError, KeyError) as exc:
            raise SofttoolError(f"{folder / TABLE_FILE} is unreadable ({exc}); re-run softtool export") from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise SofttoolError(
                f"{folder}: tokenizer files are missing or broken ({exc}); re-run softtool export"
            ) from exc
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tmpl = Template.parse(template or meta["template"])
        if tmpl.num_virtual_tokens != meta["num_virtual_tokens"]:
            raise SofttoolError(
                f"template {tmpl} has {tmpl.num_virtual_tokens} virtual tokens but the export "
                f"{folder} has {meta['num_virtual_tokens']}"
            )
        session = create_session(folder / MODEL_FILE, device, threads, optimization)
        return cls(folder, meta, session, device, tokenizer, table, tmpl, precompute_prompt=precompute_prompt)

    # -- prompts ------------------------------------------------------------------------------------
    def add_task(self, prompt_table) -> int:
        """Append a task's prompt [N, H] (graphs exported with --prompt-table-input only); returns its task id."""
        if not self.export_meta["prompt_table_input"]:
            raise SofttoolError(
                f"{self.folder} has its prompt table baked in; re-export with --prompt-table-input "
                "to add tasks at run time"
            )
        rows = np.asarray(prompt_table, dtype=np.float32)
        if rows.shape != (self.num_virtual, self.table.shape[1]):
            raise SofttoolError(
                f"a task prompt must have shape ({self.num_virtual}, {self.table.shape[1]}), got {rows.shape}"
            )
        self.table = np.concatenate([self.table, rows])
        self.num_tasks += 1
        self._refresh_prompt()
        return self.num_tasks - 1

    def _refresh_prompt(self) -> None:
        import onnxruntime as ort

        if self.export_meta["prompt_table_input"]:
            self._table_value = ort.OrtValue.ortvalue_from_numpy(self.table, self._ort_device, 0)
        shared = self._precompute and self.num_virtual and self.template.is_prefix
        self._prefix = self._compute_prefix() if shared else None

    def _compute_prefix(self) -> list[Any]:
        """Every task's prompt keys/values [tasks, kv_heads, N, head_dim] per layer, kept on the device."""
        n, tasks = self.num_virtual, self.num_tasks
        ids = self.vocab_size + np.arange(tasks * n, dtype=np.int64).reshape(tasks, n)
        mask = np.ones((tasks, n), dtype=np.int64)
        positions = np.broadcast_to(np.arange(n, dtype=np.int64), (tasks, n)).copy()
        _, presents = self._run(ids, mask, positions, np.arange(tasks, dtype=np.int64), None, tasks)
        return presents

    # -- one graph call -----------------------------------------------------------------------------
    def _empty_past(self, rows: int) -> list[np.ndarray]:
        # Host arrays: zero-size device allocations are not needed, ORT copies the (empty) input where it runs.
        m = self.export_meta
        shape = (rows, m["num_kv_heads"], 0, m["head_dim"])
        return [
            np.zeros(shape, dtype=self._dtypes[f"past_key_values.{i}.{kind}"])
            for i in range(self.num_layers)
            for kind in ("key", "value")
        ]

    def _run(self, ids, mask, positions, beam_idx, past, past_rows: int):
        """Run the graph once; returns (host outputs: logits or (values, indices), device presents)."""
        binding = self.session.io_binding()
        for name, value in (
            ("input_ids", ids),
            ("attention_mask", mask),
            ("position_ids", positions),
            ("beam_idx", beam_idx),
        ):
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.int64))
        if self._table_value is not None:
            binding.bind_ortvalue_input("prompt_table", self._table_value)
        past = past if past is not None else self._empty_past(past_rows)
        names = [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]
        for name, value in zip(names, past, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self._outputs:
            # Logits go to the host for the search; the cache stays where the session runs.
            binding.bind_output(name, self._ort_device if name.startswith("present") else "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        head = len(self._outputs) - 2 * self.num_layers
        return [o.numpy() for o in outputs[:head]], list(outputs[head:])

    # -- generation ---------------------------------------------------------------------------------
    def encode(self, fields: Mapping[str, str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.template.render(fields)]

    def _check(self, rows: Rows, task_ids: Sequence[int]) -> None:
        slots = sum(1 for kind, _ in self.template.layout if kind == "text")
        if len(task_ids) != len(rows):
            raise SofttoolError(f"got {len(task_ids)} task ids for {len(rows)} rows")
        for i, (row, task) in enumerate(zip(rows, task_ids, strict=True)):
            if not 0 <= int(task) < self.num_tasks:
                raise SofttoolError(
                    f"row {i}: task id {task} is outside the prompt table's {self.num_tasks} task(s) in {self.folder}"
                )
            if len(row) != slots:
                raise SofttoolError(f"row {i} has {len(row)} text pieces but the template {self.template} has {slots}")
            for piece in row:
                bad = [int(t) for t in piece if not 0 <= int(t) < self.vocab_size]
                if bad:
                    raise SofttoolError(
                        f"row {i}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
                        "; text pieces hold normal tokens only"
                    )

    def check_ids(self, ids: Sequence[Sequence[int]]) -> None:
        """Refuse ids outside [0, V + tasks*N) (the convention the graph reads)."""
        limit = self.vocab_size + self.num_tasks * self.num_virtual
        for i, row in enumerate(ids):
            bad = [int(t) for t in row if not 0 <= int(t) < limit]
            if bad:
                raise SofttoolError(
                    f"row {i}: token id {bad[0]} is outside [0, {limit}) = vocabulary "
                    f"{self.vocab_size} + {self.num_tasks} task(s) x {self.num_virtual} virtual tokens"
                )

    def _prefill(self, rows: Rows, task_ids: list[int], order: list[int], pad_id: int):
        """Run the prompt through the graph for rows `order` of `rows`; returns (head, past, mask, positions)."""
        from softtool import search

        row_tasks = np.asarray([task_ids[i] for i in order], dtype=np.int64)
        layout = self.template.layout
        prefix = self._prefix is not None
        if prefix:
            layout = layout[1:]  # the leading virtual block is already in the seeded cache
        opts = search.BatchOptions(
            vocab_size=self.vocab_size,
            num_virtual_tokens=0 if prefix else self.num_virtual,
            padding_side="left",
            pad_id=int(pad_id),
        )
        pieces = [[np.asarray(p, dtype=np.int64) for p in rows[i]] for i in order]
        batch = search.build_batch(pieces, row_tasks.astype(np.int32), layout, opts)
        ids = _batch_field(batch, "input_ids")
        mask = _batch_field(batch, "attention_mask")
        positions = _batch_field(batch, "position_ids")
        if ids.shape[1] == 0:
            raise SofttoolError("every row is empty after the prompt; give some input text")
        if prefix:
            n = self.num_virtual
            mask = np.concatenate([np.ones((len(order), n), dtype=np.int64), mask], axis=1)
            positions = positions + n
            head, past = self._run(ids, mask, positions, row_tasks, self._prefix, 0)
        else:
            head, past = self._run(ids, mask, positions, np.arange(len(order), dtype=np.int64), None, len(order))
        return head, past, mask, positions

    def last_logits(self, rows: Rows, task_ids: list[int] | None = None) -> np.ndarray:
        """The next-token logits [B, V] after each row's prompt (graphs exported with full logits)."""
        _search_module()
        task_ids = [int(t) for t in task_ids] if task_ids is not None else [0] * len(rows)
        self._check(rows, task_ids)
        if self._topk:
            raise SofttoolError(f"{self.folder} was exported with --top-k; it has no full logits")
        head, _, _, _ = self._prefill(rows, task_ids, list(range(len(rows))), self.tokenizer.pad_token_id)
        return head[0]

    def generate(self, rows: Rows, task_ids: list[int] | None, options: SearchOptions) -> list[list[list[int]]]:
        if not rows:
            return []
        task_ids = [int(t) for t in task_ids] if task_ids is not None else [0] * len(rows)
        self._check(rows, task_ids)
        search = _search_module()
        searcher = search.make_search(options)
        # The search sees each item's real tokens (text pieces), as transformers' generate does with PEFT prompts.
        searcher.start([np.asarray([t for piece in row for t in piece], dtype=np.int64) for row in rows])
        repeat = searcher.num_rows // len(rows)
        order = [i for i in range(len(rows)) for _ in range(repeat)]  # item-major, as the search expects
        head, past, mask, positions = self._prefill(rows, task_ids, order, options.pad_token_id)
        last = positions[:, -1]
        for step in range(options.max_new_tokens):
            result = searcher.step_topk(head[0], head[1]) if self._topk else searcher.step(head[0])
            if searcher.is_done() or step == options.max_new_tokens - 1:
                break
            beams = np.asarray(result.beam_indices, dtype=np.int64)
            mask = np.concatenate([mask[beams], np.ones((len(order), 1), dtype=np.int64)], axis=1)
            last = last[beams] + 1
            tokens = np.asarray(result.next_tokens, dtype=np.int64)[:, None]
            head, past = self._run(tokens, mask, last[:, None], beams, past, len(order))
        return [[[int(t) for t in hyp.tokens] for hyp in item] for item in searcher.finalize()]
