"""TrainOptions: how to train (optimizer, schedule, batching, evaluation, checkpoints, device).

The fields' metadata (help, choices, limits) is `softtool train`'s flags (softtool.options); bad
combinations raise ValueError here so every caller (CLI, scripts, tests) gets the same checks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from softtool.adapter import PEFT_BASES
from softtool.training.tracking import REPORT_TO

# softtool's name -> transformers.get_scheduler's (each with linear warmup from 0 over warmup_steps).
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainOptions:
    """Optimization and bookkeeping for one training run."""

    lr: float = field(
        default=0.03, metadata={"help": "AdamW learning rate of the prompt parameters", "min": 0, "min_open": True}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "min": 0})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps (the LR rises from 0)", "min": 0})
    schedule: str = field(
        default="linear",
        metadata={
            "help": "learning-rate schedule after warmup (transformers' get_scheduler): linear or cosine decay "
            "to 0, or constant",
            "choices": SCHEDULES,
            "flag": ("--lr-scheduler", "--schedule"),  # --schedule: the name before transformers' schedules
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the prompt gradient norm (0: no clipping)", "min": 0}
    )
    grad_accumulation: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "min": 1})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch", "min": 1})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0: use --epochs)", "min": 0})
    epochs: float = field(
        default=0.0, metadata={"help": "passes over the training set (when --max-steps is 0)", "min": 0}
    )
    seed: int = field(default=0, metadata={"help": "seed for initialization and data order"})
    eval_every: int = field(
        default=50, metadata={"help": "evaluate on the dev subset every N steps (0: only at the end)", "min": 0}
    )
    eval_limit: int = field(default=64, metadata={"help": "dev examples used for evaluation during training", "min": 1})
    eval_generate: bool = field(
        default=False,
        metadata={"help": "also generate on the dev subset and keep the prompt with the best task metric"},
    )
    checkpoint_every: int = field(default=100, metadata={"help": "save a resumable checkpoint every N steps", "min": 0})
    # 256 = 20 virtual tokens (the default N) + 236 tokens of text; the quality runs and studies measured it.
    max_length: int = field(
        default=256,
        metadata={"help": "longest virtual + input + target tokens (longer inputs truncated)", "min": 1},
    )
    prefix_cache: bool = field(
        default=True,
        metadata={"help": "run a prefix prompt once per step and share its KV cache (same result, faster)"},
    )
    dtype: str = field(
        default="float32", metadata={"help": "base model weights: float32, bfloat16 or float16", "choices": DTYPES}
    )
    autocast: bool = field(default=False, metadata={"help": "bf16/fp16 autocast (CUDA only; dtype picks the type)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    report_to: str = field(
        default="none",
        metadata={
            "help": "also send the metrics.jsonl rows (loss, lr, tokens/s, dev loss, dev metrics) to a tracker: "
            "tensorboard (event files in OUTPUT/tensorboard; pip install 'softtool[tracking]') or none",
            "choices": REPORT_TO,
        },
    )
    peft_base: str = field(
        default="hub",
        metadata={
            "help": "base model named in adapter_config.json for PEFT: hub (its hub id when it has one) or "
            "local (the local folder, so PEFT loads it offline)",
            "choices": PEFT_BASES,
        },
    )

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {self.schedule!r}")
        if self.peft_base not in PEFT_BASES:
            raise ValueError(f"peft_base must be one of {PEFT_BASES}, got {self.peft_base!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {REPORT_TO}, got {self.report_to!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("warmup_steps", "max_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accumulation", "max_length", "eval_limit"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("set max_steps or epochs (both are 0)")
        if self.max_steps and self.epochs:
            raise ValueError("set max_steps or epochs, not both")
        if self.autocast and self.dtype == "float32":
            raise ValueError("autocast needs dtype bfloat16 or float16")
        if self.autocast and self.device in ("cpu",):
            raise ValueError("autocast is for CUDA; on cpu train in float32")

    def to_dict(self) -> dict:
        return asdict(self)
