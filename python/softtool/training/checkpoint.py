"""Resumable checkpoints: everything needed to continue a run as if it had never stopped.

One file, checkpoints/last.pt, written to a temporary name and renamed, so a crash or Ctrl-C during
the save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softtool.errors import SofttoolError

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def save_checkpoint(output_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` atomically to OUTPUT/checkpoints/last.pt."""
    path = checkpoint_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".last.pt.")
    os.close(fd)
    try:
        torch.save({**state, "rng": rng_state()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(output_dir: str | os.PathLike) -> dict[str, Any]:
    path = checkpoint_path(output_dir)
    if not path.is_file():
        raise SofttoolError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        # Our own file: optimizer and RNG states are plain Python/numpy objects, hence weights_only=False.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise SofttoolError(
            f"checkpoint {path} is corrupt or unreadable ({exc}); start again with --overwrite"
        ) from exc
