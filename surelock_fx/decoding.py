"""What a decode is, for the sampler, the runtime and the reference semantics alike: the forward function it
calls, the logits of the rows a pass computed, what it did (``DecodeStats``), and the model's special ids."""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, runtime_checkable

import torch

from .capture import full_attention_mask, honoured_full_mask_dtype

Forward = Callable[..., "torch.Tensor | RowLogits"]  # (x, attention_mask[, rows]) -> logits


@dataclasses.dataclass
class DecodeStats:
    """What one decode did; the locking fields are filled by a locked runner, else left empty."""

    steps: int = 0
    forward_passes: int = 0
    packed_passes: int = 0  # passes that ran a locked graph's packed form (passes.pack_rows)
    wall_time_s: float = 0.0
    active_counts: list[int] = dataclasses.field(default_factory=list)
    locked_counts: list[int] = dataclasses.field(default_factory=list)
    flops_dense: float | None = None
    flops_locked: float | None = None
    flops_computed: float | None = None  # what the locked graph computed, padding included
    unmask_step: torch.Tensor | None = None  # [B, N]: step that committed each position, -1 for the prompt
    lock_state: object | None = None  # a locked runner's LockState (lock_step, lock_kl, locked_logits)
    # [B, N] float: the sampler's probability of each token it committed, at the step it committed it
    # (remasking "low_confidence"; NaN where not committed by the sampler, everywhere under "random")
    commit_confidence: torch.Tensor | None = None

    @property
    def flops_ratio(self) -> float | None:
        if not self.flops_dense:
            return None
        return self.flops_locked / self.flops_dense

    @property
    def mean_active_fraction(self) -> float | None:
        totals = [active + locked for active, locked in zip(self.active_counts, self.locked_counts)]
        if not totals:
            return None
        return sum(a / t for a, t in zip(self.active_counts, totals)) / len(totals)


@dataclasses.dataclass(frozen=True)
class RowLogits:
    """Logits of some positions of a [B, N] batch: ``rows`` [R, V] and ``row`` [B, N], the row of
    each position (-1 where none was computed)."""

    rows: torch.Tensor
    row: torch.Tensor

    @classmethod
    def of(cls, logits: "torch.Tensor | RowLogits") -> "RowLogits":
        """``logits`` as RowLogits; a dense [B, N, V] tensor is viewed, not copied."""
        if isinstance(logits, RowLogits):
            return logits
        B, N, V = logits.shape
        return cls(logits.reshape(B * N, V), torch.arange(B * N, device=logits.device).view(B, N))

    def rows_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The rows of ``positions`` [B, N] (bool); a clear error if one was not computed."""
        rows = self.row[positions]
        if (rows < 0).any():
            raise ValueError("the forward returned no logits for a position the sampler reads (a masked one); "
                             "a locked runner returns every unlocked row and every locked row a masked position "
                             "reads, and masked positions never lock")
        return rows

    def shifted(self) -> "RowLogits":
        """The logits by the position they predict, for a model whose row i predicts position i + 1 (Dream):
        position i reads row i - 1, position 0 its own row. A view: no logits are copied."""
        return RowLogits(self.rows, torch.cat([self.row[:, :1], self.row[:, :-1]], dim=1))

    def to_dense(self) -> torch.Tensor:
        """[B, N, V] logits, NaN where no row was computed."""
        dense = self.rows.new_full((*self.row.shape, self.rows.shape[-1]), float("nan"))
        known = self.row >= 0
        dense[known] = self.rows[self.row[known]]
        return dense


@runtime_checkable
class Decodable(Protocol):
    """What ``generate`` decodes through a runner: a model ``config`` and ``decode_runner(lock, stats,
    schedule)``, the forward function of one decode (``schedule``: a ``runtime.LockSchedule`` or None), called
    as ``(x, attention_mask, rows=None)`` (``rows``: the positions a cache policy computes)."""

    config: object

    def decode_runner(self, lock, stats: "DecodeStats", schedule=None) -> Forward: ...


def special_ids(config) -> tuple[int, int, int | None]:
    """(mask, eos, eot) token ids from a model config; a clear error if there is no mask id."""
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None:
        raise ValueError(
            "the model's config has no mask_token_id; set config.mask_token_id to the id of the mask token"
        )
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return mask_id, eos, getattr(config, "eot_token_id", None)


def predicts_next(config) -> bool:
    """Whether the model's row i predicts position i + 1 (``config.shifted_logits``: Dream), not position i."""
    return bool(getattr(config, "shifted_logits", False))


def position_ids(config, attention_mask: torch.Tensor | None, shape, device) -> torch.Tensor:
    """[B, N] positions of a decode: 0..N-1, or for a model whose positions skip left padding
    (``config.positions_skip_padding``: Dream) and a key mask with padding, the count of real tokens
    before each one (padding positions 1, as Dream's sampler sets them)."""
    batch, seq = shape
    if attention_mask is None or not getattr(config, "positions_skip_padding", False):
        return torch.arange(seq, device=device).expand(batch, seq)
    mask = attention_mask.long()
    return (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)


def model_forward(model: torch.nn.Module) -> Forward:
    """A plain model's forward as ``(x, attention_mask) -> logits``; accepts transformers outputs. A transformers
    model declared bidirectional (``config.is_causal = False``) gets its key mask as a 4D bidirectional one,
    which transformers 4.x needs (it ignores the flag) and 5.x uses as it is (``capture.full_attention_mask``).
    A model whose positions skip left padding gets them as ``position_ids`` (``position_ids``)."""
    dtype = honoured_full_mask_dtype(model)
    config = getattr(model, "config", None)

    def forward(x, attention_mask):
        extra = {}
        if getattr(config, "positions_skip_padding", False):
            extra["position_ids"] = position_ids(config, attention_mask, x.shape, x.device)
        if dtype is not None:
            attention_mask = full_attention_mask(attention_mask, x.shape, dtype, x.device)
        out = model(x, attention_mask=attention_mask, **extra)
        return getattr(out, "logits", out)

    return forward


# How much of a [rows, V] logits tensor is copied at a time (``rows_per_chunk``): little enough to
# stay in cache and be served from the allocator's free memory. A copy of all masked or candidate
# rows at once (hundreds of MB at a large batch) is freshly mapped, page by page, every step.
CHUNK_BYTES = 4 << 20


def rows_per_chunk(rows_of: torch.Tensor) -> int:
    """How many rows of ``rows_of`` [rows, V] make CHUNK_BYTES (at least one)."""
    return max(1, CHUNK_BYTES // (rows_of.shape[1] * rows_of.element_size()))


def row_chunks(rows_of: torch.Tensor, rows: torch.Tensor):
    """Copies of ``rows`` of ``rows_of`` [R, V], ``rows_per_chunk`` rows at a time."""
    for part in rows.split(rows_per_chunk(rows_of)):
        yield rows_of.index_select(0, part)
