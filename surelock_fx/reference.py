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

from .lock import LockConfig, LockState
from .sampler import DecodeStats, generate, model_forward, special_ids
from .signature import active_index


class ReplaceLockedKV(TorchFunctionMode):
    """Within one forward pass: attention call l uses cache l's K/V at locked rows, then stores its K/V."""

    def __init__(self, caches: list, locked: torch.Tensor):
        super().__init__()
        self.caches, self.locked, self.layer = caches, locked, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        if self.layer == len(self.caches):
            self.caches.append((k, v))
        cached_k, cached_v = self.caches[self.layer]
        rows = self.locked[:, None, :, None]
        k, v = torch.where(rows, cached_k, k), torch.where(rows, cached_v, v)
        self.caches[self.layer] = (k, v)
        self.layer += 1
        return func(q, k, v, *args[3:], **kwargs)


class ReferenceRunner:
    """A forward function for ``generate`` that applies locking by the dense reference semantics."""

    def __init__(self, model: torch.nn.Module, lock: LockConfig | None, stats: DecodeStats):
        self.forward = model_forward(model)
        self.lock, self.stats = lock, stats
        self.mask_id = special_ids(model.config)[0]
        self.state: LockState | None = None
        self.caches: list = []

    def __call__(self, x: torch.Tensor, attention_mask) -> torch.Tensor:
        if self.state is None:
            self.state = LockState(self.lock, x, self.mask_id)
        with ReplaceLockedKV(self.caches, self.state.locked):
            logits = self.forward(x, attention_mask)
        self.stats.forward_passes += 1
        self.stats.active_counts.append(int((~self.state.locked).sum()))
        self.stats.locked_counts.append(int(self.state.locked.sum()))
        index, _ = active_index(self.state.locked)
        padded = torch.cat([logits, logits[:, :1]], dim=1)
        active = padded.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        self.state.update(index, active, x != self.mask_id)
        return logits


class ReferenceModel:
    """A ``sampler.Decodable`` that decodes ``model`` with locking by the dense reference semantics."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.config = model, model.config

    def decode_runner(self, lock: LockConfig | None, stats: DecodeStats, schedule=None) -> ReferenceRunner:
        if schedule is not None:
            raise ValueError("the reference semantics lock by the lock rule only; it takes no schedule")
        return ReferenceRunner(self.model, lock, stats)


def reference_generate(model, prompt_ids, *, lock: LockConfig | None, **kwargs):
    """``generate`` with locking applied by the dense reference semantics."""
    return generate(ReferenceModel(model), prompt_ids, lock=lock, **kwargs)
