"""Have inductor compute a cos or sin that several ops read (rotary tables) once, into a buffer."""
from __future__ import annotations

import torch
from torch import fx

from .pass_base import PassResult, graph_pass

aten = torch.ops.aten
TRIG = (aten.cos.default, aten.sin.default)


@torch.library.custom_op("surelock_fx::realize", mutates_args=())
def realize(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x``: an op inductor runs as it is, so ``x`` is computed into a buffer before it."""
    return x.clone()


@realize.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


REALIZE = torch.ops.surelock_fx.realize.default


def _rescaled(node: fx.Node) -> bool:
    """Whether ``node`` is an elementwise op of one tensor input (a scaling, a dtype conversion)."""
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and (torch.Tag.pointwise in node.target.tags or node.target is aten._to_copy.default)
            and len(node.all_input_nodes) == 1)


def _table(trig: fx.Node) -> fx.Node | None:
    """The value computed from ``trig`` that several ops read: ``trig`` itself or the end of its chain of
    sole, rescaling users (transformers' rotary tables are cos * attention_scaling); None if one op reads it."""
    node = trig
    while len(node.users) == 1 and _rescaled(next(iter(node.users))):
        node = next(iter(node.users))
    return node if len(node.users) > 1 else None


@graph_pass
def realize_reused_trig(gm: fx.GraphModule) -> PassResult:
    """Route every cos and sin that several ops read (directly, or rescaled first) through ``REALIZE``.

    Inductor inlines a pointwise node into each of its readers unless it deems it heavy, and cos,
    sin and pow are not on its CPU list: a model's rotary tables [B, 1, N, D] are then recomputed
    in every layer's query and key kernels, once per head (and in a locked graph, in its query and
    its cache-writing kernels apart). Behind ``REALIZE`` they are computed once per pass, and the
    readers load them. Precondition: none; for graphs compiled by inductor (the op copies its input,
    nothing else gains from it). A cos or sin read by one op, or already realized, is left alone.
    """
    graph = gm.graph
    tables = [t for t in (_table(n) for n in graph.nodes if n.target in TRIG) if t is not None]
    for table in tables:
        with graph.inserting_before(table.next):
            realized = graph.call_function(REALIZE, (table,))
        if "val" in table.meta:
            realized.meta["val"] = table.meta["val"]
        table.replace_all_uses_with(realized, delete_user_cb=lambda user: user is not realized)
    return PassResult(gm, bool(tables))
