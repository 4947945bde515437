"""The PyTorch generation backend: the frozen model plus a prompt table, run eagerly over the slot cache.

Each forward is softtool.runtime.slot_model.SlotLM with in-place cache writes, the same module
`softtool export` traces, so this backend and the ONNX one compute the same thing. On a GPU only the top
DEVICE_TOP_K log-probs and ids of each row leave the device (the search's sparse path, as a top-k export),
not [rows, V] logits; on the CPU the logits already are where the search reads them. The decode loop, the
search and the per-task prompt cache are shared with the ONNX backend (runtime.decode, runtime.slots).
On cuda the static decode step (runtime.static_step) is captured per slot bucket as a torch CUDA graph, so are
beam search's reorder-then-step and each bucket of a bucketed prefill.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from softtool.adapter import Adapter, AdapterMeta, check_compatible, load_adapter
from softtool.errors import SofttoolError
from softtool.prompts.template import Template
from softtool.runtime.base import Generator
from softtool.runtime.slot_model import SlotLM
from softtool.runtime.slots import Head, Scored

# Candidates per row that leave a GPU each step: beam search stays exact up to 32 beams with one EOS id
# (docs/search.md); sampling and the repetition processors see only these, as with a top-k export.
DEVICE_TOP_K = 64


class TorchGenerator(Generator):
    """Generate with `model` and a prompt table [tasks*N, H] placed by `template`.

    top_k: >0, each step hands the search the k best log-probs and ids, computed where the model runs; 0, full
    logits. None (default): DEVICE_TOP_K on a GPU, 0 on the CPU.
    cuda_graphs: on cuda, capture the static decode step per slot bucket (off: run it eagerly).
    compile_step: compile the static decode step with torch.compile (inductor fuses the many small kernels of a
    step into few) before it is captured. None (default): on cuda with CUDA graphs.
    compile_mode: torch.compile's mode for it (None: its default; "max-autotune-no-cudagraphs" tunes the kernels
    and leaves the capture to softtool, as every mode here must: "reduce-overhead" would capture graphs of its own).
    """

    views_ok = True

    def __init__(
        self,
        model,
        tokenizer,
        template: Template,
        prompt_table: torch.Tensor | None = None,
        meta: AdapterMeta | None = None,
        top_k: int | None = None,
        cuda_graphs: bool = True,
        compile_step: bool | None = None,
        compile_mode: str | None = None,
    ):
        if compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(
                f"compile_mode {compile_mode!r} captures CUDA graphs of its own; softtool captures the step"
            )
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.compile_step = compile_step
        self.tokenizer = tokenizer
        self.template = template
        self.meta = meta
        embed = model.get_input_embeddings().weight
        self.vocab_size = embed.shape[0]
        self.kv_device = embed.device
        self.kv_dtype = embed.dtype
        config = model.config
        heads = int(config.num_attention_heads)
        self.num_layers = int(config.num_hidden_layers)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.num_virtual = template.num_virtual_tokens
        self._init_slots()
        self.task_names = ["task0"]
        self.task_decoding = {0: dict(meta.decoding) if meta is not None else {}}
        if top_k is None:
            top_k = DEVICE_TOP_K if self.kv_device.type != "cpu" else 0
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.top_k = min(int(top_k), self.vocab_size)
        self.slot_lm = SlotLM(model, None, self.vocab_size, in_place=True, top_k=self.top_k)
        if self.compile_step is None:
            self.compile_step = self.kv_device.type == "cuda" and cuda_graphs
        # One compiled module serves every bucket: dynamo specializes it per batch size (or makes that size
        # dynamic after the second), each compiled while its bucket is captured, never while decoding.
        self._step_module = (
            torch.compile(self.slot_lm, fullgraph=True, mode=compile_mode) if self.compile_step else self.slot_lm
        )
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
        cuda_graphs: bool = True,
        compile_step: bool | None = None,
        compile_mode: str | None = None,
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
        generator = cls(
            model,
            tokenizer,
            tmpl,
            adapter.prompt_table,
            adapter.meta,
            cuda_graphs=cuda_graphs,
            compile_step=compile_step,
            compile_mode=compile_mode,
        )
        generator.where = str(path)
        generator.task_names = [Path(path).resolve().name]
        return generator

    @classmethod
    def from_adapters(cls, paths: Sequence[str | os.PathLike], **kwargs) -> TorchGenerator:
        """Several adapters of one base model as tasks 0, 1, ... of one generator (one model, one cache)."""
        first, *rest = paths
        generator = cls.from_adapter(first, **kwargs)
        for path in rest:
            generator.add_adapter(path)
        generator.where = ", ".join(str(p) for p in paths)
        return generator

    def add_adapter(self, path: str | os.PathLike) -> int:
        """Load another adapter of the same base model as a new task; returns its task id."""
        adapter = load_adapter(path)
        check_compatible(adapter, self.model)
        name = Path(path).resolve().name
        return self.add_task(adapter.prompt_table, Template.parse(adapter.meta.template), name, adapter.meta.decoding)

    def add_task(
        self,
        prompt_table: torch.Tensor,
        template: Template | None = None,
        name: str | None = None,
        decoding: dict | None = None,
    ) -> int:
        """Append a task (its prompt [N, H] and template, default the first task's); returns its task id."""
        template = template or self.template
        n = self.template.num_virtual_tokens
        if template.num_virtual_tokens != n or tuple(prompt_table.shape) != (n, self.table.shape[1]):
            raise SofttoolError(
                f"a task added to this generator needs {n} virtual tokens of size {self.table.shape[1]}; "
                f"got a prompt of shape {tuple(prompt_table.shape)} with template {template}"
            )
        task = self.num_tasks
        self.set_prompt(torch.cat([self.table, prompt_table.to(self.kv_device, self.kv_dtype)]))
        self._name_task(task, template, name, decoding)
        return task

    def set_prompt(self, prompt_table: torch.Tensor | None) -> None:
        """Swap the prompt table (e.g. during training evaluation); drops the cached prompt keys/values."""
        n = self.template.num_virtual_tokens
        if n and prompt_table is None:
            raise ValueError(f"template {self.template} has virtual tokens but no prompt table was given")
        if prompt_table is not None and (prompt_table.ndim != 2 or prompt_table.shape[0] % max(n, 1)):
            raise ValueError(f"prompt table of shape {tuple(prompt_table.shape)} does not fit {n} virtual tokens")
        if prompt_table is None:
            self.table = None
            self.num_tasks = 1
        else:
            self.table = prompt_table.detach().to(self.kv_device, self.kv_dtype)
            self.num_tasks = self.table.shape[0] // max(n, 1)
            self.slot_lm.set_table(self.table)
        self.prompt_changed()

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, kv: Sequence[torch.Tensor]) -> Head:
        return self._head(self.slot_lm(ids.to(self.kv_device), positions.to(self.kv_device), *kv))

    can_score_prompt = True

    @torch.inference_mode()
    def _forward_scored(
        self, ids: torch.Tensor, positions: torch.Tensor, kv: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> tuple[Head, Scored]:
        device = self.kv_device
        out = self.slot_lm(ids.to(device), positions.to(device), *kv, targets.to(device))
        chosen, values, top_ids = out[-3:]
        return self._head(out), (chosen.float().cpu().numpy(), values.float().cpu().numpy(), top_ids.cpu().numpy())

    def _head(self, out) -> Head:
        if self.top_k:
            return (out[0].float().cpu().numpy(), out[1].cpu().numpy())
        return (out[0].float().cpu().numpy(),)

    @torch.inference_mode()
    def _device_head(self, st, bucket: int) -> tuple[torch.Tensor, ...]:
        out = self._step_module(st.tokens[:bucket], st.positions[:bucket], *(t[:bucket] for t in st.kv))
        return tuple(out[:2]) if self.top_k else (out[0].float(),)

    def _make_beam_steps(self, st) -> None:
        """On cuda, the reorder and the step of each bucket captured as one graph (every slot is idle now)."""
        if not (st.captured and self.kv_device.type == "cuda"):
            return super()._make_beam_steps(st)
        from softtool.runtime.static_step import capture_graphs, reorder_rows

        def body(bucket: int):
            reorder_rows(st, bucket)
            return st.body(bucket)

        with torch.inference_mode():
            capture_graphs(st, body, into=st.beam_steps)

    @torch.inference_mode()
    def _run_prefill(self, pf) -> Head:
        """On cuda (with CUDA graphs) each prefill bucket is captured at its first use, on device copies of its ids
        and positions, and replayed after; the eager model elsewhere. The model is not the compiled step's module:
        dynamo would compile every (rows, length) shape."""
        if self.kv_device.type != "cuda" or not self.cuda_graphs:
            return super()._run_prefill(pf)
        if pf.captured is None:
            ids, positions = pf.ids.to(self.kv_device), pf.positions.to(self.kv_device)
            stream = torch.cuda.Stream(self.kv_device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # the warm-up writes what the captured run will write again
                for _ in range(2):
                    self.slot_lm(ids, positions, *pf.kv)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.slot_lm(ids, positions, *pf.kv)
            pf.captured = (graph, ids, positions, out)
        graph, ids, positions, out = pf.captured
        ids.copy_(pf.ids)
        positions.copy_(pf.positions)
        graph.replay()
        return self._head(out)

    def _capture(self, st, body) -> None:
        from softtool.runtime.static_step import capture_graphs

        with torch.inference_mode():
            try:
                capture_graphs(st, body)
            except Exception as exc:  # noqa: BLE001 - dynamo and inductor raise many types; eager kernels still work
                if self._step_module is self.slot_lm:
                    raise
                warnings.warn(
                    f"torch.compile of the decode step failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                    "capturing PyTorch's own kernels instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._step_module, self.compile_step = self.slot_lm, False
                capture_graphs(st, body)
