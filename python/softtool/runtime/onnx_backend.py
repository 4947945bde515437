"""The ONNX Runtime generation backend: an exported folder (softtool export) driven by the shared decode loop.

The KV cache is softtool's slot cache (runtime.slots): torch tensors that ONNX Runtime reads and writes in
place through IO binding (each layer's present output is bound to its past input's memory), so the cache
never moves between steps and never leaves the device; only the last position's logits (or top-k) come
back to the host. For prefix templates each task's prompt keys/values are computed once and copied into a
slot when a row starts.

An export in the "gqa" form (softtool.export.gqa) takes the cache's width as total_sequence_length. With a shared
prefix each row's text is prefilled as a chunk after its task's prompt keys/values, one row per call (what
GroupQueryAttention takes at onnxruntime 1.31); otherwise rows are prefilled together, right-padded, over a cache
exactly as wide as they are. On cuda its session is created with
`enable_cuda_graph` on the generator's torch stream (`user_compute_stream`): the static decode step
(runtime.static_step) binds fixed buffers per slot bucket and ONNX Runtime captures each bucket's run under
its own `gpu_graph_id` and replays it. Prefills run uncaptured (graph id -1), except a bucketed prefill
(`SlotModel.prefill(buckets=True)`): each (rows, length) shape is bound once to fixed buffers under a graph id of
its own, as the decode step's buckets are.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
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
# Runs of a graph id before its replays are all captured ones: ONNX Runtime runs a session's first calls
# normally (min_num_runs_before_cuda_graph_capture, 2 by default), then captures the next of each id.
CAPTURE_RUNS = 3


def _cuda_session(path, threads, optimization, stream, cuda_graphs: bool):
    """A CUDA session, if it can be, capturing CUDA graphs and on `stream` (torch's): returns (session, whether
    it runs on that stream). Each refused setting is dropped in turn, with a warning naming the refusal: the
    session then runs uncaptured, or on a stream of its own that the caller synchronizes with."""
    from softtool.runtime.session import create_session

    graph = {"enable_cuda_graph": "1"} if cuda_graphs else {}
    user = {"user_compute_stream": str(stream.cuda_stream)}
    attempts = (
        [({**graph, **user}, True), (graph, False), (user, True), ({}, False)] if graph else [(user, True), ({}, False)]
    )
    refusals = []
    for options, shared in attempts:
        try:
            session = create_session(path, "cuda", threads, optimization, cuda_options=options)
        except SofttoolError as exc:
            refusals.append(f"{options}: {exc}")
            continue
        if refusals:
            warnings.warn("ONNX Runtime refused " + "; ".join(refusals), RuntimeWarning, stacklevel=3)
        return session, shared
    raise SofttoolError(refusals[-1])


def _cuda_graphs(session) -> bool:
    """Whether `session` captures CUDA graphs (its CUDA provider was created with enable_cuda_graph)."""
    options = session.get_provider_options().get("CUDAExecutionProvider", {})
    return str(options.get("enable_cuda_graph", "0")) in ("1", "True", "true")


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
        stream=None,
        shares_stream: bool = False,
    ):
        from softtool.runtime.session import input_dtypes

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
        self.top_k = meta.top_k
        self.gqa = meta.kv_layout == "gqa"
        self.right_padded_prefill = self.gqa
        # A gqa export before prefix_chunks counts no padding in seqlens_k: its prefill starts at column 0 and
        # runs the prompt too (a first prompt), with no per-task prompt cache copied in front.
        self.precompute_prompt = precompute_prompt and (not self.gqa or meta.prefix_chunks)
        self.stream, self._shares_stream = stream, shares_stream
        self.cuda_graphs = _cuda_graphs(session)
        self._static_bindings: dict[tuple[int, int, int], tuple] = {}
        self._graph_ids = 0
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
        cuda_graphs: bool = True,
    ) -> OnnxGenerator:
        """Load an export folder. device "cuda" falls back to the CPU with a warning unless `strict_device`.
        cuda_graphs: on cuda, capture the static decode step of a gqa-form export (off: run it uncaptured)."""
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
        stream, shares_stream = None, False
        if device == "cuda":
            stream = torch.cuda.Stream()
            session, shares_stream = _cuda_session(
                folder / ExportMeta.MODEL_FILE, threads, optimization, stream, cuda_graphs and meta.kv_layout == "gqa"
            )
        else:
            session = create_session(folder / ExportMeta.MODEL_FILE, device, threads, optimization)
        meta.check_contents(
            str(folder / ExportMeta.FILE),
            {i.name: list(i.shape) for i in graph_inputs(session)},
            {o.name: list(o.shape) for o in session.get_outputs()},
            table.shape,
            len(tokenizer),
        )
        return cls(
            folder,
            meta,
            session,
            device,
            tokenizer,
            table,
            tmpl,
            precompute_prompt=precompute_prompt,
            stream=stream,
            shares_stream=shares_stream,
        )

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
        self._static_bindings.clear()  # they bound the old table: bound (and captured) again on their next step
        self.prompt_changed()  # drops the bucketed prefills' bindings too

    # -- one graph call -----------------------------------------------------------------------------
    def _bind_cache(self, binding, kv: Sequence[torch.Tensor]) -> None:
        """Bind each layer's past and present to the same buffer: the graph writes the new entries in place."""
        if self.gqa:  # the cache's width, on the CPU (GroupQueryAttention reads it there)
            binding.bind_cpu_input("total_sequence_length", np.asarray(kv[0].shape[2], dtype=np.int32))
        if self._table_value is not None:
            binding.bind_ortvalue_input("prompt_table", self._table_value)
        for past, present, buf in zip(self._past, self._present, kv, strict=True):
            shape = tuple(buf.shape)
            binding.bind_input(past, self._ort_device, 0, self._np_kv_dtype, shape, buf.data_ptr())
            binding.bind_output(present, self._ort_device, 0, self._np_kv_dtype, shape, buf.data_ptr())

    def _wait_for_torch(self) -> None:
        """The cache is torch's memory, written on torch's streams (admission copies a prefill into a slot).
        When ONNX Runtime runs on a stream of its own, torch's pending writes must land first."""
        if self.kv_device.type != "cuda":
            return
        if not self._shares_stream or torch.cuda.current_stream() != self.stream:
            torch.cuda.current_stream().synchronize()

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
        scoring = TARGET_OUTPUTS if self.can_score_prompt else ()
        if scoring:
            # An OrtValue: bind_cpu_input does not find an input that has a default (an initializer).
            chosen = targets.numpy() if targets is not None else np.zeros((ids.shape[0], 0))
            value = np.ascontiguousarray(chosen, dtype=np.int64)
            binding.bind_ortvalue_input(TARGET_INPUT, ort.OrtValue.ortvalue_from_numpy(value))
        for name in (*self._head, *scoring):  # bound first: get_outputs() returns outputs in binding order
            binding.bind_output(name, "cpu")
        self._bind_cache(binding, kv)
        self._wait_for_torch()
        self.session.run_with_iobinding(binding, self._uncaptured)
        outputs = [o.numpy() for o in binding.get_outputs()[: len(self._head) + len(scoring)]]
        head = tuple(outputs[: len(self._head)])
        if self.export_meta.genai:  # the genai form's logits are [B, 1, V]
            head = (head[0][:, -1],)
        if targets is None:
            return head, ()
        if not scoring:
            raise SofttoolError(f"{self.folder} cannot score prompt tokens (export format 2); re-run softtool export")
        return head, tuple(outputs[len(self._head) :])

    @property
    def _uncaptured(self):
        """Run options of a call that must not be captured (prefill): graph id -1 on a capturing session."""
        if not self.cuda_graphs:
            return None
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", "-1")
        return options

    # -- the static step -----------------------------------------------------------------------------
    def _device_head(self, st, bucket: int) -> tuple[torch.Tensor, ...]:
        key = (st.slots, st.capacity, bucket)
        entry = self._static_bindings.get(key)
        if entry is None:
            entry = self._static_bindings[key] = self._bind_static(st, bucket)
        binding, head, options = entry
        if self.stream is not None and not self._shares_stream:
            self.stream.synchronize()
        self.session.run_with_iobinding(binding, options)
        return head

    def _bind_static(self, st, bucket: int) -> tuple:
        """Slots [:bucket] of `st` bound once: tokens, positions, cache and the head's output buffers, all at
        fixed addresses; on a capturing session, a graph id of their own."""
        binding = self.session.io_binding()
        head = self._bind_fixed(binding, st.tokens[:bucket], st.positions[:bucket], [t[:bucket] for t in st.kv])
        options = self._graph_options()
        if self._shares_stream:  # the engine waits for the step's result itself, on the same stream
            options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return binding, head, options

    def _bind_fixed(self, binding, ids: torch.Tensor, positions: torch.Tensor, kv) -> tuple[torch.Tensor, ...]:
        """Bind device buffers ids and positions [rows, S], the cache `kv` and new head buffers (returned) at their
        fixed addresses: what a captured run reads and writes."""
        rows = ids.shape[0]
        for name, buf in (("input_ids", ids), ("position_ids", positions)):
            binding.bind_input(name, self._ort_device, 0, np.int64, tuple(buf.shape), buf.data_ptr())
        if self.top_k:
            head = (
                torch.empty((rows, self.top_k), dtype=torch.float32, device=self.kv_device),
                torch.empty((rows, self.top_k), dtype=torch.long, device=self.kv_device),
            )
        else:
            # The genai form's logits are [B, 1, V]: bound as such, read through a [B, V] view of the same memory.
            shape = (rows, 1, self.vocab_size) if self.export_meta.genai else (rows, self.vocab_size)
            head = (torch.empty(shape, dtype=torch.float32, device=self.kv_device),)
        for name, buf in zip(self._head, head, strict=True):
            dtype = np.int64 if buf.dtype == torch.long else np.float32
            binding.bind_output(name, self._ort_device, 0, dtype, tuple(buf.shape), buf.data_ptr())
        if self.export_meta.genai:
            head = (head[0][:, 0],)
        self._bind_cache(binding, kv)
        return head

    def _graph_options(self):
        """Run options with a graph id of their own on a capturing session."""
        import onnxruntime as ort

        options = ort.RunOptions()
        if self.cuda_graphs:
            self._graph_ids += 1
            options.add_run_config_entry("gpu_graph_id", str(self._graph_ids))
        return options

    # -- the bucketed prefill ----------------------------------------------------------------------------
    def _run_prefill(self, pf) -> Head:
        """On a capturing session a prefill bucket is bound once to device copies of its ids and positions and runs
        under a graph id of its own (captured by ONNX Runtime on a later run of it); elsewhere, as any call."""
        if not self.cuda_graphs:
            return super()._run_prefill(pf)
        if pf.captured is None:
            binding = self.session.io_binding()
            ids, positions = pf.ids.to(self.kv_device), pf.positions.to(self.kv_device)
            head = self._bind_fixed(binding, ids, positions, pf.kv)
            pf.captured = (binding, ids, positions, head, self._graph_options())
        binding, ids, positions, head, options = pf.captured
        ids.copy_(pf.ids)
        positions.copy_(pf.positions)
        self._wait_for_torch()
        self.session.run_with_iobinding(binding, options)
        return tuple(h.cpu().numpy() for h in head)

    def _capture(self, st, body) -> None:
        """ONNX Runtime captures a graph id on its own on a later run of it; run each bucket's step until it
        has (every slot idle: only scratch columns are written), restoring tokens and positions after."""
        start = time.perf_counter()
        saved = (st.tokens.clone(), st.positions.clone())
        for bucket in sorted(st.buckets, reverse=True):
            for _ in range(CAPTURE_RUNS):
                body(bucket)
            st.steps[bucket] = functools.partial(body, bucket)
        st.tokens.copy_(saved[0])
        st.positions.copy_(saved[1])
        self.stream.synchronize()
        st.captured = True
        st.capture_seconds += time.perf_counter() - start


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
