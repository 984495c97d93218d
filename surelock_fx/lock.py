"""The SureLock lock rule (docs/DESIGN.md §7) and the per-decode lock state it updates.

The state is shared by the compiled runtime and the dense reference semantics, so both lock
exactly the same positions given the same logits.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.profiler import record_function

from .decoding import RowLogits, rows_per_chunk


@dataclasses.dataclass(frozen=True)
class LockConfig:
    """When to lock a position.

    kl_threshold: lock when KL(p_t || p_{t-1}) <= kl_threshold (temperature-1 softmax over the
        full vocabulary, of two consecutive forward passes in which the position was active).
    confidence_gate: a fraction m in (0, 1]; a candidate must also be among the m most confident
        candidates of its row (uncertainty 1 - max p at or below the m-quantile). None disables it.
    lock_prompt: whether prompt positions may lock. Default True: the prompt's predictions are
        never used by the sampler, only its keys and values, so locking it costs no accuracy in
        our sweep (BENCHMARKS.md) and saves the most compute.
    keep_locked_logits: for analysis, keep each position's logits from the pass in which it locked
        (``LockState.locked_logits`` [B, N, V], NaN where unlocked; one row copy per locked position).

    A position locks only if its token was already unmasked in the forward pass that produced
    p_t, so the keys and values cached for it reflect its committed token. (The paper's
    Algorithm 1 may lock a token whose cached K/V were computed while it was still a mask.)
    """

    kl_threshold: float = 5e-3
    confidence_gate: float | None = None
    lock_prompt: bool = True
    keep_locked_logits: bool = False

    def __post_init__(self):
        if not self.kl_threshold >= 0:
            raise ValueError(f"kl_threshold must be >= 0, got {self.kl_threshold}")
        if self.confidence_gate is not None and not 0 < self.confidence_gate <= 1:
            raise ValueError(f"confidence_gate must be a fraction in (0, 1], got {self.confidence_gate}")


class LockState:
    """Lock mask of one decode and the logits of its latest pass, compact (the active rows only): the
    KL rule's previous logits, and what a runner hands the sampler. Per-position tensors carry a
    scratch column N where padding rows of an active index land.

    A KL candidate is a row computed in the new pass and before: its previous logits are among the latest
    pass's rows, or, for a row a cache policy left out meanwhile, among the held ones (``hold``); no
    [B, N, V] buffer is kept. (The lock rule alone locks monotonically; a ``runtime.LockSchedule`` may set
    any mask.)
    """

    def __init__(self, config: LockConfig | None, first_input: torch.Tensor, mask_id: int,
                 kl: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None, keep_predictions: bool = False):
        B, N = first_input.shape
        device = first_input.device
        self.config = config
        self.kl = kl or kl_divergence
        self.seq = N
        self.locked = torch.zeros(B, N, dtype=torch.bool, device=device)
        self.prompt = self._with_scratch(first_input != mask_id)
        # The latest pass: its logits [R, V] (one row per computed index entry), the row of each position
        # [B, N + 1] (-1: not computed), and each row's log-sum-exp [R] in float32,
        # computed by the KL rule where the row was a candidate and NaN elsewhere, so that the row's
        # next KL needs one softmax, not two.
        self.logits: torch.Tensor | None = None
        self.row = torch.full((B, N + 1), -1, dtype=torch.long, device=device)
        self._lse: torch.Tensor | None = None
        # Held rows: the logits (and log-sum-exp) of candidates a pass left out although the lock rule could
        # not lock them (a cache policy skipped them), from the last pass that computed them, until a pass
        # computes them again (``hold``). Empty unless a pass skips such rows.
        self.held = self.held_lse = None
        self.held_row = torch.full_like(self.row, -1)
        # Frozen predictions (``keep_predictions``: a model whose row i predicts position i + 1, Dream): a
        # locked row's logits from the pass it locked in, while the position it predicts is masked, so
        # that the sampler still reads that position's prediction; [F, V] and the row of each position [B, N].
        self.keep_predictions = keep_predictions
        self.frozen: torch.Tensor | None = None
        self.frozen_row = torch.full((B, N), -1, dtype=torch.long, device=device)
        # Trace for analysis: the update (step) at which each position locked, its KL then, and (if
        # the config keeps them) its logits from that pass, the last it was computed in.
        self.lock_step = torch.full((B, N), -1, dtype=torch.long, device=device)
        self.lock_kl = torch.full((B, N), float("nan"), device=device)
        self.locked_logits: torch.Tensor | None = None
        self.updates = 0

    @staticmethod
    def _with_scratch(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, torch.zeros_like(rows[:, :1])], dim=1)

    def latest(self) -> RowLogits:
        """The latest pass's logits and the row of each position (-1 for locked positions), and the frozen
        predictions of locked rows whose next position is masked (``keep_predictions``)."""
        row = self.row[:, : self.seq]
        if self.frozen is None:
            return RowLogits(self.logits, row)
        frozen = (self.frozen_row >= 0) & (row < 0)
        return RowLogits(torch.cat([self.logits, self.frozen]),
                         torch.where(frozen, self.frozen_row + len(self.logits), row))

    def release(self, unmasked: torch.Tensor, incoming: int) -> None:
        """Before a pass that returns ``incoming`` rows of logits from an input with ``unmasked`` [B, N]
        positions decided: if the latest pass's rows and those would outnumber the B x N positions (the
        first pass's logits, which bound a decode's logits memory otherwise), keep only the rows a KL
        will read (none without a lock rule), copied out."""
        if self.logits is None or len(self.logits) + incoming <= self.locked.numel():
            return
        if self.config is None:
            keep = torch.zeros_like(self.locked)
        else:
            keep = self._eligible(unmasked)[:, : self.seq] & (self.row[:, : self.seq] >= 0)
        rows = self.row[:, : self.seq][keep]
        self.logits, self._lse = self.logits.index_select(0, rows), self._lse[rows]
        self.row = torch.full_like(self.row, -1)
        self.row[:, : self.seq][keep] = torch.arange(len(rows), device=rows.device)

    def skipped(self, rows: torch.Tensor | None, unmasked: torch.Tensor) -> torch.Tensor:
        """[B, N]: the positions a pass leaves out: the locked ones and, given a cache policy's ``rows`` [B, N],
        those outside them, whose candidates' latest logits are then held (``hold``)."""
        if rows is None:
            return self.locked
        skipped = self.locked | ~rows
        self.hold(~skipped, unmasked)
        return skipped

    def hold(self, computing: torch.Tensor, unmasked: torch.Tensor) -> None:
        """Before a pass that computes the positions ``computing`` [B, N] of an input with ``unmasked`` [B, N]
        positions decided: keep the latest logits of the candidates it leaves out (the lock rule's, not
        computed now), so that a row's KL always compares its two latest computations."""
        if self.config is None or self.logits is None:
            return
        dropped = self._eligible(unmasked) & (self.row >= 0) & ~self._with_scratch(computing)
        if not dropped.any():
            return
        kept = (self.held_row >= 0) & ~dropped
        old, new = self.held_row[kept], self.row[dropped]
        if self.held is None:
            self.held, self.held_lse = self.logits.index_select(0, new), self._lse[new]
        else:
            self.held = torch.cat([self.held.index_select(0, old), self.logits.index_select(0, new)])
            self.held_lse = torch.cat([self.held_lse[old], self._lse[new]])
        self.held_row = torch.full_like(self.held_row, -1)
        self.held_row[kept] = torch.arange(len(old), device=old.device)
        self.held_row[dropped] = len(old) + torch.arange(len(new), device=new.device)

    def update(self, index: torch.Tensor, logits: torch.Tensor, unmasked: torch.Tensor,
               rows_of_index: torch.Tensor | None = None) -> None:
        """Lock the sure rows among ``index`` [B, M] given their logits from a pass whose input had
        ``unmasked`` [B, N] positions already decided; then keep the logits as the latest. The logits
        are [B, M, V] (or [B * M, V]), or with ``rows_of_index`` [B, M] any [R, V] holding entry (b, j)'s
        at row ``rows_of_index[b, j]`` (a packed graph's, ``pack_index``; padding entries' are not read).

        The full-vocabulary KL is computed only for candidates (active rows already unmasked, computed
        before): their new logits against those of the last pass that computed them (the latest, or held:
        ``hold``), at temperature 1, in float32.
        """
        B, M = index.shape
        logits = logits.reshape(-1, logits.shape[-1])
        if rows_of_index is None:
            rows_of_index = torch.arange(B * M, device=index.device).view(B, M)
        if self.logits is not None and logits.data_ptr() == self.logits.data_ptr():
            raise ValueError("the locked graph returned the logits tensor of its previous call, which the lock "
                             "rule still reads; a backend must return a fresh logits tensor per call")
        lse = torch.full((len(logits),), float("nan"), device=logits.device)
        if self.config is not None:
            candidate = self._candidates(unmasked).gather(1, index)
            sure = torch.zeros_like(candidate)
            b, j = candidate.nonzero(as_tuple=True)
            if b.numel():
                rows = rows_of_index[b, j]
                with record_function("surelock::kl"):
                    kl, lse[rows] = self._kl(logits, rows, index[b, j], b)
                sure[b, j] = self._sure(logits, rows, kl, lse[rows], b, j, index.shape)
                locking = sure[b, j]
                self._trace(b[locking], index[b, j][locking], kl[locking], logits, rows[locking])
                if self.keep_predictions:
                    self._freeze(b[locking], index[b, j][locking], logits, rows[locking], unmasked)
            locked = self._with_scratch(self.locked)
            locked.scatter_(1, index, locked.gather(1, index) | sure)
            self.locked = locked[:, : self.seq]
        self.held_row.scatter_(1, index, -1)  # computed now: the latest logits supersede the held ones
        self.row = torch.full_like(self.row, -1).scatter_(1, index, rows_of_index)
        self.logits, self._lse = logits, lse
        self.updates += 1

    def schedule(self, locked: torch.Tensor, unmasked: torch.Tensor) -> None:
        """Take a ``runtime.LockSchedule``'s lock mask; with ``keep_predictions``, the rows it newly skips keep
        their latest logits while their next position is masked, as rows locked by the rule do."""
        if self.keep_predictions and self.logits is not None:
            new = locked & ~self.locked & (self.row[:, : self.seq] >= 0)
            b, j = new.nonzero(as_tuple=True)
            self._freeze(b, j, self.logits, self.row[b, j], unmasked)
        self.locked = locked

    def _freeze(self, batch_rows, positions, logits: torch.Tensor, rows, unmasked: torch.Tensor) -> None:
        """Keep the logits ``rows`` of the positions locking now whose next position is masked; drop the
        frozen ones whose next position is decided (no step reads them again)."""
        next_masked = torch.cat([~unmasked[:, 1:], torch.zeros_like(unmasked[:, :1])], dim=1)
        new = next_masked[batch_rows, positions]
        batch_rows, positions, rows = batch_rows[new], positions[new], rows[new]
        kept = (self.frozen_row >= 0) & next_masked
        old = self.frozen_row[kept]
        frozen = torch.cat(([] if self.frozen is None else [self.frozen.index_select(0, old)])
                           + [logits.index_select(0, rows)])
        self.frozen = frozen if len(frozen) else None
        self.frozen_row = torch.full_like(self.frozen_row, -1)
        self.frozen_row[kept] = torch.arange(len(old), device=old.device)
        self.frozen_row[batch_rows, positions] = len(old) + torch.arange(len(rows), device=rows.device)

    def _eligible(self, unmasked: torch.Tensor) -> torch.Tensor:
        """[B, N + 1]: the positions the lock rule may lock in a pass with ``unmasked`` [B, N] decided:
        unlocked, decided, and not in the prompt unless the prompt may lock."""
        eligible = self._with_scratch(unmasked & ~self.locked)
        return eligible if self.config.lock_prompt else eligible & ~self.prompt

    def _candidates(self, unmasked: torch.Tensor) -> torch.Tensor:
        """[B, N + 1]: the eligible positions whose KL a pass computes (if it computes them): computed before."""
        return self._eligible(unmasked) & ((self.row >= 0) | (self.held_row >= 0))

    def _trace(self, batch_rows, positions, kl, logits, rows) -> None:
        """Record the positions locking now: their step, their KL, and (if kept) their ``rows`` of ``logits``."""
        self.lock_step[batch_rows, positions] = self.updates
        self.lock_kl[batch_rows, positions] = kl
        if self.config.keep_locked_logits:
            if self.locked_logits is None:
                self.locked_logits = logits.new_full((*self.locked.shape, logits.shape[-1]), float("nan"))
            self.locked_logits[batch_rows, positions] = logits[rows]

    def _kl(self, logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, b: torch.Tensor):
        """(KL, log-sum-exp of the new logits) [C] of candidate rows ``rows`` of ``logits`` [R, V] (positions
        ``positions`` of batch rows ``b``) against their previous logits, the latest pass's or the held ones."""
        latest = self.row[b, positions]
        if self.held is None:  # without a cache policy: every previous row is the latest pass's
            return _kl_chunked(self.kl, logits, rows, self.logits, self._lse, latest)
        kl, lse = torch.empty(len(rows), device=logits.device), torch.empty(len(rows), device=logits.device)
        from_latest = latest >= 0
        for part, store, store_lse, prev in ((from_latest, self.logits, self._lse, latest),
                                             (~from_latest, self.held, self.held_lse, self.held_row[b, positions])):
            kl[part], lse[part] = _kl_chunked(self.kl, logits, rows[part], store, store_lse, prev[part])
        return kl, lse

    def _sure(self, logits: torch.Tensor, rows: torch.Tensor, kl: torch.Tensor, lse: torch.Tensor, b, j, shape):
        """The lock decision of candidate rows ``rows`` of ``logits`` [R, V] (index entries (b, j) of an index
        of ``shape``) given their ``kl`` and log-sum-exp ``lse``."""
        sure = kl <= self.config.kl_threshold
        if self.config.confidence_gate is not None:
            uncertainty = 1 - (logits.amax(-1)[rows].float() - lse).exp()
            sure &= _most_confident(uncertainty, b, j, shape, self.config.confidence_gate)
        return sure


