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
from softtool.export_meta import ExportMeta
from softtool.prompts.template import Template
from softtool.runtime.base import Generator
from softtool.runtime.slots import Head

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
        )
        dtypes = input_dtypes(session)
        self.kv_dtype = _TORCH_DTYPES[dtypes["past_key_values.0.key"]]
        self._np_kv_dtype = np.dtype(dtypes["past_key_values.0.key"])
        self.kv_device = torch.device("cuda" if device == "cuda" else "cpu")
        self._ort_device = "cuda" if device == "cuda" else "cpu"
        self._head = [o for o in meta.outputs if not o.startswith("present")]
        self._past = [i for i in meta.inputs if i.startswith("past_key_values")]
        self._present = [o for o in meta.outputs if o.startswith("present")]
        self._table_value = None
        self._init_slots()
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

        from softtool.runtime.session import create_session, resolve_device

        folder = Path(path)
        meta = ExportMeta.read(folder)
        device = resolve_device(device, strict_device)
        try:
            table = load_file(str(folder / ExportMeta.TABLE_FILE))[ExportMeta.TABLE_KEY].astype(np.float32)
        except (SafetensorError, OSError, KeyError) as exc:
            raise SofttoolError(
                f"{folder / ExportMeta.TABLE_FILE} is unreadable ({exc}); re-run softtool export"
            ) from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise SofttoolError(
                f"{folder}: tokenizer files are missing or broken ({exc}); re-run softtool export"
            ) from exc
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tmpl = Template.parse(template or meta.template)
        if tmpl.num_virtual_tokens != meta.num_virtual_tokens:
            raise SofttoolError(
                f"template {tmpl} has {tmpl.num_virtual_tokens} virtual tokens but the export "
                f"{folder} has {meta.num_virtual_tokens}"
            )
        session = create_session(folder / ExportMeta.MODEL_FILE, device, threads, optimization)
        return cls(folder, meta, session, device, tokenizer, table, tmpl, precompute_prompt=precompute_prompt)

    # -- prompts ------------------------------------------------------------------------------------
    def add_task(self, prompt_table) -> int:
        """Append a task's prompt [N, H] (graphs exported with --prompt-table-input only); returns its task id."""
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
        self.table = np.concatenate([self.table, rows])
        self.num_tasks += 1
        self._refresh_prompt()
        return self.num_tasks - 1

    def _refresh_prompt(self) -> None:
        import onnxruntime as ort

        if self.export_meta.prompt_table_input:
            self._table_value = ort.OrtValue.ortvalue_from_numpy(self.table, self._ort_device, 0)
        self.prompt_changed()

    # -- one graph call -----------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, kv: Sequence[torch.Tensor]) -> Head:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids.numpy(), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions.numpy(), dtype=np.int64))
        if self._table_value is not None:
            binding.bind_ortvalue_input("prompt_table", self._table_value)
        for name in self._head:  # bound first: get_outputs() returns outputs in binding order
            binding.bind_output(name, "cpu")
        for past, present, buf in zip(self._past, self._present, kv, strict=True):
            # The same memory as input and output: the graph's scatter writes the new entries in place.
            shape = tuple(buf.shape)
            binding.bind_input(past, self._ort_device, 0, self._np_kv_dtype, shape, buf.data_ptr())
            binding.bind_output(present, self._ort_device, 0, self._np_kv_dtype, shape, buf.data_ptr())
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return tuple(outputs[i].numpy() for i in range(len(self._head)))
