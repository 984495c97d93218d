"""Capture a model as a flat ATen graph with symbolic batch and sequence dimensions."""
from __future__ import annotations

import inspect

import torch
from torch import fx
from torch.export import Dim

from .passes.pipeline import CAPTURE, run_pipeline

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8


class LogitsModule(torch.nn.Module):
    """``(input_ids, position_ids) -> logits`` for our models and transformers' alike."""

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

    def forward(self, input_ids, position_ids):
        out = self.model(input_ids=input_ids, position_ids=position_ids, **self.extra)
        return getattr(out, "logits", out)


def export_logits(model: torch.nn.Module) -> torch.export.ExportedProgram:
    """torch.export ``(input_ids, position_ids) -> logits`` with dynamic batch and sequence length."""
    device = next(model.parameters()).device
    ids = torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=torch.long, device=device)
    positions = torch.arange(EXAMPLE_SEQ, device=device).expand(EXAMPLE_BATCH, -1).contiguous()
    batch, seq = Dim("batch"), Dim("seq", min=2)
    shapes = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
    with torch.no_grad():
        return torch.export.export(
            LogitsModule(model.eval()), (), {"input_ids": ids, "position_ids": positions}, dynamic_shapes=shapes
        )


def capture(model: torch.nn.Module) -> fx.GraphModule:
    """torch.export the model with dynamic batch and sequence length, as a flat inference graph."""
    gm = export_logits(model).run_decompositions({}).module()
    for node in list(gm.graph.nodes):  # export's input-guard module is not part of the computation
        if node.op == "call_module" and not node.users:
            gm.graph.erase_node(node)
    return run_pipeline(gm, CAPTURE)
