"""Generation backends behind one interface (runtime.base.Generator), chosen by name."""

from __future__ import annotations

from softtool.errors import SofttoolError
from softtool.runtime.base import Generator, SearchOptions

BACKENDS = ("torch", "onnx")


def load_generator(path, backend: str = "torch", **kw) -> Generator:
    """A generator for the adapter (torch) or export (onnx) folder at `path`."""
    if backend == "torch":
        from softtool.runtime.torch_backend import TorchGenerator

        return TorchGenerator.from_adapter(path, **kw)
    if backend == "onnx":
        from softtool.runtime.onnx_backend import OnnxGenerator

        return OnnxGenerator.from_export_dir(path, **kw)
    raise SofttoolError(f"unknown backend {backend!r}; use one of {BACKENDS}")


__all__ = ["BACKENDS", "Generator", "SearchOptions", "load_generator"]
