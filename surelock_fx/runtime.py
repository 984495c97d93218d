"""The decode runtime: feeds a locked graph its active rows and caches every step.

A runner is the forward function the sampler calls, ``(x [B, N], attention_mask) -> RowLogits``:
only the active rows are computed, the lock state is updated from their logits, and those logits are
returned as they came out of the graph, with the row of each position (-1 for locked positions: the
sampler never reads them, since a locked position is already unmasked).

Per step the runner's own work (profiled under the ``surelock::*`` record_function labels) is:
building the active index, releasing the previous pass's logits that no KL will read when the new
ones would otherwise be held alongside them all (``LockState.release``), running the graph, and the
KL lock rule on the candidate rows.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import fx
from torch.profiler import record_function

from .lock import LockConfig, LockState, active_index, pack_index
from .passes import CacheSpec
from .passes.row_analysis import SDPA
from .sampler import DecodeStats, RowLogits, special_ids


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Algorithmic GEMM FLOPs (DESIGN §1, plus the LM head): per computed row, and per
    (query row, key) pair of attention."""

    per_row: int
    per_pair: int

    @classmethod
    def from_graph(cls, gm: fx.GraphModule) -> "FlopModel":
        per_row = per_pair = 0
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.linear.default:
                out_features, in_features = node.args[1].meta["val"].shape
                per_row += 2 * int(in_features) * int(out_features)
            elif node.target is SDPA:
                q = node.args[0].meta["val"]
                per_pair += 4 * int(q.shape[1]) * int(q.shape[3])
        return cls(per_row, per_pair)

    def step(self, rows: int, keys: int, queries: int | None = None) -> int:
        """FLOPs of a pass computing ``rows`` rows whose attention runs ``queries`` (default: those rows)
        over ``keys`` keys."""
        return rows * self.per_row + (rows if queries is None else queries) * keys * self.per_pair


# The crossover to full-width steps (``active_index(..., full_from)``): a step whose bucketed
# active count M reaches this fraction of N runs with M = N. Computing N instead of M rows is
# exact (the extra rows are padding aimed at the scratch slot) and costs at most
# (1 - FULL_FROM) / FULL_FROM more FLOPs, while every nearly dense step shares one graph shape.
# Measured crossover (benchmarks/step_latency.py, CPU, eager and inductor, N = 256 and 1024): the
# locked graph is as slow as the dense model at M/N = 0.95-0.99, so nearly dense steps gain little
# from skipping the last rows.
FULL_FROM = 0.98

# The crossover to the packed graph (passes.pack_rows) where a backend has both forms: a step runs it
# when padding is at least this share of the active index's B x M entries (``runs_packed``). Packing costs inductor's
# generated code about 2% of a step with no padding (one step, e2e model, CPU, B = 8, 40 active rows
# each: packed / padded 0.98x) and saves the padding rows' share: 0.99x at 1.9% padding, 1.00x at
# 3.8%, 1.07x at 6.3%.
PACK_FROM = 0.03


def runs_packed(forms: tuple[bool, bool], entries: int, real: int, pack_from: float = PACK_FROM) -> bool:
    """Whether a step whose active index has ``entries`` entries, ``real`` of them active rows, runs the
    packed graph, given the forms there are (padded, packed): the packed one if it is the only one, or
    if the padding reaches ``pack_from``."""
    padded, packed = forms
    return packed and (not padded or entries - real >= pack_from * entries)


LockedGraph = Callable[..., tuple]


class LockedRunner:
    """Runs a locked graph for one decode, holding its caches and lock state. ``graph`` computes the
    active index's B x M entries; ``packed_graph`` (passes.pack_rows) takes ``pack_index``'s inputs after
    ``key_mask`` and computes and returns the real rows only. Given both, a step runs the packed one when
    its padding makes it pay (``runs_packed``); either may be None."""

    def __init__(self, graph: LockedGraph | None, specs: list[CacheSpec], config, flops: FlopModel,
                 lock: LockConfig | None, stats: DecodeStats, bucket: int = 1, full_from: float = FULL_FROM,
                 kl=None, packed_graph: LockedGraph | None = None, pack_from: float = PACK_FROM):
        if graph is None and packed_graph is None:
            raise ValueError("a LockedRunner needs a graph, a packed graph, or both")
        self.graph, self.packed_graph, self.pack_from = graph, packed_graph, pack_from
        self.specs, self.flops, self.kl = specs, flops, kl
        self.lock, self.stats, self.bucket, self.full_from = lock, stats, bucket, full_from
        self.mask_id = special_ids(config)[0]
        self.state: LockState | None = None

    def _start(self, x: torch.Tensor) -> None:
        B, N = x.shape
        self.state = self.stats.lock_state = LockState(self.lock, x, self.mask_id, self.kl)
        self.caches = [torch.zeros(B, s.heads, N + 1, s.head_dim, dtype=s.dtype, device=x.device) for s in self.specs]
        self.positions = torch.arange(N, device=x.device).expand(B, N)
        self.stats.flops_dense = self.stats.flops_locked = 0

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> RowLogits:
        B, N = x.shape
        if self.state is None:
            self._start(x)
        elif self.state.locked.shape != (B, N):
            raise ValueError(f"a runner decodes one batch shape; got {tuple(x.shape)} after {tuple(self.state.locked.shape)}")
        key_mask = torch.ones(B, N, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask.bool()
        unmasked = x != self.mask_id
        with record_function("surelock::index"):
            index, counts = active_index(self.state.locked, self.bucket, self.full_from)
            real = int(counts.sum())
            forms = (self.graph is not None, self.packed_graph is not None)
            packed = runs_packed(forms, index.numel(), real, self.pack_from)
            packing = pack_index(index, N) if packed else ()
        with record_function("surelock::release"):
            self.state.release(unmasked, len(packing[0]) if packing else index.numel())
        with record_function("surelock::graph"):
            graph = self.packed_graph if packed else self.graph
            logits, *self.caches = graph(x, self.positions, index, key_mask, *packing, *self.caches)
        self._record(real, B, N, packed)
        with record_function("surelock::lock_update"):
            self.state.update(index, logits, unmasked, packing[1] if packing else None)
        return self.state.latest()

    def _record(self, active: int, B: int, N: int, packed: bool) -> None:
        stats = self.stats
        stats.forward_passes += 1
        stats.packed_passes += packed
        stats.active_counts.append(active)
        stats.locked_counts.append(B * N - active)
        stats.flops_dense += self.flops.step(B * N, N)
        stats.flops_locked += self.flops.step(active, N)
