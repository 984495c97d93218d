"""The tensorrt backend: TensorRT engines of the locked graph (``export.tensorrt``), built by ``optimize`` or
loaded from a directory that ``export_tensorrt`` wrote. Needs torch-tensorrt and a CUDA GPU."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from torch import fx

from ..export import tensorrt as engines_io
from ..runtime import LockedForms
from .base import Backend


@dataclasses.dataclass(frozen=True)
class TensorRT(Backend):
    """The padded form only (the engines take no packing inputs). ``engines``: load the engines saved there
    instead of building them; else they are built for the ranges given (``export_tensorrt``'s
    ``min_active``, ``opt_active``, ``max_active``, ``batch``, ``seq``) with the lowering ``settings``
    (``tensorrt_settings``' overrides) and saved to ``export_dir`` if it is given."""

    name = "tensorrt"
    padded = True
    packed = False
    export_dir: str | Path | None = None
    engines: str | Path | None = None
    min_active: int = 1
    opt_active: int | None = None
    max_active: int | None = None
    batch: int | Sequence[int] = 1
    seq: int | Sequence[int] = (2, 256, 2048)
    settings: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_options(cls, **options) -> "TensorRT":
        """Ranges, ``export_dir`` and ``engines`` as named; every other option is a lowering setting."""
        named = {k: options.pop(k) for k in (*engines_io.RANGE_OPTIONS, "export_dir", "engines") if k in options}
        return cls(**named, settings=options)

    def check(self) -> None:
        engines_io.require_tensorrt()
        if self.engines is None:
            self.ranges()

    def ranges(self):
        return engines_io.tensorrt_ranges(min_active=self.min_active, opt_active=self.opt_active,
                                          max_active=self.max_active,
                               batch=self.batch, seq=self.seq)

    def forms(self, locked: fx.GraphModule) -> LockedForms:
        if self.engines is not None:
            return LockedForms(engines_io.load_engines(self.engines), None)
        module = engines_io.build_tensorrt(locked, self.ranges(), **self.settings)
        if self.export_dir is not None:
            engines_io.save_tensorrt(module, locked, self.ranges(), self.export_dir)
        return LockedForms(module, None)
