"""The tasks a server answers to: what PATHs and --adapters-dir hold, loaded into one generator.

Each task is a name (the API's `model`), the task id it has in the generator (its rows of the prompt table),
and its template. Every task shares the one base model and the one engine:

- adapter folders only: the PyTorch backend (`TorchGenerator.from_adapters`);
- one export folder: the ONNX backend with the export's tasks; adapter folders next to it (PATHs or
  --adapters-dir) become tasks of the same graph, which needs an export made with --prompt-table-input.

Anything else (two exports, an adapter of another base model, adapters next to an export whose table is
baked in) is refused in one line before the server starts. With --adapters-dir the folder is looked at
again every --watch-interval seconds, and an adapter folder that appeared (and has not changed between two
looks, so a folder still being written is not read half-way) becomes a new task without a restart. Only
folders given on the command line or found in that directory are ever loaded: nothing loads a path a
request names.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from softtool.adapter import CONFIG_FILE, WEIGHTS_FILE, Adapter, AdapterMeta, load_adapter
from softtool.errors import SofttoolError
from softtool.export_meta import ExportMeta
from softtool.prompts.template import Template

log = logging.getLogger("softtool.serve")


@dataclass
class Task:
    """One served soft prompt."""

    name: str
    task_id: int
    template: Template
    source: str
    created: int
    kind: str = "generic"  # softtool's task: squad, translation, classify, ... (the adapter's or export's record)
    task_options: dict = field(default_factory=dict)

    @functools.cached_property
    def classifier(self):
        """For a classify task, its softtool task (labels, verbalizer): requests get the best-ranked label."""
        if self.kind != "classify":
            return None
        from softtool.data import get_task

        return get_task("classify", **self.task_options)


# A request's `model` may name a task with this suffix: its virtual tokens, then the request's prompt as it is,
# instead of the prompt filling the task's template (PEFT's prepend convention; what lm-eval needs).
PREFIX_MODE = ":prefix"


class Registry:
    """Task name -> Task; changed only on the event loop."""

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}

    def add(
        self,
        name: str,
        task_id: int,
        template: Template,
        source: str | os.PathLike,
        kind: str = "generic",
        task_options: dict | None = None,
    ) -> Task:
        task = Task(name, task_id, template, str(source), int(time.time()), kind, dict(task_options or {}))
        self.tasks[name] = task
        return task

    def get(self, name: str) -> Task | None:
        return self.tasks.get(name)

    def resolve(self, model: str) -> tuple[Task, bool] | None:
        """The task a request's `model` names, and whether it asks for prefix mode (`TASK:prefix`); a task whose
        own name ends in `:prefix` is that task."""
        task = self.tasks.get(model)
        if task is not None:
            return task, False
        if model.endswith(PREFIX_MODE):
            task = self.tasks.get(model.removesuffix(PREFIX_MODE))
            if task is not None:
                return task, True
        return None

    def __contains__(self, name: str) -> bool:
        return name in self.tasks

    def __len__(self) -> int:
        return len(self.tasks)


@dataclass
class Source:
    """A PATH of the command line: its task name and whether it is an adapter or an export folder."""

    name: str
    path: Path
    kind: str  # "adapter" or "export"
    named: bool = False  # given as NAME=PATH


def is_adapter_dir(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def parse_source(text: str) -> Source:
    """`PATH` or `NAME=PATH` (a NAME= prefix only when the text is not itself an existing path)."""
    name, sep, rest = text.partition("=")
    if sep and name and not Path(text).exists():
        path, given = Path(rest), name
    else:
        path, given = Path(text), None
    if not path.is_dir():
        raise SofttoolError(f"adapter or export folder not found: {path}")
    if ExportMeta.is_export(path):
        kind = "export"
    elif is_adapter_dir(path):
        kind = "adapter"
    elif (path / ExportMeta.MODEL_FILE).is_file():
        raise SofttoolError(
            f"{path} holds {ExportMeta.MODEL_FILE} but no {ExportMeta.FILE} (an unfinished export); re-run softtool export"
        )
    else:
        raise SofttoolError(f"{path} is neither an adapter folder ({WEIGHTS_FILE}) nor an export ({ExportMeta.FILE})")
    return Source(given or path.resolve().name, path, kind, named=given is not None)


def scan_adapters(folder: Path) -> list[Source]:
    """The adapter folders directly inside `folder`, by name."""
    if not folder.is_dir():
        raise SofttoolError(f"--adapters-dir {folder} is not a folder")
    return [Source(p.name, p, "adapter") for p in sorted(folder.iterdir()) if p.is_dir() and is_adapter_dir(p)]


def same_base(meta: AdapterMeta, reference: AdapterMeta) -> bool:
    """Whether an adapter names the reference's base model (by the name loaded, its hub id or its folder)."""
    mine = {meta.base_model, meta.base_model_id, _resolved(meta.base_model_path)} - {None, ""}
    theirs = {reference.base_model, reference.base_model_id, _resolved(reference.base_model_path)} - {None, ""}
    return bool(mine & theirs)


