"""The SureLock lock policy (DESIGN §1) and the per-decode lock state it updates.

The state is shared by the compiled runtime and the dense reference semantics, so both lock
exactly the same positions given the same logits.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.profiler import record_function

from .sampler import row_chunks, rows_per_chunk


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

    A position locks only if its token was already unmasked in the forward pass that produced
    p_t, so the keys and values cached for it reflect its committed token. (The paper's
    Algorithm 1 may lock a token whose cached K/V were computed while it was still a mask.)
    """

    kl_threshold: float = 5e-3
    confidence_gate: float | None = None
    lock_prompt: bool = True

    def __post_init__(self):
        if not self.kl_threshold >= 0:
            raise ValueError(f"kl_threshold must be >= 0, got {self.kl_threshold}")
        if self.confidence_gate is not None and not 0 < self.confidence_gate <= 1:
            raise ValueError(f"confidence_gate must be a fraction in (0, 1], got {self.confidence_gate}")


def active_index(locked: torch.Tensor, bucket: int = 1, full_from: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, M] positions of unlocked rows in order, padded with N; [B] active counts).

    M is the largest active count rounded up to a multiple of ``bucket`` (at most N); if that is at
    least ``full_from * N``, M is N (the crossover to a full-width step: same rows computed, padding
    to the scratch slot, one graph shape for all nearly dense steps).
    """
    B, N = locked.shape
    counts = (~locked).sum(dim=1)
    M = min(N, -(-max(int(counts.max()), 1) // bucket) * bucket)
    if M >= full_from * N:
        M = N
    order = torch.sort(locked.to(torch.uint8), dim=1, stable=True).indices[:, :M]
    padding = torch.arange(M, device=locked.device)[None, :] >= counts[:, None]
    return order.masked_fill(padding, N), counts


class LockState:
    """Lock mask and latest logits of one decode; per-row tensors carry a scratch column N where
    padding rows of an active index land."""

    def __init__(self, config: LockConfig | None, first_input: torch.Tensor, mask_id: int,
                 kl: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None):
        B, N = first_input.shape
        self.config = config
        self.kl = kl or kl_divergence
        self.seq = N
        self.locked = torch.zeros(B, N, dtype=torch.bool, device=first_input.device)
        self.prompt = self._with_scratch(first_input != mask_id)
        self.has_prev = torch.zeros(B, N + 1, dtype=torch.bool, device=first_input.device)
        # [B * N + 1, V]: raw logits of each row's latest active pass (p_{t-1} of the KL rule, and
        # what a runner hands the sampler): row b * N + i is position i of batch row b, the last row
        # is the scratch row, so that ``last_logits`` is a contiguous [B, N, V] view (the sampler's
        # full-vocabulary softmax runs a quarter slower on a strided one). Allocated on the first update.
        self._logits: torch.Tensor | None = None
        # [B * N + 1] float32: log-sum-exp of each buffer row, computed by the KL rule when the row was
        # a candidate, NaN until then; the next KL of that row then needs one softmax, not two.
        self._lse: torch.Tensor | None = None
        # Trace for analysis: the update (step) at which each position locked and its KL then.
        self.lock_step = torch.full((B, N), -1, dtype=torch.long, device=first_input.device)
        self.lock_kl = torch.full((B, N), float("nan"), device=first_input.device)
        self.updates = 0

    @staticmethod
    def _with_scratch(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, torch.zeros_like(rows[:, :1])], dim=1)

    @property
    def last_logits(self) -> torch.Tensor | None:
        """[B, N, V] (contiguous): the logits of each position's latest active pass."""
        if self._logits is None:
            return None
        return self._logits[: self.locked.numel()].view(*self.locked.shape, -1)

    def _rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows of the logits buffer for positions ``index`` [B, M] (padding index N: the scratch row)."""
        B, N = self.locked.shape
        base = torch.arange(B, device=index.device)[:, None] * N
        return torch.where(index < N, base + index, B * N)

    def store(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        """Write the logits [B, M, V] of rows ``index`` [B, M] into the buffer (row copies)."""
        V = logits.shape[-1]
        if self._logits is None:
            self._logits = logits.new_zeros(self.locked.numel() + 1, V)
            self._lse = torch.full((self.locked.numel() + 1,), float("nan"), device=logits.device)
        with record_function("surelock::store_logits"):
            rows = self._rows(index).flatten()
            self._logits.index_copy_(0, rows, logits.reshape(-1, V))
            self._lse[rows] = float("nan")

    def update(self, index: torch.Tensor, logits: torch.Tensor, unmasked: torch.Tensor) -> None:
        """Lock the sure rows among ``index`` [B, M] given their logits [B, M, V] from a pass whose
        input had ``unmasked`` [B, N] positions already decided; then store the logits.

        The full-vocabulary KL is computed only for candidates (active rows already unmasked, with
        a previous pass): their new against their stored logits at temperature 1, in float32.
        """
        known_lse = None
        if self.config is not None:
            unmasked = self._with_scratch(unmasked)
            candidate = unmasked.gather(1, index) & self.has_prev.gather(1, index)
            if not self.config.lock_prompt:
                candidate &= ~self.prompt.gather(1, index)
            sure = torch.zeros_like(candidate)
            b, j = candidate.nonzero(as_tuple=True)
            if b.numel():
                rows = self._rows(index)[b, j]
                # rows whose stored log-sum-exp is unknown first, so that few chunks compute it
                order = torch.argsort(~self._lse[rows].isnan(), stable=True)
                b, j, rows = b[order], j[order], rows[order]
                with record_function("surelock::kl"):
                    sure[b, j], kl, lse = self._sure(logits, index, b, j, rows)
                known_lse = rows, lse
                locking = sure[b, j]
                batch_rows, positions = b[locking], index[b, j][locking]
                self.lock_step[batch_rows, positions] = self.updates
                self.lock_kl[batch_rows, positions] = kl[locking]
            self.has_prev.scatter_(1, index, True)
            locked = self._with_scratch(self.locked)
            locked.scatter_(1, index, locked.gather(1, index) | sure)
            self.locked = locked[:, : self.seq]
        self.store(index, logits)
        if known_lse is not None:  # the candidates' next KL reuses their log-sum-exp
            self._lse[known_lse[0]] = known_lse[1]
        self.updates += 1

    def _sure(self, logits: torch.Tensor, index: torch.Tensor, b, j, prev_rows: torch.Tensor):
        """(lock decision, KL, log-sum-exp of the new logits) for candidate rows (b, j) of ``logits``
        [B, M, V] (positions ``index`` [B, M]) against their buffer rows ``prev_rows``, read a few at a time."""
        prev_lse = self._lse[prev_rows]
        # The buffer holds rows of the same width and dtype as ``logits``: both split into the same chunks.
        new_chunks = row_chunks(logits.reshape(-1, logits.shape[-1]), b * index.shape[1] + j)
        prev_chunks = row_chunks(self._logits, prev_rows)
        lse_chunks = prev_lse.split(rows_per_chunk(self._logits))
        kl, lse = map(torch.cat, zip(*(self.kl(new, prev, _known_lse(prev, lse)) for (_, new), (_, prev), lse
                                       in zip(new_chunks, prev_chunks, lse_chunks, strict=True))))
        sure = kl <= self.config.kl_threshold
        if self.config.confidence_gate is not None:
            uncertainty = 1 - (logits.amax(-1)[b, j].float() - lse).exp()
            sure &= _most_confident(uncertainty, b, j, index.shape, self.config.confidence_gate)
        return sure, kl, lse


def _known_lse(rows: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``lse`` [C] of ``rows`` [C, V], with unknown (NaN) entries computed."""
    missing = lse.isnan()
    return torch.where(missing, log_sum_exp(rows), lse) if missing.any() else lse


