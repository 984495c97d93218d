"""Backends run the locked graph (docs/DESIGN.md §8): one class each, built from the options
``optimize(model, backend=name, **options)`` passes on."""
from __future__ import annotations

from .base import Backend, InProcessBackend
from .eager import Eager
from .inductor import FrozenInductor, Inductor
from .onnxruntime import OnnxRuntime, OrtLockedGraph
from .tensorrt import TensorRT

BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (Eager, Inductor, OnnxRuntime, TensorRT)}
BACKEND_NAMES = tuple(BACKENDS)


def get_backend(backend: "str | Backend", **options) -> Backend:
    """A backend from its name and options, or a Backend given as it is (then without options)."""
    if isinstance(backend, Backend):
        if options:
            raise ValueError(f"options {sorted(options)} go into the {backend.name} backend object, not beside it")
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKEND_NAMES}")
    return BACKENDS[backend].from_options(**options)


__all__ = ["BACKENDS", "BACKEND_NAMES", "Backend", "Eager", "FrozenInductor", "Inductor", "InProcessBackend",
           "OnnxRuntime", "OrtLockedGraph", "TensorRT", "get_backend"]
