"""Training soft prompts against a frozen causal LM: options, batching, the forward/loss paths
(naive and shared-prefix), the loop with checkpoints, and the end-to-end run."""

from softtool.data.options import DataOptions  # it lives with the data; re-exported where it used to be
from softtool.training.loop import NonFiniteLoss, Trainer, TrainResult
from softtool.training.options import TrainOptions
from softtool.training.run import TrainSummary, train_prompt

__all__ = ["DataOptions", "NonFiniteLoss", "TrainOptions", "TrainResult", "TrainSummary", "Trainer", "train_prompt"]
