"""Drop attention masks that mask nothing, so attention keeps only its query/key/value inputs."""
from __future__ import annotations

import torch
from torch import fx

from surelock_fx.signature import SDPA

from .pass_base import PassResult, graph_pass
from .row_analysis import UnsupportedGraphError, sequence_symbol

aten = torch.ops.aten
MASK_INDEX = 3
# A shape-only mask is evaluated at the example's sequence length and past twice every integer constant its
# computation compares positions with (a window's width), up to this length: enough for the 4096-wide
# windows of Mistral-style models; a mask whose constants reach beyond it is refused as unverifiable.
MAX_CHECKED_SEQ = 8448
POSITION_ARITHMETIC = {
    aten.le.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.gt.Scalar, aten.eq.Scalar, aten.ne.Scalar,
    aten.sub.Tensor, aten.add.Tensor, aten.sub.Scalar, aten.add.Scalar, aten.remainder.Scalar,
    aten.floor_divide.default, aten.div.Tensor_mode,
}


def _mask_arg(node: fx.Node):
    if len(node.args) > MASK_INDEX:
        return node.args[MASK_INDEX]
    return node.kwargs.get("attn_mask")


def _ancestors(masks) -> set[fx.Node]:
    """The nodes the masks are computed from, sizes of placeholders included (not their values)."""
    stack, seen = list(masks), set()
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _is_shape_only(mask: fx.Node) -> bool:
    """True when the mask depends on graph inputs only through their sizes, not their values."""
    ancestors = _ancestors([mask])
    return all(user.target is aten.sym_size.int or user not in ancestors
               for p in ancestors if p.op == "placeholder" for user in p.users)


def _constants(nodes) -> set[int]:
    """Integer constants that the position arithmetic among ``nodes`` uses (window widths, offsets)."""
    return {abs(a) for n in nodes if n.target in POSITION_ARITHMETIC for a in n.args
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > 1}


def _mask_graph(gm: fx.GraphModule, masks: list[fx.Node]) -> fx.GraphModule:
    """A graph module computing only ``masks`` from ``gm``'s inputs (of which it reads the sizes)."""
    needed = _ancestors(masks)
    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if node in needed or node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[m] for m in masks))
    return fx.GraphModule(gm, graph)


def _inputs_at(gm: fx.GraphModule, seq_len: int) -> list[torch.Tensor]:
    """Zeros shaped like each placeholder's example value, the sequence length ``seq_len`` and batch 1."""
    seq = sequence_symbol(gm)
    inputs = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta["val"]
            shape = [s if isinstance(s, int) else (seq_len if seq in s.node.expr.free_symbols else 1)
                     for s in val.shape]
            inputs.append(torch.zeros(shape, dtype=val.dtype, device=val.device))
    return inputs


def allows_all(mask: torch.Tensor) -> bool:
    """Whether an attention mask (boolean, or additive float) lets every query see every key."""
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def _check_full(gm: fx.GraphModule, sdpas: list[fx.Node]) -> None:
    """Raise UnsupportedGraphError unless every mask of ``sdpas`` allows every key at every sequence length
    checked (the example's, and past twice each constant of the masks' position arithmetic)."""
    masks = list(dict.fromkeys(_mask_arg(n) for n in sdpas))
    hint = next(int(s.node.hint) for n in gm.graph.nodes if n.op == "placeholder"
                for s in n.meta["val"].shape[1:2] if not isinstance(s, int))
    constants = _constants(_ancestors(masks))
    too_wide = [c for c in constants if 2 * c + 2 > MAX_CHECKED_SEQ]
    if too_wide:
        raise UnsupportedGraphError(sdpas[0], f"its attention mask compares positions with {max(too_wide)}, beyond "
                                    f"the {MAX_CHECKED_SEQ} positions surelock_fx checks masks at (a sliding window? "
                                    "set config.sliding_window = None if every sequence you decode is shorter than "
                                    "it); SureLock needs bidirectional attention over all positions")
    mask_graph = _mask_graph(gm, masks)
    for seq_len in sorted({max(hint, 2), *(2 * c + 2 for c in constants)}):
        with torch.no_grad():
            values = mask_graph(*_inputs_at(gm, seq_len))
        for node, value in zip(sdpas, (values[masks.index(_mask_arg(n))] for n in sdpas)):
            if not allows_all(value):
                raise UnsupportedGraphError(
                    node, f"its attention mask blocks some positions at sequence length {seq_len} (causal, or a "
                    "sliding window: set config.sliding_window = None if every sequence you decode is shorter "
                    "than the window); SureLock needs bidirectional attention over all positions")


@graph_pass
def detach_full_attention_masks(gm: fx.GraphModule) -> PassResult:
    """Remove scaled_dot_product_attention masks that are computed from shapes alone and allow every key.

    Precondition: a flat ATen graph with example values in ``node.meta["val"]`` (torch.export) and a
    symbolic sequence length. A shape-only mask is evaluated, by itself, at the example's sequence length
    and past twice every integer constant its position arithmetic uses (a window's width), so that a
    sliding window wider than the example is seen; one that blocks a key anywhere is an
    UnsupportedGraphError. Masks that depend on input values are left in place; the row analysis then
    reports them.
    """
    sdpas = [n for n in gm.graph.nodes if n.target is SDPA and _mask_arg(n) is not None
             and _is_shape_only(_mask_arg(n))]
    if not sdpas:
        return PassResult(gm, False)
    _check_full(gm, sdpas)
    for node in sdpas:
        if len(node.args) > MASK_INDEX:
            node.args = node.args[:MASK_INDEX] + (None,) + node.args[MASK_INDEX + 1:]
        else:
            node.kwargs = {**node.kwargs, "attn_mask": None}
    return PassResult(gm, True)
