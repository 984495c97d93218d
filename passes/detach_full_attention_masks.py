"""Drop attention masks that mask nothing, so attention keeps only its query/key/value inputs."""
from __future__ import annotations

import torch
from torch import fx

from surelock_fx.signature import SDPA

from .pass_base import PassResult, graph_pass
from .row_analysis import UnsupportedGraphError

MASK_INDEX = 3


def _mask_arg(node: fx.Node):
    if len(node.args) > MASK_INDEX:
        return node.args[MASK_INDEX]
    return node.kwargs.get("attn_mask")


def _is_shape_only(mask: fx.Node) -> bool:
    """True when the mask depends on graph inputs only through their sizes, not their values."""
    stack, seen = [mask], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            return False
        if node.target is torch.ops.aten.sym_size.int:
            continue
        stack.extend(node.all_input_nodes)
    return True


def _example_inputs(gm: fx.GraphModule) -> list[torch.Tensor]:
    """Zeros shaped like each placeholder's example value (symbolic sizes at their hints)."""
    inputs = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta["val"]
            shape = [int(s) if not isinstance(s, torch.SymInt) else s.node.hint for s in val.shape]
            inputs.append(torch.zeros(shape, dtype=val.dtype, device=val.device))
    return inputs


def _mask_values(gm: fx.GraphModule, masks: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in masks:
                values[n] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*_example_inputs(gm))
    return values


@graph_pass
def detach_full_attention_masks(gm: fx.GraphModule) -> PassResult:
    """Remove scaled_dot_product_attention masks that are computed from shapes alone and allow every key.

    Precondition: a flat ATen graph with example values in ``node.meta["val"]`` (torch.export).
    Masks that depend on input values, or that block some query/key pair, are left in place; the
    row analysis then reports them.
    """
    sdpas = [n for n in gm.graph.nodes if n.target is SDPA and _mask_arg(n) is not None]
    candidates = {_mask_arg(n) for n in sdpas if _is_shape_only(_mask_arg(n))}
    if not candidates:
        return PassResult(gm, False)
    values = _mask_values(gm, candidates)
    for node in sdpas:
        mask = _mask_arg(node)
        if mask not in candidates:
            continue
        value = values[mask]
        allows_all = bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())
        if not allows_all:
            raise UnsupportedGraphError(node, "its attention mask blocks some positions (causal or windowed?)")
        if len(node.args) > MASK_INDEX:
            node.args = node.args[:MASK_INDEX] + (None,) + node.args[MASK_INDEX + 1:]
        else:
            node.kwargs = {**node.kwargs, "attn_mask": None}
    return PassResult(gm, True)