def _softmax_and_lse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax, log-sum-exp) per row of float32 [C, V] logits; the log-sum-exp from the softmax's
    largest probability, 1 / sum exp(l - max l). On CPU, softmax's kernels have their own vectorized
    exp, several times faster than ``aten::exp`` (MKL's, on AMD CPUs), which ``torch.logsumexp`` calls."""
    p = torch.softmax(x, dim=-1)
    return p, x.amax(-1) - p.amax(-1).log()


def log_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    """log sum exp per row of [C, V] logits, in float32 (``_softmax_and_lse``)."""
    return _softmax_and_lse(logits.float())[1]


def kl_divergence(logits: torch.Tensor, prev_logits: torch.Tensor, prev_lse: torch.Tensor):
    """(KL(p || p_prev), log-sum-exp of ``logits``) per row of [C, V] logits at temperature 1, in
    float32, given the previous rows' log-sum-exp ``prev_lse`` [C] (``log_sum_exp``).

    KL = sum p * ((l - l_prev) - (lse - lse_prev)): one softmax over the vocabulary per row (see
    ``_softmax_and_lse``), its log-sum-exp reused by the row's next KL; differences taken in place.
    """
    new, prev = logits.float(), prev_logits.float()
    p, lse = _softmax_and_lse(new)
    kl = (new - prev).sub_((lse - prev_lse).unsqueeze(-1)).mul_(p).sum(-1)
    return kl, lse


def _most_confident(uncertainty: torch.Tensor, b: torch.Tensor, j: torch.Tensor, shape, fraction: float) -> torch.Tensor:
    """For candidate rows (b, j) of a [B, M] index with ``uncertainty`` 1 - max p [C]: whether each
    one's is within the ``fraction``-quantile of its batch row's candidates."""
    masked = torch.full(shape, float("nan"), dtype=uncertainty.dtype, device=uncertainty.device)
    masked[b, j] = uncertainty
    cutoff = torch.nanquantile(masked, fraction, dim=1)
    return uncertainty <= cutoff[b]
