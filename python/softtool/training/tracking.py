"""Experiment trackers: the rows of metrics.jsonl, sent as they are logged to a tool people follow runs in.

`softtool train --report-to NAME` picks one from TRACKERS (default `none`). A tracker gets every row the loop
appends to the history (a training step: loss, lr, grad_norm, tokens, tokens_per_s; an evaluation: dev_loss
and the task's metrics when generated), so it shows exactly what metrics.jsonl holds. Each number becomes the
scalar `<kind>/<key>` at the row's step: `train/loss`, `train/lr`, `eval/dev_loss`, `eval/bleu`, ...

Adding a tracker (say mlflow) is one class with `log(row)`, `flush()` and `close()`, built from the output
folder and the step the run resumes from, and one entry in TRACKERS; the flag's choices come from TRACKERS.
Rank 0 alone opens one (softtool.training.loop), so a run under torchrun reports once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from softtool.errors import SofttoolError

TENSORBOARD_DIR = "tensorboard"  # under the run's --output


class Tracker(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers as `<kind>/<key>` tags (step and kind are where and what, not values)."""
    kind = row.get("kind", "train")
    return {
        f"{kind}/{key}": float(value)
        for key, value in row.items()
        if key not in ("step", "kind") and isinstance(value, int | float) and not isinstance(value, bool)
    }


class TensorBoardTracker:
    """Event files in OUTPUT/tensorboard (`tensorboard --logdir OUTPUT/tensorboard`), through torch's SummaryWriter.

    A resumed run continues after the checkpoint's step; what the stopped run had logged after that step is
    hidden (`purge_step`), so the curves show each step once, as metrics.jsonl does. A new run starts from an
    empty folder (`clear`).
    """

    def __init__(self, output_dir: Path, start_step: int = 0):
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at this step or later, from earlier writers of the folder, are dropped when read.
        purge = start_step + 1 if start_step else None
        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD_DIR), purge_step=purge)

    @staticmethod
    def clear(output_dir: Path) -> None:
        """Remove the event files an earlier run wrote (and the folder, when nothing else is in it)."""
        folder = Path(output_dir) / TENSORBOARD_DIR
        if not folder.is_dir():
            return
        for events in folder.glob("events.out.tfevents.*"):
            events.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()

    def log(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, int(row["step"]))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# --report-to NAME -> the tracker's class; "none" reports nowhere.
TRACKERS: dict[str, type] = {"tensorboard": TensorBoardTracker}
REPORT_TO = ("none", *TRACKERS)
# The package each tracker needs, and the extra that installs it.
_PACKAGES = {"tensorboard": "tensorboard"}


def require(name: str) -> None:
    """Refuse a tracker whose package is not installed, in one line saying how to install it."""
    import importlib

    try:
        importlib.import_module(_PACKAGES[name])
    except ImportError as exc:
        raise SofttoolError(
            f"--report-to {name} needs the {_PACKAGES[name]} package: pip install 'softtool[tracking]'"
        ) from exc


def clear_trackers(output_dir: Path) -> None:
    """Before a new run in `output_dir` (not a resumed one): remove what trackers wrote there for an earlier run."""
    TensorBoardTracker.clear(output_dir)


def open_tracker(name: str, output_dir: Path, start_step: int = 0) -> Tracker | None:
    """The tracker `name` writing for the run in `output_dir` from `start_step`; None for "none"."""
    if name == "none":
        return None
    if name not in TRACKERS:
        raise SofttoolError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {name!r}")
    return TRACKERS[name](Path(output_dir), start_step)
