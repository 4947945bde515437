"""Writing files so that a crash never leaves a half-written one: write beside the target, then rename.

Every artifact softtool writes (adapters, checkpoints, metrics, exports) goes through here. Files get the
mode a plain `open()` would give them (0666 less the umask, so 0644 by default), not mkstemp's 0600, so an
artifact shared with other users is readable as a whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is renamed onto `path`.

    For writers that want a file name (torch.save, safetensors.save_file, onnx.save). On any failure the
    temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON with sorted keys; NaN and infinity are refused (they are not JSON and hide broken numbers)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def remove_stale_temps(folder: str | os.PathLike, name: str) -> int:
    """Delete temporary files that an interrupted atomic write of `name` left in `folder`; returns how many."""
    folder = Path(folder)
    removed = 0
    for stale in folder.glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)
        removed += 1
    return removed
