"""The decode runtime: feeds a locked graph its active rows and caches every step (docs/DESIGN.md §6).

A runner is the forward function the sampler calls, ``(x [B, N], attention_mask) -> RowLogits``:
only the active rows are computed, the lock state is updated from their logits, and those logits are
returned as they came out of the graph, with the row of each position (-1 for locked positions: the
sampler never reads them, since a locked position is already unmasked; for a model whose row i predicts
position i + 1, a locked row's logits are kept while that position is masked: ``LockState.latest``).

Per step the runner's own work (profiled under the ``surelock::*`` record_function labels) is:
planning the pass (``plan_pass``: the active index, and which form of the graph runs it), releasing the
previous pass's logits that no KL will read when the new ones would otherwise be held alongside them
all (``LockState.release``), running the graph, and the KL lock rule on the candidate rows.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import torch
from torch.profiler import record_function

from .decoding import DecodeStats, RowLogits, position_ids, predicts_next, special_ids
from .lock import LockConfig, LockState, kl_divergence
from .signature import CacheSpec, FlopModel, pack_index, padded_index

LockedGraph = Callable[..., tuple]

# A step whose bucketed active count M reaches this fraction of N runs with M = N (``active_index``'s
# ``full_from``): exact (the extra rows are padding aimed at the scratch slot), at most (1 - FULL_FROM) /
# FULL_FROM more FLOPs, and every nearly dense step shares one graph shape. benchmarks/step_latency.py
# measures where the locked graph stops being faster than the dense one (docs/DESIGN.md §6).
FULL_FROM = 0.98

# Where a backend has both forms, a step runs the packed one when padding is at least this share of the
# active index's B x M entries (``runs_packed``): packing has a small fixed cost that padding must repay
# (docs/DESIGN.md §6).
PACK_FROM = 0.03


@dataclasses.dataclass(frozen=True)
class LockedForms:
    """The callables that run a locked graph: ``padded`` computes the active index's B x M entries,
    ``packed`` (``passes.pack_rows``) takes ``signature.pack_index``'s inputs after ``key_mask`` and computes
    and returns the real rows only. A backend builds one or both."""

    padded: LockedGraph | None
    packed: LockedGraph | None

    def __post_init__(self):
        if self.padded is None and self.packed is None:
            raise ValueError("a locked graph needs a graph to run: a padded form, a packed form, or both")


def runs_packed(padded: bool, packed: bool, entries: int, real: int, pack_from: float = PACK_FROM) -> bool:
    """Whether a step whose active index has ``entries`` entries, ``real`` of them active rows, runs the
    packed form, given the forms there are: the packed one if it is the only one, or if the padding
    reaches ``pack_from``."""
    return packed and (not padded or entries - real >= pack_from * entries)


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """What one pass over ``seq`` positions computes: the active index [B, M], the active count of each
    batch row, their sum (the real rows), and whether the packed form runs it."""

    index: torch.Tensor
    counts: torch.Tensor
    real: int
    packed: bool
    seq: int

    def flops(self, model: FlopModel) -> int:
        """FLOPs the pass computes, padding included: the projections, FFN and LM head run the real rows if
        packed, else every entry of the index; attention runs every entry's query over all keys."""
        entries = self.index.numel()
        return model.step(self.real if self.packed else entries, self.seq, queries=entries)


def plan_pass(locked: torch.Tensor, bucket: int = 1, full_from: float = FULL_FROM, *, padded: bool = True,
              packed: bool = False, pack_from: float = PACK_FROM) -> PassPlan:
    """The pass a runner with the given forms runs for the lock mask ``locked`` [B, N]: the bucketed active
    index (``signature.active_index``) and whether the packed form runs it (``runs_packed``). The active
    counts are read to the host once: the pass's only device sync before the graph runs."""
    counts = (~locked).sum(dim=1)
    host = counts.tolist()
    index = padded_index(locked, counts, max(host), bucket, full_from)
    real = sum(host)
    return PassPlan(index, counts, real, runs_packed(padded, packed, index.numel(), real, pack_from),
                    locked.shape[1])


