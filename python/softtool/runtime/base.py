"""The one interface every generation backend implements (PyTorch in torch_backend, ONNX Runtime in onnx_backend).

Inputs are encoded pieces, one token-id list per text slot of the template, exactly what training and
the data package produce; the generator places the virtual tokens itself (id V + t*N + j). Outputs are
new token ids only. Generation runs through the one decode loop (softtool.runtime.decode) over the
backend's slot cache (softtool.runtime.slots).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from softtool.errors import SofttoolError
from softtool.prompts.template import Template, assemble_ids
from softtool.runtime.decode import EngineOptions, Progress, decode
from softtool.runtime.slots import SlotModel
from softtool.search import SearchOptions

Rows = list[list[list[int]]]  # batch -> text slots -> token ids

__all__ = ["EngineOptions", "Generator", "Rows", "SearchOptions"]


class Generator(SlotModel):
    """A soft prompt (one or more tasks) bound to a model, ready to generate."""

    meta: object  # softtool.adapter.AdapterMeta: task, task options, base model
    where: str = "the prompt table"  # names the source in errors

    task_names: list[str]  # one per task, in task-id order
    task_decoding: dict[int, dict]  # task id -> its decoding defaults (SearchOptions fields), where it has any

    def _name_task(self, task: int, template: Template, name: str | None, decoding: Mapping | None = None) -> None:
        """Record a newly added task's template (when it differs from the first task's), name and decoding."""
        if template != self.template:
            self.task_templates[task] = template
        self.task_names.append(name or f"task{task}")
        self.task_decoding[task] = dict(decoding or {})

    def decoding(self, task: int = 0) -> dict:
        """The task's decoding defaults (e.g. {"no_repeat_ngram_size": 3}): what its adapter or export records."""
        return dict(self.task_decoding.get(task, {}))

    def encode(self, fields: Mapping[str, str], task: int = 0) -> list[list[int]]:
        """Token ids of each text slot of the task's template filled with `fields` (tokenized separately, as in
        training)."""
        pieces = self.template_of(task).render(fields)
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in pieces]

    def row_ids(self, rows: Rows, task_ids: Sequence[int]) -> list[list[int]]:
        """Each row's full ids (virtual ones included); SofttoolError on a row that does not fit the template."""
        if len(task_ids) != len(rows):
            raise SofttoolError(f"got {len(task_ids)} task ids for {len(rows)} rows")
        out = []
        for i, (row, task) in enumerate(zip(rows, task_ids, strict=True)):
            if not 0 <= int(task) < max(self.num_tasks, 1):
                raise SofttoolError(f"row {i}: task id {task} is outside the {self.num_tasks} task(s) of {self.where}")
            template = self.template_of(task)
            slots = sum(1 for kind, _ in template.layout if kind == "text")
            if len(row) != slots:
                raise SofttoolError(f"row {i} has {len(row)} text pieces but the template {template} has {slots}")
            for piece in row:
                bad = [int(t) for t in piece if not 0 <= int(t) < self.vocab_size]
                if bad:
                    raise SofttoolError(
                        f"row {i}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
                        "; text pieces hold normal tokens only"
                    )
            out.append(assemble_ids(template, row, self.vocab_size, int(task)))
        return out

    def generate(
        self,
        rows: Rows,
        task_ids: Sequence[int] | None,
        options: SearchOptions,
        engine: EngineOptions | None = None,
        progress: Progress | None = None,
    ) -> list[list[list[int]]]:
        """Per row, `num_return_sequences` lists of new token ids (EOS excluded), in row order."""
        if not rows:
            return []
        tasks = [int(t) for t in task_ids] if task_ids is not None else [0] * len(rows)
        ids = self.row_ids(rows, tasks)
        hyps = decode(self, ids, tasks, options, engine, progress)
        return [[[int(t) for t in h.tokens] for h in item] for item in hyps]

    def last_logits(self, rows: Rows, task_ids: Sequence[int] | None = None) -> np.ndarray:
        """The next-token logits [B, V] after each row's prompt (a graph exported with full logits)."""
        tasks = [int(t) for t in task_ids] if task_ids is not None else [0] * len(rows)
        ids = self.row_ids(rows, tasks)
        self.reserve(len(ids), max(map(len, ids)) + 1)
        head = self.prefill(list(range(len(ids))), ids, tasks)
        if len(head) != 1:
            raise SofttoolError(f"{self.where} was exported with --top-k; it has no full logits")
        return head[0]
