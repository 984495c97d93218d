"""The inductor backend: torch.compile of the locked graph with dynamic shapes and frozen weights."""
from __future__ import annotations

import dataclasses

import torch
from torch import fx
from torch._inductor import config as inductor_config
from torch.fx.experimental import _config as fx_config

from ..lock import kl_divergence
from ..passes.pipeline import INDUCTOR_TAIL, run_pipeline, running_form
from .base import InProcessBackend


class FrozenInductor:
    """``torch.compile(fn, dynamic=True)`` whose compilations freeze the weights (if any) into the graph as
    constants, which lets inductor pack them for oneDNN (its CPU weight-packing pass picks oneDNN's
    packed GEMM for a dynamic row count). Dynamo reads inductor's ``freezing`` flag when it traces,
    and any call with new shapes may trace, so the flag is set around every call, not globally; and
    inductor freezes only what it compiles without autograd, so every call runs under no_grad (the
    locked graph is for inference only). Duck sizing is off while tracing: a decode's first pass has
    as many active rows as positions (M = N), and a graph traced with them sized as one symbol would be
    compiled again, for M < N, on the next step."""

    def __init__(self, fn):
        self.compiled = torch.compile(fn, dynamic=True)

    def __call__(self, *args, **kwargs):
        with inductor_config.patch(freezing=True), fx_config.patch(use_duck_shape=False), torch.no_grad():
            return self.compiled(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Inductor(InProcessBackend):
    """Both forms, each compiled on its first call; weights are frozen then (later changes to the model's
    weights are not seen)."""

    name = "inductor"
    padded = True
    packed = True

    def compile(self, gm: fx.GraphModule, packed: bool = False):
        return FrozenInductor(run_pipeline(running_form(gm, packed), INDUCTOR_TAIL))

    def lock_kl(self):
        """The KL's softmax and reductions per candidate row, fused into one kernel."""
        return FrozenInductor(kl_divergence)