def _resolved(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def add_adapter(generator, adapter: Adapter, name: str, *, check_base: bool = True) -> int:
    """Add an adapter to `generator` as a new task (call on the engine thread); returns its task id."""
    if check_base and not same_base(adapter.meta, generator.meta):
        raise SofttoolError(
            f"{name}: trained on {adapter.meta.base_model!r}, but the server's base model is "
            f"{generator.meta.base_model!r}; every task shares one base model"
        )
    model = getattr(generator, "model", None)
    if model is not None:
        from softtool.adapter import check_compatible

        check_compatible(adapter, model)
    table = adapter.prompt_table
    if not hasattr(generator, "slot_lm"):  # the ONNX backend takes a numpy table
        table = table.numpy()
    return generator.add_task(table, Template.parse(adapter.meta.template), name, adapter.meta.decoding)


@dataclass
class Loaded:
    generator: object
    registry: Registry
    backend: str
    check_base: bool  # False when --model overrides the adapters' base (then only shapes are checked)


def load(
    paths: list[str],
    adapters_dir: str | None,
    backend: str | None,
    *,
    model: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> Loaded:
    """Load every task into one generator; a SofttoolError (one line) for any combination that cannot work."""
    sources = [parse_source(p) for p in paths]
    if adapters_dir is not None:
        sources += scan_adapters(Path(adapters_dir))
    if not sources:
        where = f" and {adapters_dir} holds no adapter folder" if adapters_dir else ""
        raise SofttoolError(f"nothing to serve: give adapter or export folders{where}")
    exports = [s for s in sources if s.kind == "export"]
    adapters = [s for s in sources if s.kind == "adapter"]
    if len(exports) > 1:
        raise SofttoolError(
            f"one export folder at a time ({', '.join(str(s.path) for s in exports)}): its tasks share one graph; "
            "export the adapters together (softtool export A B -o DIR) or serve adapter folders"
        )
    registry = Registry()
    if exports:
        if backend == "torch":
            raise SofttoolError(f"{exports[0].path} is an export folder; serve it with --backend onnx (the default)")
        generator = _load_export(exports[0], device, threads, registry)
        if adapters and not generator.export_meta.prompt_table_input:
            raise SofttoolError(
                f"{exports[0].path} has its prompt table baked in, so adapters cannot be added to it; "
                "re-export with --prompt-table-input"
            )
        backend = "onnx"
    else:
        if backend == "onnx":
            raise SofttoolError("--backend onnx needs an export folder (softtool export); adapters run on torch")
        from softtool.runtime.torch_backend import TorchGenerator

        first = adapters.pop(0)
        kw = {"device": device, **({"model_name": model} if model else {})}
        generator = TorchGenerator.from_adapter(first.path, **kw)
        generator.task_names = [first.name]
        meta = generator.meta
        registry.add(first.name, 0, generator.template_of(0), first.path, meta.task, meta.task_options)
        backend = "torch"
    check_base = model is None
    for source in adapters:
        if source.name in registry:
            raise SofttoolError(f"two tasks are named {source.name!r}; name one with NAME=PATH")
        adapter = load_adapter(source.path)
        task_id = add_adapter(generator, adapter, source.name, check_base=check_base)
        meta = adapter.meta
        registry.add(source.name, task_id, generator.template_of(task_id), source.path, meta.task, meta.task_options)
    return Loaded(generator, registry, backend, check_base)


def _load_export(source: Source, device: str, threads: int | None, registry: Registry):
    """The export's tasks under their recorded names (one task: the folder's name, or NAME=)."""
    from softtool.runtime.onnx_backend import OnnxGenerator

    generator = OnnxGenerator.from_export_dir(source.path, device=device, threads=threads)
    names = list(generator.task_names)
    if len(names) == 1:
        names = [source.name]
    elif source.named:
        raise SofttoolError(f"{source.path} holds {len(names)} tasks with their own names; NAME= is for one task")
    if len(set(names)) != len(names):
        raise SofttoolError(f"{source.path} holds two tasks of one name ({names}); re-export with distinct folders")
    generator.task_names = names
    for task_id, (name, task) in enumerate(zip(names, generator.export_meta.tasks, strict=True)):
        registry.add(name, task_id, generator.template_of(task_id), source.path, task.task, task.task_options)
    return generator


class AdapterWatcher:
    """Looks at --adapters-dir every `interval` seconds and adds new adapter folders as tasks."""

    def __init__(self, folder: str | os.PathLike, loaded: Loaded, engine, interval: float, on_added=None):
        self.folder = Path(folder)
        self.loaded = loaded
        self.engine = engine
        self.interval = interval
        self.on_added = on_added
        self._last: dict[str, tuple] = {}  # name -> its files' signature at the previous look
        self._refused: dict[str, tuple] = {}  # name -> the signature that failed to load (retried when it changes)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.scan_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bad look must not end the watching
                log.exception("looking at %s failed", self.folder)

    def _candidates(self) -> list[tuple[Source, tuple]]:
        if not self.folder.is_dir():
            return []
        out = []
        for source in scan_adapters(self.folder):
            try:
                signature = tuple(
                    (f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(source.path.iterdir())
                )
            except OSError:
                continue
            out.append((source, signature))
        return out

    def _add(self, adapter: Adapter, name: str) -> int:
        return add_adapter(self.loaded.generator, adapter, name, check_base=self.loaded.check_base)

    async def scan_once(self) -> list[str]:
        """One look; returns the names of the tasks added."""
        registry = self.loaded.registry
        added = []
        seen = {}
        for source, signature in await asyncio.to_thread(self._candidates):
            seen[source.name] = signature
            if source.name in registry or self._refused.get(source.name) == signature:
                continue
            if self._last.get(source.name) != signature:  # new or still changing: wait for a quiet look
                continue
            try:
                adapter = await asyncio.to_thread(load_adapter, source.path)
                task_id = await self.engine.call(partial(self._add, adapter, source.name))
            except SofttoolError as exc:
                self._refused[source.name] = signature
                log.warning("not serving %s: %s", source.path, exc)
                continue
            template = Template.parse(adapter.meta.template)
            registry.add(source.name, task_id, template, source.path, adapter.meta.task, adapter.meta.task_options)
            added.append(source.name)
            log.info("serving a new task %r from %s", source.name, source.path)
            if self.on_added:
                self.on_added(source.name)
        self._last = seen
        return added
