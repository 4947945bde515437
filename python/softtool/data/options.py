"""DataOptions: which task, where its data is, and how much of it to use (the data half of `softtool train`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from softtool.data.tasks import TASK_NAMES


@dataclass
class DataOptions:
    """Where the data is and how much of it to use."""

    task: str = field(default="translation", metadata={"help": "the task to learn", "choices": TASK_NAMES})
    data: str = field(
        default="",
        metadata={
            "help": "data folder holding the train and dev splits (e.g. train.json + dev.json, "
            "train.en.gz + train.de.gz; see docs/data.md), or a Hugging Face dataset name"
        },
    )
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    dev_split: str | None = field(default=None, metadata={"help": "split for evaluation (default: dev/validation)"})
    train_limit: int | None = field(default=None, metadata={"help": "use only the first N training examples", "min": 1})
    # translation: {"src": "en", "tgt": "de"} (the CLI's --src/--tgt come from TranslationOptions)
    task_options: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data is required")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"train_limit must be positive, got {self.train_limit}")
