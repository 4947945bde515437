"""Training soft prompts against a frozen causal LM: options, batching, the forward/loss paths
(naive and shared-prefix), the loop with checkpoints, and the end-to-end run."""

from softtool.training.loop import NonFiniteLoss, Trainer, TrainResult
from softtool.training.options import TrainOptions
from softtool.training.run import DataOptions, TrainSummary, train_prompt

__all__ = ["DataOptions", "NonFiniteLoss", "TrainOptions", "TrainResult", "TrainSummary", "Trainer", "train_prompt"]
