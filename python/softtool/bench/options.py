"""The options of one benchmark run (`softtool bench`): the workload, the backends, and how to time them.

One dataclass per concern: `BenchOptions` for inference speed (generation, or rank classification with task
classify: softtool.bench.rank), `TrainBenchOptions` for the training comparison. The CLI builds its flags from
the fields' help metadata, and a workload config (benchmarks/configs/*.json) is a JSON object with the same field
names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from softtool.errors import SofttoolError

ALL_BACKENDS = ("peft", "peft-cache", "hf", "hf-cb", "hf-embeds", "hf-static", "hf-rank", "torch", "onnx", "onnx-int8")
STEPS = ("auto", "static", "dynamic")
PREFILLS = ("exact", "buckets")
DEFAULT_BACKENDS = ("peft", "hf", "hf-cb", "torch", "onnx", "onnx-int8")
GENERATION_TASKS = ("translation", "squad", "cnndm")
# classify ranks a classify adapter's labels after each example (softtool.bench.rank) instead of generating.
TASKS = (*GENERATION_TASKS, "classify")
# The classify workload's backends: the peer (one full row per example and label), then softtool's two.
RANK_BACKENDS = ("hf-rank", "torch", "onnx")
DTYPES = ("float32", "float16", "bfloat16")


def _check_device(device: str) -> None:
    if device != "cpu" and device != "cuda" and not device.startswith("cuda:"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")


@dataclass
class BenchOptions:
    """What to generate (or, for task classify, rank), on which backends, and how often to time it."""

    task: str = field(
        default="translation",
        metadata={
            "help": f"Task of the workload: {', '.join(TASKS)} (classify: rank a classify adapter's labels).",
            "choices": TASKS,
        },
    )
    data: str | None = field(
        default=None, metadata={"help": "Data folder (e.g. ../shared/data/multi30k); or give `inputs` in a config."}
    )
    split: str = field(default="val", metadata={"help": "Data split to read."})
    limit: int = field(default=64, metadata={"help": "Number of examples to generate for.", "min": 1})
    batch_size: int = field(
        default=16,
        metadata={
            "help": "Rows decoded together: the slots of softtool's engine and of hf-cb, the static batch of peft and hf.",
            "min": 1,
        },
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Generated tokens per row at most.", "min": 1})
    num_beams: int = field(
        default=1, metadata={"help": "1 for greedy search, N for beam search with N beams.", "min": 1}
    )
    peft_limit: int = field(
        default=32,
        metadata={
            "help": "The slow (uncached) PEFT rows run on the first N examples; rates are per example.",
            "min": 1,
        },
    )
    continuous: bool = field(
        default=True,
        metadata={"help": "softtool's rows use continuous batching (off: static batches, the reference)."},
    )
    step: str = field(
        default="auto",
        metadata={
            "help": "softtool's decode step: static (slot buckets, captured as CUDA graphs on cuda), dynamic, or "
            "auto (static on cuda).",
            "choices": STEPS,
        },
    )
    cuda_graphs: bool = field(
        default=True,
        metadata={"help": "On cuda, softtool captures its static step as CUDA graphs (off: the same step eagerly)."},
    )
    compile: bool = field(
        default=True,
        metadata={
            "help": "On cuda, the torch row compiles its static step with torch.compile before capturing it "
            "(off: the captured step runs PyTorch's own kernels)."
        },
    )
    admit_min: int = field(
        default=1,
        metadata={"help": "softtool admits waiting rows once this many slots are free (1: at once).", "min": 1},
    )
    prefill: str = field(
        default="exact",
        metadata={
            "help": "softtool's prefill shape: exact (as wide as the admitted rows) or buckets (fixed (rows, length) "
            "shapes, captured as CUDA graphs on cuda).",
            "choices": PREFILLS,
        },
    )
    backends: list[str] = field(
        default_factory=lambda: list(DEFAULT_BACKENDS),
        metadata={
            "help": f"Backends to run, of {', '.join(ALL_BACKENDS)} (classify: of {', '.join(RANK_BACKENDS)}, "
            "all by default).",
            "choices": ALL_BACKENDS,
        },
    )
    model: str = field(default="smollm2-135m", metadata={"help": "Base model (name, folder or .gguf)."})
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "Soft prompt folder; without one an untrained prompt (vocab init) is made (classify: required, "
            "its labels and template are the workload)."
        },
    )
    num_virtual_tokens: int = field(default=20, metadata={"help": "Virtual tokens of the untrained prompt.", "min": 1})
    template: str | None = field(
        default=None, metadata={"help": "Template of the untrained prompt; default: the task's prefix template."}
    )
    onnx_dir: str | None = field(default=None, metadata={"help": "Exported graph for `onnx`; default: export it."})
    onnx_int8_dir: str | None = field(default=None, metadata={"help": "Exported int8 graph; default: export it."})
    export_verify_steps: int = field(
        default=32, metadata={"help": "Greedy steps the on-the-fly export checks against PyTorch.", "min": 1}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where on-the-fly exports and the untrained prompt go (default: a cache)."}
    )
    warmup: int = field(default=1, metadata={"help": "Untimed batches run first on each backend.", "min": 0})
    ttft_batches: int = field(
        default=4, metadata={"help": "Batches whose time to first token is measured (prefill + 1 token).", "min": 1}
    )
    repeats: int = field(default=1, metadata={"help": "Timed passes over the workload per backend.", "min": 1})
    threads: int = field(default=2, metadata={"help": "CPU threads every backend and the limit probes use.", "min": 1})
    device: str = field(
        default="cpu",
        metadata={"help": "cpu or cuda: where the torch backends run; onnx backends then need the CUDA provider."},
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": f"Weights of the torch backends ({', '.join(DTYPES)}); float16 exports fp16 graphs.",
            "choices": DTYPES,
        },
    )
    isolate: bool = field(
        default=True, metadata={"help": "Run each backend in a fresh process (a clean peak-memory number)."}
    )
    limits: bool = field(default=True, metadata={"help": "Measure the machine's bandwidth and FLOP/s bounds."})
    inputs: list[str] | None = field(
        default=None, metadata={"help": "Inline source texts (configs only) instead of a data folder.", "cli": False}
    )
    references: list[str] | None = field(
        default=None, metadata={"help": "Inline references for `inputs`.", "cli": False}
    )
    output: str | None = field(default=None, metadata={"help": "JSON result path (a PNG chart goes beside it)."})
    seed: int = field(default=0, metadata={"help": "Seed of the untrained prompt."})
    score_atol: float = field(
        default=1e-3,
        metadata={
            "help": "classify: the largest difference from hf-rank's label scores (summed log-probs) that agrees.",
            "min": 0,
            "min_open": True,
        },
    )
    targets: dict[str, float] | None = field(
        default=None,
        metadata={
            "help": 'classify: the speedup over hf-rank each backend should reach, e.g. {"onnx": 3} (configs only; '
            "the report says met or missed).",
            "cli": False,
        },
    )
    no_repeat_ngram_size: int | None = field(
        default=None,
        metadata={"help": "No-repeat n-gram size of every row (hf ones too); default: the adapter's task default.",
                  "min": 0},
    )  # fmt: skip
    repetition_penalty: float | None = field(
        default=None,
        metadata={"help": "Repetition penalty of every row (hf ones too); default: the adapter's task default.",
                  "min": 0, "min_open": True},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "classify" and self.backends == list(DEFAULT_BACKENDS):
            self.backends = list(RANK_BACKENDS)  # the default set is the task's own
        unknown = [b for b in self.backends if b not in ALL_BACKENDS]
        if unknown or not self.backends:
            raise ValueError(f"backends must be a non-empty subset of {ALL_BACKENDS}, got {self.backends}")
        if self.task == "classify":
            self._check_classify()
        elif "hf-rank" in self.backends:
            raise ValueError("hf-rank ranks labels: it is a backend of task classify, not of generation")
        for name in (
            "limit",
            "batch_size",
            "max_new_tokens",
            "num_beams",
            "repeats",
            "threads",
            "num_virtual_tokens",
            "export_verify_steps",
            "admit_min",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.no_repeat_ngram_size is not None and self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check_device(self.device)
        if self.step not in STEPS:
            raise ValueError(f"step must be one of {STEPS}, got {self.step!r}")
        if self.prefill not in PREFILLS:
            raise ValueError(f"prefill must be one of {PREFILLS}, got {self.prefill!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError("float16 on the CPU is emulated and slow; use float32 or bfloat16 there")
        if (self.data is None) == (self.inputs is None):
            raise ValueError("give exactly one of `data` (a data folder) and `inputs` (inline texts)")
        if self.references is not None and (self.inputs is None or len(self.references) != len(self.inputs)):
            raise ValueError("`references` needs `inputs` of the same length")

    def _check_classify(self) -> None:
        other = [b for b in self.backends if b not in RANK_BACKENDS]
        if other:
            raise ValueError(f"task classify ranks labels with {', '.join(RANK_BACKENDS)}; {other} generate text")
        if not self.adapter:
            raise ValueError(
                "task classify needs `adapter`, a classify prompt (its labels and template are the workload); "
                "train one with softtool train --task classify"
            )
        if self.data is None:
            raise ValueError("task classify reads its examples and gold labels from `data`, not inline `inputs`")
        for name, target in (self.targets or {}).items():
            if name not in RANK_BACKENDS or not target > 0:
                raise ValueError(f"targets: {name}={target}; give a positive speedup for any of {RANK_BACKENDS}")

    @property
    def onnx_device(self) -> str:
        """ONNX Runtime's device for this bench: it knows cpu and cuda, not cuda:N."""
        return "cpu" if self.device == "cpu" else "cuda"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainBenchOptions:
    """The training comparison: softtool's training step against PEFT prompt tuning, same everything."""

    task: str = field(
        default="translation",
        metadata={"help": f"Task of the workload: {', '.join(GENERATION_TASKS)}.", "choices": GENERATION_TASKS},
    )
    data: str | None = field(default=None, metadata={"help": "Data folder to draw training examples from."})
    split: str = field(default="train", metadata={"help": "Data split to read."})
    model: str = field(default="smollm2-135m", metadata={"help": "Base model (name, folder or .gguf)."})
    num_virtual_tokens: list[int] = field(
        default_factory=lambda: [20, 100], metadata={"help": "Prompt lengths to compare (one run each).", "min": 1}
    )
    batch_size: int = field(default=8, metadata={"help": "Examples per training step.", "min": 1})
    steps: int = field(default=10, metadata={"help": "Timed training steps per side (K).", "min": 1})
    warmup: int = field(
        default=2, metadata={"help": "Untimed steps first (not counted, but losses are compared).", "min": 0}
    )
    lr: float = field(
        default=3e-2, metadata={"help": "Learning rate (AdamW) of both sides.", "min": 0, "min_open": True}
    )
    max_length: int = field(
        default=128, metadata={"help": "Token budget per example (text and target; virtual tokens on top).", "min": 1}
    )
    threads: int = field(default=2, metadata={"help": "CPU threads.", "min": 1})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda: where both sides train (float32 weights)."})
    seed: int = field(default=0, metadata={"help": "Seed of the shared prompt init and data order."})
    inputs: list[str] | None = field(
        default=None, metadata={"help": "Inline source texts (configs only).", "cli": False}
    )
    references: list[str] | None = field(default=None, metadata={"help": "Inline targets for `inputs`.", "cli": False})
    loss_rtol: float = field(
        default=1e-3, metadata={"help": "Relative loss difference allowed after K steps.", "min": 0, "min_open": True}
    )
    output: str | None = field(default=None, metadata={"help": "JSON result path (a PNG chart goes beside it)."})

    def __post_init__(self) -> None:
        if self.task not in GENERATION_TASKS:
            raise ValueError(f"the training comparison covers tasks {GENERATION_TASKS}, not {self.task!r}")
        if not self.num_virtual_tokens or min(self.num_virtual_tokens) < 1:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        for name in ("batch_size", "steps", "threads", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        _check_device(self.device)
        if (self.data is None) == (self.inputs is None):
            raise ValueError("give exactly one of `data` (a data folder) and `inputs` (inline texts)")
        if self.inputs is not None and (self.references is None or len(self.references) != len(self.inputs)):
            raise ValueError("training needs `references` (targets) as long as `inputs`")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config(path: str | Path) -> dict[str, Any]:
    """A workload config: a JSON object of option fields, optionally {"generate": {...}, "train": {...}}."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SofttoolError(f"cannot read bench config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise SofttoolError(f"bench config {path} must hold a JSON object of options")
    return config


def build_options(cls: type, values: dict[str, Any], source: str) -> Any:
    """Make `cls` from a dict, turning unknown keys and bad combinations into one-line user errors."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SofttoolError(f"{source}: unknown option(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise SofttoolError(f"{source}: {exc}") from exc
