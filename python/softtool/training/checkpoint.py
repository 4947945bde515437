"""Resumable checkpoints: everything needed to continue a run as if it had never stopped.

One file, checkpoints/last.safetensors. Its tensors (prompt parameters, optimizer moments, the best
prompt, torch's RNG state) are safetensors; everything else (step counters, data position, optimizer and
scheduler settings, the metrics history, Python's and numpy's RNG states) is JSON in the file's metadata.
Neither format can carry code, so loading a checkpoint never runs any. Python and numpy RNG states and
floats round-trip exactly, so a resumed run takes bit-identical steps.

The file is written to a temporary name beside it and renamed, so a crash, Ctrl-C or kill -9 during the
save leaves the previous checkpoint intact; `remove_stale_temps` clears what such a crash left behind.
Checkpoints of older softtool versions (checkpoints/last.pt, a pickle) are refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softtool import __version__
from softtool.errors import SofttoolError, written_by
from softtool.fileio import atomic_write_bytes, remove_stale_temps

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.safetensors"
LEGACY_FILE = "last.pt"  # pickled checkpoints of softtool 0.1.0: refused, removed by --overwrite
FILES = (CHECKPOINT_FILE, LEGACY_FILE)  # what softtool writes in checkpoints/ (and only deletes these)
FORMAT = "softtool-checkpoint"
VERSION = 1
REQUIRED = ("prompt", "optimizer", "scheduler", "state", "rng", "total_steps")

# JSON stand-ins for what JSON lacks: {"__tensor__": key} points into the safetensors part.
_TENSOR, _TUPLE, _ITEMS, _FLOAT, _ARRAY = "__tensor__", "__tuple__", "__items__", "__float__", "__ndarray__"
_MARKERS = (_TENSOR, _TUPLE, _ITEMS, _FLOAT, _ARRAY)


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


# -- the codec: nested state <-> (JSON-able object, tensors) -----------------------------------------------


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[where] = value.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared memory
        return {_TENSOR: where}
    if isinstance(value, np.ndarray):
        return {_ARRAY: value.dtype.str, "shape": list(value.shape), "data": value.ravel().tolist()}
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    if isinstance(value, list | tuple):
        items = [_encode(v, tensors, f"{where}.{i}") for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        # Keys JSON would turn into strings (the optimizer's parameter indices): kept as pairs.
        return {_ITEMS: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in value.items()]}
    raise TypeError(f"a checkpoint cannot hold {type(value).__name__} (at {where})")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and _TENSOR in value:
        return tensors[value[_TENSOR]]
    if len(value) == 1 and _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if len(value) == 1 and _ITEMS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_ITEMS]}
    if len(value) == 1 and _FLOAT in value:
        return float(value[_FLOAT])
    if _ARRAY in value:
        return np.array(value["data"], dtype=np.dtype(value[_ARRAY])).reshape(value["shape"])
    return {k: _decode(v, tensors) for k, v in value.items()}


# -- files ----------------------------------------------------------------------------------------------------


def save_checkpoint(output_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` (plus the RNG states) atomically to OUTPUT/checkpoints/last.safetensors."""
    from safetensors.torch import save

    path = checkpoint_path(output_dir)
    tensors: dict[str, torch.Tensor] = {}
    body = _encode({**state, "rng": rng_state()}, tensors, "")
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "softtool_version": __version__,  # named when a later softtool refuses this checkpoint's format
        "state": json.dumps(body, allow_nan=False),
    }
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def clean_checkpoint_dir(output_dir: str | os.PathLike) -> int:
    """Remove what an interrupted save left in OUTPUT/checkpoints (temporary files); returns how many."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return 0
    removed = sum(remove_stale_temps(folder, name) for name in FILES)
    for stale in folder.glob(f".{LEGACY_FILE}.*"):  # the older writer's temporary names had no .tmp suffix
        stale.unlink(missing_ok=True)
        removed += 1
    return removed


def load_checkpoint(output_dir: str | os.PathLike) -> dict[str, Any]:
    """The state saved by save_checkpoint; a one-line SofttoolError for anything else."""
    from safetensors import SafetensorError, safe_open

    path = checkpoint_path(output_dir)
    restart = "start the run again with --overwrite"
    if not path.is_file():
        legacy = path.with_name(LEGACY_FILE)
        if legacy.is_file():
            raise SofttoolError(
                f"{legacy} is a checkpoint of an older softtool (written by softtool 0.1.0: a pickle, which softtool "
                f"no longer loads: unpickling can run code); {restart}"
            )
        raise SofttoolError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SofttoolError(f"checkpoint {path} is corrupt or unreadable ({first}); {restart}") from exc
    if metadata.get("format") != FORMAT or metadata.get("version") != str(VERSION):
        raise SofttoolError(
            f"checkpoint {path} is not a softtool checkpoint of version {VERSION} "
            f"(format {metadata.get('format')!r}, version {metadata.get('version')!r}, "
            f"{written_by(metadata.get('softtool_version'))}); {restart}"
        )
    try:
        state = _decode(json.loads(metadata["state"]), tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise SofttoolError(f"checkpoint {path} is corrupt ({type(exc).__name__}: {exc}); {restart}") from exc
    missing = [key for key in REQUIRED if not isinstance(state, dict) or key not in state]
    missing += [f"rng.{k}" for k in ("torch", "python", "numpy") if not missing and k not in state["rng"]]
    if missing:
        raise SofttoolError(f"checkpoint {path} lacks {missing}; {restart}")
    return state
