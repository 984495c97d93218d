"""Have inductor compute a cos or sin that several ops read (rotary tables) once, into a buffer."""
from __future__ import annotations

import torch
from torch import fx

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


def realize_reused_trig(gm: fx.GraphModule) -> fx.GraphModule:
    """Route every cos and sin node with several users through ``REALIZE``.

    Inductor inlines a pointwise node into each of its readers unless it deems it heavy, and cos,
    sin and pow are not on its CPU list: a model's rotary tables [B, 1, N, D] are then recomputed
    in every layer's query and key kernels, once per head (and in a locked graph, in its query and
    its cache-writing kernels apart). Behind ``REALIZE`` they are computed once per pass, and the
    readers load them. Precondition: none; for graphs compiled by inductor (the op copies its input,
    nothing else gains from it). A cos or sin with one user, or already realized, is left alone.
    """
    graph = gm.graph
    for node in [n for n in graph.nodes if n.target in TRIG and len(n.users) > 1]:
        with graph.inserting_before(node.next):
            realized = graph.call_function(REALIZE, (node,))
        if "val" in node.meta:
            realized.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(realized, delete_user_cb=lambda user: user is not realized)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm
