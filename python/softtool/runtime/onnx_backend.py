"""The ONNX Runtime generation backend: an exported folder (softtool export) driven by the shared decode loop.

The KV cache is softtool's slot cache (runtime.slots): torch tensors that ONNX Runtime reads and writes in
place through IO binding (each layer's present output is bound to its past input's memory), so the cache
never moves between steps and never leaves the device; only the last position's logits (or top-k) come
back to the host. For prefix templates each task's prompt keys/values are computed once and copied into a
slot when a row starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from softtool.adapter import AdapterMeta
from softtool.errors import SofttoolError
from softtool.export_meta import TARGET_INPUT, TARGET_OUTPUTS, ExportMeta
from softtool.prompts.template import Template
from softtool.runtime.base import Generator
from softtool.runtime.slots import Head, Scored

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class OnnxGenerator(Generator):
    """Generate with an exported graph; tasks are rows of its prompt table (t*N .. t*N+N-1)."""

    def __init__(
        self,
        folder: Path,
        meta: ExportMeta,
        session,
        device: str,
        tokenizer,
        table: np.ndarray,
        template: Template,
        *,
        precompute_prompt: bool = True,
    ):
        from softtool.runtime.session import input_dtypes

        if meta.kv_layout != "slots":
            raise SofttoolError(f"{folder}: KV layout {meta.kv_layout!r} is not supported; re-run softtool export")
        self.folder, self.export_meta, self.session, self.device = folder, meta, session, device
        self.where = str(folder)
        self.tokenizer = tokenizer
        self.template = template
        self.vocab_size = meta.vocab_size
        self.num_virtual = meta.num_virtual_tokens
        self.num_layers = meta.num_layers
        self.num_kv_heads = meta.num_kv_heads
        self.head_dim = meta.head_dim
        self.pad_token_id = meta.pad_token_id
        self.precompute_prompt = precompute_prompt
        self.meta = AdapterMeta(
            base_model=meta.base_model,
            num_virtual_tokens=meta.num_virtual_tokens,
            token_dim=meta.hidden_size,
            vocab_size=meta.vocab_size,
            template=meta.template,
            task=meta.task,
            method=meta.method,
            task_options=meta.task_options,
            decoding=dict(meta.tasks[0].decoding),
        )
        dtypes = input_dtypes(session)
        self.kv_dtype = _TORCH_DTYPES[dtypes["past_key_values.0.key"]]
        self._np_kv_dtype = np.dtype(dtypes["past_key_values.0.key"])
        self.kv_device = torch.device("cuda" if device == "cuda" else "cpu")
        self._ort_device = "cuda" if device == "cuda" else "cpu"
        self._head = [o for o in meta.outputs if not o.startswith("present") and o not in TARGET_OUTPUTS]
        self._past = [i for i in meta.inputs if i.startswith("past_key_values")]
        self._present = [o for o in meta.outputs if o.startswith("present")]
        self.can_score_prompt = meta.target_top_k > 0  # format 3 and later (ExportMeta.target_top_k)
        self._table_value = None
        self._init_slots()
        self.table = table
        self.num_tasks = table.shape[0] // max(self.num_virtual, 1)
        self.task_names = [t.name for t in meta.tasks]
        self.task_decoding = {i: dict(t.decoding) for i, t in enumerate(meta.tasks)}
        for task, entry in enumerate(meta.tasks[1:], start=1):  # each task of a multi-task export has its own
            own = Template.parse(entry.template)
            if own != template:
                self.task_templates[task] = own
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

        from softtool.runtime.session import create_session, graph_inputs, resolve_device

        folder = Path(path)
        meta = ExportMeta.read(folder)
        device = resolve_device(device, strict_device)
        table_file = folder / ExportMeta.TABLE_FILE
        try:
            table = load_file(str(table_file))[ExportMeta.TABLE_KEY].astype(np.float32)
        except (SafetensorError, OSError, KeyError) as exc:
            raise SofttoolError(f"{table_file} is unreadable ({exc}); re-run softtool export") from exc
        if table.ndim != 2 or not np.isfinite(table).all():
            raise SofttoolError(f"{table_file} holds NaN or infinite values (or is not 2-D); re-run softtool export")
        tokenizer = _load_tokenizer(folder)
        tmpl = Template.parse(template or meta.template)
        if tmpl.num_virtual_tokens != meta.num_virtual_tokens:
            n, has = meta.num_virtual_tokens, tmpl.num_virtual_tokens
            if template is None:  # the record contradicts itself
                raise SofttoolError(
                    f"{folder / ExportMeta.FILE} disagrees with itself: num_virtual_tokens is {n} but the template "
                    f"{str(tmpl)!r} has {has}; re-run softtool export"
                )
            raise SofttoolError(f"template {str(tmpl)!r} has {has} virtual tokens but the export {folder} has {n}")
        session = create_session(folder / ExportMeta.MODEL_FILE, device, threads, optimization)
        meta.check_contents(
            str(folder / ExportMeta.FILE),
            {i.name: list(i.shape) for i in graph_inputs(session)},
            {o.name: list(o.shape) for o in session.get_outputs()},
            table.shape,
            len(tokenizer),
        )
        return cls(folder, meta, session, device, tokenizer, table, tmpl, precompute_prompt=precompute_prompt)

    # -- prompts ------------------------------------------------------------------------------------
    def add_task(
        self, prompt_table, template: Template | None = None, name: str | None = None, decoding: dict | None = None
    ) -> int:
        """Append a task's prompt [N, H] and template (default: the first task's); graphs exported with
        --prompt-table-input only. Returns its task id."""
        if not self.export_meta.prompt_table_input:
            raise SofttoolError(
                f"{self.folder} has its prompt table baked in; re-export with --prompt-table-input "
                "to add tasks at run time"
            )
        rows = np.asarray(prompt_table, dtype=np.float32)
        if rows.shape != (self.num_virtual, self.table.shape[1]):
            raise SofttoolError(
                f"a task prompt must have shape ({self.num_virtual}, {self.table.shape[1]}), got {rows.shape}"
            )
        template = template or self.template
        if template.num_virtual_tokens != self.num_virtual:
            raise SofttoolError(
                f"template {template} has {template.num_virtual_tokens} virtual tokens, not {self.num_virtual}"
            )
        self.table = np.concatenate([self.table, rows])
        self.num_tasks += 1
        self._name_task(self.num_tasks - 1, template, name, decoding)
        self._refresh_prompt()
        return self.num_tasks - 1

    def _refresh_prompt(self) -> None:
        import onnxruntime as ort

        if self.export_meta.prompt_table_input:
            self._table_value = ort.OrtValue.ortvalue_from_numpy(self.table, self._ort_device, 0)
        self.prompt_changed()

    # -- one graph call -----------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, kv: Sequence[torch.Tensor]) -> Head:
        return self._run(ids, positions, kv, None)[0]

    def _forward_scored(
        self, ids: torch.Tensor, positions: torch.Tensor, kv: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> tuple[Head, Scored]:
        head, scored = self._run(ids, positions, kv, targets)
        return head, scored

    def _run(self, ids, positions, kv, targets: torch.Tensor | None) -> tuple[Head, Scored]:
        """One graph call; with `targets`, also the graph's target scores (an export that has them binds an empty
        [B, 0] otherwise, so the head over every position costs nothing)."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids.numpy(), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions.numpy(), dtype=np.int64))
        if self._table_value is not None:
            binding.bind_ortvalue_input("prompt_table", self._table_value)
        scoring = TARGET_OUTPUTS if self.can_score_prompt else ()
        if scoring:
            # An OrtValue: bind_cpu_input does not find an input that has a default (an initializer).
            chosen = targets.numpy() if targets is not None else np.zeros((ids.shape[0], 0))
            value = np.ascontiguousarray(chosen, dtype=np.int64)
            binding.bind_ortvalue_input(TARGET_INPUT, ort.OrtValue.ortvalue_from_numpy(value))
        for name in (*self._head, *scoring):  # bound first: get_outputs() returns outputs in binding order
            binding.bind_output(name, "cpu")
        for past, present, buf in zip(self._past, self._present, kv, strict=True):
            # The same memory as input and output: the graph's scatter writes the new entries in place.
            shape = tuple(buf.shape)
            binding.bind_input(past, self._ort_device, 0, self._np_kv_dtype, shape, buf.data_ptr())
            binding.bind_output(present, self._ort_device, 0, self._np_kv_dtype, shape, buf.data_ptr())
        if self.kv_device.type == "cuda":
            # The cache is torch's memory, written on torch's stream (admission copies the prefix KV into a
            # slot); ONNX Runtime runs on its own stream and synchronizes only its own (run_with_iobinding
            # syncs the bound inputs and outputs after), so torch's pending writes must land first.
            torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        outputs = [o.numpy() for o in binding.get_outputs()[: len(self._head) + len(scoring)]]
        head = tuple(outputs[: len(self._head)])
        if targets is None:
            return head, ()
        if not scoring:
            raise SofttoolError(f"{self.folder} cannot score prompt tokens (export format 2); re-run softtool export")
        return head, tuple(outputs[len(self._head) :])


# Any one of these makes a tokenizer folder (fast tokenizers write tokenizer.json; slow ones a vocabulary file).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _load_tokenizer(folder: Path):
    """The export's own tokenizer; a one-line SofttoolError when its files are missing or broken."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise SofttoolError(
            f"{folder} has no tokenizer ({' or '.join(_TOKENIZER_FILES)} missing); re-run softtool export"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - transformers and tokenizers raise many types for broken files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SofttoolError(f"{folder}: the tokenizer files are broken ({first}); re-run softtool export") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