class LockSchedule(Protocol):
    """A rule that decides which rows a pass skips, in place of the lock rule's own mask: called before
    every pass ``step`` (0, 1, ...) with the pass's input ``x`` [B, N], it returns the lock mask [B, N]
    for that pass. Its mask is applied from pass 1 on: pass 0 computes every row, filling the caches."""

    def __call__(self, step: int, x: torch.Tensor) -> torch.Tensor: ...


class LockedRunner:
    """Runs a locked graph's ``forms`` for one decode, holding its caches and lock state. Given both forms,
    a step runs the packed one when its padding makes it pay (``runs_packed`` at ``pack_from``). With a
    ``schedule`` (``LockSchedule``), the schedule decides which rows each pass skips; the lock rule still
    runs its KL on the candidate rows, and its trace records what it would lock."""

    def __init__(self, forms: LockedForms, specs: list[CacheSpec], config, flops: FlopModel,
                 lock: LockConfig | None, stats: DecodeStats, bucket: int = 1, full_from: float = FULL_FROM,
                 kl=kl_divergence, pack_from: float = PACK_FROM, schedule: LockSchedule | None = None):
        self.forms, self.specs, self.flops, self.kl = forms, specs, flops, kl
        self.lock, self.stats, self.bucket, self.full_from, self.pack_from = lock, stats, bucket, full_from, pack_from
        self.schedule, self.config = schedule, config
        self.mask_id = special_ids(config)[0]
        self.state: LockState | None = None

    def _start(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        B, N = x.shape
        self.state = self.stats.lock_state = LockState(self.lock, x, self.mask_id, self.kl,
                                                       keep_predictions=predicts_next(self.config))
        self.caches = [torch.zeros(B, s.heads, N + 1, s.head_dim, dtype=s.dtype, device=x.device) for s in self.specs]
        self.positions = position_ids(self.config, attention_mask, x.shape, x.device)
        self.stats.flops_dense = self.stats.flops_locked = self.stats.flops_computed = 0

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor | None,
                 rows: torch.Tensor | None = None) -> RowLogits:
        """One pass over ``x`` [B, N]: the unlocked positions, of ``rows`` [B, N] only if given (a cache
        policy's choice, ``sampler.generate``'s ``cache``)."""
        B, N = x.shape
        if self.state is None:
            self._start(x, attention_mask)
        elif self.state.locked.shape != (B, N):
            raise ValueError(f"a runner decodes one batch shape; got {tuple(x.shape)} after "
                             f"{tuple(self.state.locked.shape)}")
        if self.schedule is not None:
            scheduled = self.schedule(self.stats.forward_passes, x)
            if self.stats.forward_passes:
                self.state.schedule(scheduled, x != self.mask_id)
        key_mask = (torch.ones(B, N, dtype=torch.bool, device=x.device) if attention_mask is None
                    else attention_mask.bool())
        unmasked = x != self.mask_id
        skipped = self.state.skipped(rows, unmasked)
        with record_function("surelock::index"):
            plan = plan_pass(skipped, self.bucket, self.full_from, padded=self.forms.padded is not None,
                             packed=self.forms.packed is not None, pack_from=self.pack_from)
            packing = pack_index(plan.index, N, plan.real) if plan.packed else ()
        with record_function("surelock::release"):
            self.state.release(unmasked, max(plan.real, 1) if packing else plan.index.numel())
        with record_function("surelock::graph"):
            graph = self.forms.packed if plan.packed else self.forms.padded
            logits, *self.caches = graph(x, self.positions, plan.index, key_mask, *packing, *self.caches)
        self._record(plan)
        with record_function("surelock::lock_update"):
            self.state.update(plan.index, logits, unmasked, packing[1] if packing else None)
        return self.state.latest()

    def _record(self, plan: PassPlan) -> None:
        stats = self.stats
        B, N = self.state.locked.shape
        stats.forward_passes += 1
        stats.packed_passes += plan.packed
        stats.active_counts.append(plan.real)
        stats.locked_counts.append(B * N - plan.real)
        stats.flops_dense += self.flops.step(B * N, N)
        stats.flops_locked += self.flops.step(plan.real, N)
        stats.flops_computed += plan.flops(self.flops)
