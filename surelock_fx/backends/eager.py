"""The eager backend: the locked graph run by PyTorch, its CPU linear weights prepacked once for oneDNN."""
from __future__ import annotations

import dataclasses

from torch import fx

from ..passes.pipeline import EAGER_TAIL, run_pipeline, running_form
from .base import InProcessBackend


@dataclasses.dataclass(frozen=True)
class Eager(InProcessBackend):
    """Packed rows only: in eager PyTorch the packing costs less than padding rows would."""

    name = "eager"
    padded = False
    packed = True

    def compile(self, gm: fx.GraphModule, packed: bool = False):
        return run_pipeline(running_form(gm, packed), EAGER_TAIL)
