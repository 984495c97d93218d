"""Capture a model as a flat ATen graph with symbolic batch and sequence dimensions."""
from __future__ import annotations

import inspect
import sys
import weakref

import torch
import torch.nn.functional as F
from torch import fx
from torch.export import Dim
from torch.overrides import TorchFunctionMode

from .passes.detach_full_attention_masks import allows_all
from .passes.pipeline import CAPTURE, run_pipeline

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8
# Config fields of transformers models that restrict attention to nearby keys: an all-allowed mask would widen it.
LOCAL_ATTENTION = ("sliding_window", "attention_chunk_size")


def full_mask_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the all-allowed 4D attention mask ``LogitsModule`` passes ``model``, or None for none.

    A transformers model ``declared_bidirectional`` gets one: transformers 4.x ignores ``config.is_causal`` and
    builds a causal mask, while 4.x and 5.x alike use a 4D mask from the caller as it is (and then pass
    ``is_causal=False`` to attention). A model with local attention (``config.sliding_window``) keeps building
    its own mask, for the passes to check.
    """
    transformers = sys.modules.get("transformers")  # not imported: not a transformers model
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return None
    config = model.config
    if not declared_bidirectional(model) or any(getattr(config, f, None) is not None for f in LOCAL_ATTENTION):
        return None
    return model.dtype


def declared_bidirectional(model: torch.nn.Module) -> bool:
    """``config.is_causal`` is False, or, where the config does not say, every attention module that has an
    ``is_causal`` flag (and at least one does) has it False: an encoder such as BERT, whose transformers 5.x
    would otherwise derive a packed-sequence mask from the positions (a diff across the sequence)."""
    declared = getattr(model.config, "is_causal", None)
    if declared is not None:
        return not declared
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and not any(flags)


class AttentionProbe(TorchFunctionMode):
    """Records, for every scaled_dot_product_attention call, whether every query may see every key."""

    def __init__(self):
        super().__init__()
        self.sees_all: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
            self.sees_all.append(not causal and (mask is None or allows_all(mask)))
        return func(*args, **kwargs)


_HONOURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its probed mask dtype


def honoured_full_mask_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """``full_mask_dtype(model)`` if, at two positions, every attention call then sees every key (not so in a
    model that reads a 4D mask in another convention, or flattens it), else None; probed once per model."""
    if model not in _HONOURED:
        _HONOURED[model] = _probe_full_mask(model)
    return _HONOURED[model]


def _probe_full_mask(model: torch.nn.Module) -> torch.dtype | None:
    dtype = full_mask_dtype(model)
    if dtype is None:
        return None
    device = next(model.parameters()).device
    probe = AttentionProbe()
    try:
        with torch.no_grad(), probe:
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device),
                  position_ids=torch.arange(2, device=device)[None],
                  attention_mask=torch.zeros(1, 1, 2, 2, dtype=dtype, device=device))
    except (RuntimeError, ValueError, TypeError):
        return None
    return dtype if probe.sees_all and all(probe.sees_all) else None


def full_attention_mask(key_mask: torch.Tensor | None, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """The additive [B, 1, N, N] mask of bidirectional attention over the keys ``key_mask`` [B, N] allows
    (every key if None): 0 where a key is attended to, the dtype's lowest value where not."""
    batch, seq = shape
    mask = torch.zeros(batch, 1, seq, seq, dtype=dtype, device=device)
    if key_mask is not None:
        mask = mask.masked_fill(~key_mask.bool()[:, None, None, :], torch.finfo(dtype).min)
    return mask


class LogitsModule(torch.nn.Module):
    """``(input_ids, position_ids) -> logits`` for our models and transformers' alike; a transformers model
    declared bidirectional gets an all-allowed 4D attention mask where it honours one (``full_mask_dtype``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in params else {}
        if "position_ids" not in params:
            raise ValueError(
                f"{type(model).__name__}.forward takes no position_ids: the locking rewrite needs positions "
                "as an input so that only the active rows' positions are computed"
            )
        self.mask_dtype = honoured_full_mask_dtype(model)

    def forward(self, input_ids, position_ids):
        extra = self.extra
        if self.mask_dtype is not None:  # computed from shapes alone: detach_full_attention_masks drops it
            mask = full_attention_mask(None, input_ids.shape, self.mask_dtype, input_ids.device)
            extra = {**extra, "attention_mask": mask}
        out = self.model(input_ids=input_ids, position_ids=position_ids, **extra)
        return getattr(out, "logits", out)


class CaptureError(ValueError):
    """torch.export could not capture the model with a dynamic batch and sequence length."""


def _what_the_model_did(err: Exception) -> str:
    """torch.export's failure in words: what in the model's forward it could not capture, and the fix."""
    text = str(err)
    if "data-dependent" in text or "DataDependent" in type(err).__name__:
        return ("its forward branches on the values of its inputs (as a rotary embedding that picks its scaling "
                "from the largest position does: dynamic RoPE, Phi-3's LongRoPE); make it compute every length "
                "the same way")
    if "Constraints violated" in text or "specializ" in text:
        return ("its forward does not work the same way for every sequence length (it ties the length to a "
                "constant, e.g. by slicing or comparing it); make it shape-generic")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"{type(err).__name__}: {first}"


def export_logits(model: torch.nn.Module) -> torch.export.ExportedProgram:
    """torch.export ``(input_ids, position_ids) -> logits`` with dynamic batch and sequence length; a failure
    is a CaptureError saying what the model did, not export's own trace."""
    device = next(model.parameters()).device
    ids = torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=torch.long, device=device)
    positions = torch.arange(EXAMPLE_SEQ, device=device).expand(EXAMPLE_BATCH, -1).contiguous()
    batch, seq = Dim("batch"), Dim("seq", min=2)
    shapes = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
    logits = LogitsModule(model.eval())
    try:
        with torch.no_grad():
            return torch.export.export(logits, (), {"input_ids": ids, "position_ids": positions},
                                       dynamic_shapes=shapes)
    except Exception as err:  # export raises many classes; each becomes one sentence
        raise CaptureError(f"torch.export could not capture {type(model).__name__} with a dynamic batch and "
                           f"sequence length: {_what_the_model_did(err)}") from err


def capture(model: torch.nn.Module) -> fx.GraphModule:
    """torch.export the model with dynamic batch and sequence length, as a flat inference graph."""
    gm = export_logits(model).run_decompositions({}).module()
    for node in list(gm.graph.nodes):  # export's input-guard module is not part of the computation
        if node.op == "call_module" and not node.users:
            gm.graph.erase_node(node)
    return run_pipeline(gm, CAPTURE)
