"""Dense reference semantics of locking, independent of the graph rewrite.

Every step computes all N rows with the unmodified model, but in every attention call the keys
and values of locked rows are replaced by the values cached when they locked (their last active
pass). Attention calls are intercepted with a TorchFunctionMode, so this works for any model that
calls ``torch.nn.functional.scaled_dot_product_attention``. It is slow on purpose: it exists to
test the fast path against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .decoding import DecodeStats, RowLogits, model_forward, predicts_next, special_ids
from .lock import LockConfig, LockState
from .signature import active_index


class ReplaceLockedKV(TorchFunctionMode):
    """Within one forward pass: attention call l uses cache l's K/V at the ``skipped`` rows (locked, or left
    out by a cache policy), then stores its K/V."""

    def __init__(self, caches: list, skipped: torch.Tensor):
        super().__init__()
        self.caches, self.skipped, self.layer = caches, skipped, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        if self.layer == len(self.caches):
            self.caches.append((k, v))
        cached_k, cached_v = self.caches[self.layer]
        rows = self.skipped[:, None, :, None]
        k, v = torch.where(rows, cached_k, k), torch.where(rows, cached_v, v)
        self.caches[self.layer] = (k, v)
        self.layer += 1
        return func(q, k, v, *args[3:], **kwargs)


class ReferenceRunner:
    """A forward function for ``generate`` that applies locking, and the rows of a cache policy, by the dense
    reference semantics: every row is computed, but a skipped row's keys and values are those of the last
    pass that computed it, and its logits are not returned."""

    def __init__(self, model: torch.nn.Module, lock: LockConfig | None, stats: DecodeStats):
        self.forward = model_forward(model)
        self.lock, self.stats = lock, stats
        self.mask_id = special_ids(model.config)[0]
        self.keep_predictions = predicts_next(model.config)
        self.state: LockState | None = None
        self.caches: list = []

    def __call__(self, x: torch.Tensor, attention_mask, rows: torch.Tensor | None = None) -> RowLogits:
        if self.state is None:
            self.state = self.stats.lock_state = LockState(self.lock, x, self.mask_id,
                                                           keep_predictions=self.keep_predictions)
        unmasked = x != self.mask_id
        skipped = self.state.skipped(rows, unmasked)
        with ReplaceLockedKV(self.caches, skipped):
            logits = self.forward(x, attention_mask)
        self.stats.forward_passes += 1
        self.stats.active_counts.append(int((~skipped).sum()))
        self.stats.locked_counts.append(int(skipped.sum()))
        index, _ = active_index(skipped)
        padded = torch.cat([logits, logits[:, :1]], dim=1)
        active = padded.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        self.state.update(index, active, unmasked)
        return self.state.latest()


class ReferenceModel:
    """A ``decoding.Decodable`` that decodes ``model`` with locking (and cache policies) by the dense
    reference semantics: ``generate(ReferenceModel(model), ...)``."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.config = model, model.config

    def decode_runner(self, lock: LockConfig | None, stats: DecodeStats, schedule=None) -> ReferenceRunner:
        if schedule is not None:
            raise ValueError("the reference semantics lock by the lock rule only; it takes no schedule")
        return ReferenceRunner(self.model, lock, stats)