def _kl_chunked(kl_fn, logits, rows, prev_logits, prev_lse, prev):
    """``kl_fn`` of rows ``rows`` of ``logits`` against rows ``prev`` of ``prev_logits`` (log-sum-exps
    ``prev_lse``, NaN where unknown), a few rows at a time; rows whose previous log-sum-exp is unknown
    first, so that few chunks compute it."""
    order = torch.argsort(~prev_lse[prev].isnan(), stable=True)
    rows, prev = rows[order], prev[order]
    chunk = rows_per_chunk(logits)
    parts = [kl_fn(logits, new, prev_logits, old, _known_lse(prev_logits, old, old_lse)) for new, old, old_lse
             in zip(rows.split(chunk), prev.split(chunk), prev_lse[prev].split(chunk), strict=True)]
    kl, lse = map(torch.cat, zip(*parts)) if parts else (prev_lse[:0], prev_lse[:0])
    return kl.new_empty(len(kl)).scatter_(0, order, kl), lse.new_empty(len(lse)).scatter_(0, order, lse)


def _known_lse(logits: torch.Tensor, rows: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``lse`` [C] of ``rows`` [C] of ``logits`` [R, V], with its unknown (NaN) entries computed."""
    missing = lse.isnan()
    if not missing.any():
        return lse
    return lse.index_put((missing,), log_sum_exp(logits.index_select(0, rows[missing])))


def _softmax_and_lse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax, log-sum-exp) per row of float32 [C, V] logits; the log-sum-exp from the softmax's
    largest probability, 1 / sum exp(l - max l). On CPU, softmax's kernels have their own vectorized
    exp, several times faster than ``aten::exp`` (MKL's, on AMD CPUs), which ``torch.logsumexp`` calls."""
    p = torch.softmax(x, dim=-1)
    return p, x.amax(-1) - p.amax(-1).log()


def log_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    """log sum exp per row of [C, V] logits, in float32 (``_softmax_and_lse``)."""
    return _softmax_and_lse(logits.float())[1]


def kl_divergence(logits: torch.Tensor, rows: torch.Tensor, prev_logits: torch.Tensor, prev_rows: torch.Tensor,
                  prev_lse: torch.Tensor):
    """(KL(p || p_prev), log-sum-exp of the new row) for rows ``rows`` [C] of ``logits`` [R, V] against rows
    ``prev_rows`` [C] of ``prev_logits``, at temperature 1, in float32, given the previous rows'
    log-sum-exp ``prev_lse`` [C] (``log_sum_exp``).

    KL = sum p * ((l - l_prev) - (lse - lse_prev)): one softmax over the vocabulary per row (see
    ``_softmax_and_lse``), its log-sum-exp reused by the row's next KL; differences taken in place.
    The rows are gathered here, so that a compiled KL reads them where they are, without copies.
    """
    new, prev = logits.index_select(0, rows).float(), prev_logits.index_select(0, prev_rows).float()
    p, lse = _softmax_and_lse(new)
    kl = (new - prev).sub_((lse - prev_lse).unsqueeze(-1)).mul_(p).sum(-1)
    return kl, lse


def _most_confident(uncertainty: torch.Tensor, b: torch.Tensor, j: torch.Tensor, shape,
                    fraction: float) -> torch.Tensor:
    """For candidate rows (b, j) of a [B, M] index with ``uncertainty`` 1 - max p [C]: whether each
    one's is within the ``fraction``-quantile of its batch row's candidates."""
    masked = torch.full(shape, float("nan"), dtype=uncertainty.dtype, device=uncertainty.device)
    masked[b, j] = uncertainty
    cutoff = torch.nanquantile(masked, fraction, dim=1)
    return uncertainty <= cutoff[b]
