"""The export contract: what an export folder holds and what its graph expects, in one typed record.

`softtool export` writes an `ExportMeta` as `softtool_export.json` (last, after verification passed) and
every reader (the ONNX runtime, verification, `eval`/`generate` deciding whether a folder is an export)
reads it back through `ExportMeta.read`. No other module names the file. A folder written by another
format version is refused with a one-line error that says to re-export.

Virtual tokens are ids: token j of task t is `vocab_size + t * num_virtual_tokens + j`, and reads row
`t * num_virtual_tokens + j` of the prompt table. Ids below `vocab_size` are ordinary tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from softtool import __version__
from softtool.errors import SofttoolError, written_by
from softtool.fileio import atomic_write_json

# Version 2: typed record, tasks as ExportTask, graph I/O and KV layout recorded, slot KV cache (no beam_idx).
# Version 3: the traced graph scores target ids (target_top_k > 0: the prompt log-probs of `serve`'s echo); the
# "gqa" KV layout (softtool.export.gqa), whose graph also takes total_sequence_length; `genai` (the genai form's
# [B, 1, V] logits; absent means False). A version 2 record describes a graph version 3 runs unchanged except for
# the target scoring (echo asks to re-export), so both are read.
FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)
KV_LAYOUTS = ("slots", "gqa")

# Scoring target ids (format 3): the graph's optional input, its outputs, and the candidates per position (what
# OpenAI's completions allow at most for `logprobs`, and what `serve` reports for each echoed prompt token).
TARGET_INPUT = "target_ids"
TARGET_OUTPUTS = ("target_logprobs", "target_top_values", "target_top_ids")
SCORE_TOP_K = 5


@dataclass(frozen=True)
class ExportTask:
    """One task of the export, in prompt-table order."""

    name: str  # what the user calls it (the adapter folder's name); the server's `model`
    task: str  # softtool's task kind: squad, squad-qg, cnndm, translation or generic
    template: str  # e.g. "[P:20]English: {source}\nGerman:"
    method: str = "prompt"  # prompt or ptuning
    task_options: dict[str, Any] = field(default_factory=dict)
    decoding: dict[str, Any] = field(default_factory=dict)  # decoding defaults (SearchOptions fields) of the task


@dataclass(frozen=True)
class ExportMeta:
    """Everything a runtime needs to run an export folder, and how it was made."""

    MODEL_FILE: ClassVar[str] = "model.onnx"
    TABLE_FILE: ClassVar[str] = "prompt_table.safetensors"
    TABLE_KEY: ClassVar[str] = "prompt_table"
    FILE: ClassVar[str] = "softtool_export.json"

    base_model: str
    vocab_size: int  # V: the first virtual id
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    num_virtual_tokens: int  # N, shared by every task
    tasks: tuple[ExportTask, ...]
    dtype: str  # fp32, fp16 or int8
    device: str  # cpu or cuda: what it was verified on
    opset: int
    inputs: tuple[str, ...]  # graph input names, in order
    outputs: tuple[str, ...]  # graph output names, in order
    # How the KV cache moves. "slots": past k/v per layer are buffers [B, kv_heads, C, head_dim], one sequence per
    # row with its entries at their positions; the graph writes the new entries at `position_ids` and returns
    # the buffers as present (same shapes; bind present to past's memory and the update is in place). A query
    # at position p sees entries 0..p of its row; column C-1 is scratch for padding.
    # "gqa": the same buffers, written by GroupQueryAttention at each row's position (the last of position_ids);
    # a prefill is right-padded (padding at position -1) over a cache exactly as wide as its rows, and the
    # total_sequence_length input (int32, on the CPU) is the cache's width.
    kv_layout: str = "slots"
    # The gqa form takes a one-row chunk after a cached prefix (export/gqa.py): each task's prompt keys/values are
    # computed once and copied in, and a prefill runs only the text. False (absent): an earlier gqa export, whose
    # padding would not count in seqlens_k: prefilled whole, prompt and text.
    prefix_chunks: bool = False
    prompt_table_input: bool = False  # the table is a graph input (tasks can be added without re-export)
    top_k: int = 0  # >0: the graph emits top-k log-probs and ids instead of full logits
    # The genai form (softtool export --form genai): the traced graph with logits [B, 1, V], the last position in
    # onnxruntime-genai's [batch, sequence, vocab] output, and a genai_config.json beside it (export/genai.py).
    genai: bool = False
    # >0: the graph takes target_ids [B, T] (default: an empty [1, 0]) and returns, for input positions s < T, the
    # log-prob of target_ids[b, s] (target_logprobs [B, T]) and the best target_top_k log-probs and ids there
    # (target_top_values, target_top_ids [B, T, k]). 0: a format-2 export or the gqa form: no prompt scoring.
    target_top_k: int = 0
    int8_method: str | None = None
    export_seconds: float = 0.0
    verification: dict[str, Any] = field(default_factory=dict)
    softtool_version: str = ""
    format: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # JSON gives lists; the record is frozen, so store tuples (hashable, comparable).
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        tasks = tuple(t if isinstance(t, ExportTask) else ExportTask(**t) for t in self.tasks)
        object.__setattr__(self, "tasks", tasks)
        if not tasks:
            raise ValueError("an export holds at least one task")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_virtual_tokens < 0 or self.top_k < 0 or self.target_top_k < 0:
            raise ValueError("num_virtual_tokens, top_k and target_top_k must be >= 0")
        if self.genai and (self.top_k or self.prompt_table_input or self.kv_layout != "slots"):
            raise ValueError("the genai form has full logits, a baked-in prompt table and the slots KV layout")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout {self.kv_layout!r} is not one of {', '.join(KV_LAYOUTS)}")
        if self.prefix_chunks and self.kv_layout != "gqa":
            raise ValueError("prefix_chunks describes the gqa form's graph (kv_layout gqa)")

    # -- derived ------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def template(self) -> str:
        """The first task's template (the one `generate`/`eval` use unless told otherwise)."""
        return self.tasks[0].template

    @property
    def task(self) -> str:
        return self.tasks[0].task

    @property
    def task_options(self) -> dict[str, Any]:
        return dict(self.tasks[0].task_options)

    @property
    def method(self) -> str:
        return self.tasks[0].method

    def virtual_id(self, task: int, j: int) -> int:
        """The id of virtual token j of task `task` (what the graph's input_ids carry)."""
        if not (0 <= task < self.num_tasks and 0 <= j < self.num_virtual_tokens):
            raise ValueError(f"no virtual token {j} of task {task} in this export")
        return self.vocab_size + task * self.num_virtual_tokens + j

    def task_index(self, name: str) -> int:
        for i, t in enumerate(self.tasks):
            if t.name == name:
                return i
        raise SofttoolError(f"no task named {name!r} in this export (has {[t.name for t in self.tasks]})")

    # -- (de)serialisation --------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tasks"] = [asdict(t) for t in self.tasks]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "export metadata") -> ExportMeta:
        if not isinstance(data, dict):
            raise SofttoolError(f"{source} must hold a JSON object; re-run softtool export")
        version = data.get("format")
        if version not in READABLE_FORMATS:
            readable = " and ".join(str(v) for v in READABLE_FORMATS)
            raise SofttoolError(
                f"{source} has export format {version} ({written_by(data.get('softtool_version'))}); softtool "
                f"{__version__} reads formats {readable}: re-run softtool export"
            )
        if version < 3 and data.get("target_top_k"):
            raise SofttoolError(
                f"{source} is malformed (target_top_k in a format-{version} export); re-run softtool export"
            )
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise SofttoolError(f"{source} is malformed ({exc}); re-run softtool export") from exc

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / self.FILE
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def is_export(cls, folder: str | os.PathLike) -> bool:
        """Whether `folder` looks like an export folder (holds the metadata file)."""
        return (Path(folder) / cls.FILE).is_file()

    @classmethod
    def read(cls, folder: str | os.PathLike) -> ExportMeta:
        """The metadata of an export folder, refusing folders with missing files or another format."""
        folder = Path(folder)
        if not folder.is_dir():
            raise SofttoolError(f"export folder not found: {folder}")
        if not (folder / cls.FILE).is_file():
            raise SofttoolError(
                f"{folder} is not an export folder: {cls.FILE} is missing (an unfinished export, or one that "
                "failed verification); run softtool export"
            )
        for name in (cls.MODEL_FILE, cls.TABLE_FILE):
            if not (folder / name).is_file():
                raise SofttoolError(f"{folder} is not a complete export: {name} is missing; re-run softtool export")
        try:
            data = json.loads((folder / cls.FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SofttoolError(f"{folder / cls.FILE} is not valid JSON ({exc}); re-run softtool export") from exc
        return cls.from_json(data, str(folder / cls.FILE))

    # -- against what the folder holds ----------------------------------------------------------------------
    def check_contents(
        self,
        source: str,
        graph_inputs: Mapping[str, Sequence[int | str | None]],
        graph_outputs: Mapping[str, Sequence[int | str | None]],
        table_shape: Sequence[int],
        tokenizer_size: int,
    ) -> None:
        """Refuse metadata (read from `source`) that disagrees with the folder's graph, table or tokenizer.

        `graph_inputs`/`graph_outputs` map the graph's names to their shapes (an int per fixed dimension, a
        name or None per dynamic one). A record that was edited or copied from another export would otherwise
        decode with the wrong vocabulary or cache shapes and still exit 0. One-line SofttoolError naming `source`.
        """

        def refuse(what: str) -> None:
            raise SofttoolError(f"{source} disagrees with the export: {what}; re-run softtool export")

        def fixed(shape: Sequence[int | str | None], axis: int) -> int | None:
            """The size of a fixed dimension; None for a dynamic or absent one."""
            dim = shape[axis] if -len(shape) <= axis < len(shape) else None
            return dim if isinstance(dim, int) else None

        if set(graph_inputs) != set(self.inputs) or set(graph_outputs) != set(self.outputs):
            extra = sorted((set(graph_inputs) | set(graph_outputs)) ^ (set(self.inputs) | set(self.outputs)))
            refuse(f"the graph's inputs/outputs differ from the recorded ones in {extra[:6]}")
        past = [name for name in graph_inputs if name.startswith("past_key_values.")]
        if len(past) != 2 * self.num_layers:
            refuse(f"num_layers is {self.num_layers} but the graph takes {len(past)} past key/value inputs")
        for name in past:
            shape = graph_inputs[name]
            if len(shape) != 4:
                refuse(f"{name} has {len(shape)} dimensions, not 4 (batch, kv heads, capacity, head dim)")
            for axis, key in ((1, "num_kv_heads"), (3, "head_dim")):
                if fixed(shape, axis) not in (None, getattr(self, key)):
                    refuse(f"{key} is {getattr(self, key)} but the graph's {name} has {shape[axis]}")
        head = "topk_values" if self.top_k else "logits"
        if head not in graph_outputs:
            refuse(f"top_k is {self.top_k} but the graph has no {head} output")
        rank = 3 if self.genai else 2
        if len(graph_outputs[head]) != rank or (self.genai and fixed(graph_outputs[head], 1) != 1):
            shape = "[batch, 1, vocab]" if self.genai else f"[batch, {'k' if self.top_k else 'vocab'}]"
            refuse(f"genai is {self.genai} but the graph's {head} are not {shape}")
        width, expected = fixed(graph_outputs[head], -1), self.top_k or self.vocab_size
        if width not in (None, expected):
            key = "top_k" if self.top_k else "vocab_size"
            refuse(f"{key} is {expected} but the graph's {head} are {width} wide")
        if self.target_top_k:
            if "target_ids" not in graph_inputs or "target_top_values" not in graph_outputs:
                refuse(f"target_top_k is {self.target_top_k} but the graph does not score target ids")
            width = fixed(graph_outputs["target_top_values"], -1)
            if width not in (None, self.target_top_k):
                refuse(f"target_top_k is {self.target_top_k} but the graph's target_top_values are {width} wide")
        if self.prompt_table_input:
            width = fixed(graph_inputs.get("prompt_table", ()), -1)
            if width not in (None, self.hidden_size):
                refuse(f"hidden_size is {self.hidden_size} but the graph's prompt_table input is {width} wide")
        rows = self.num_tasks * self.num_virtual_tokens
        if tuple(table_shape) != (rows, self.hidden_size):
            refuse(
                f"{self.TABLE_FILE} has shape {tuple(table_shape)}, not ({rows}, {self.hidden_size}) "
                f"({self.num_tasks} task(s) x {self.num_virtual_tokens} virtual tokens, hidden_size {self.hidden_size})"
            )
        if tokenizer_size > self.vocab_size:
            refuse(f"the tokenizer has {tokenizer_size} tokens, more than vocab_size {self.vocab_size}")
        ids = [*self.eos_token_ids, self.pad_token_id]
        if any(not 0 <= i < self.vocab_size for i in ids):
            refuse(f"eos/pad token ids {ids} are not all below vocab_size {self.vocab_size}")
