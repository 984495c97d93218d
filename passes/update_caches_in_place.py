"""Write the locked graph's K/V cache updates into the cache inputs instead of into copies of them."""
from __future__ import annotations

import torch
from torch import fx

from surelock_fx.signature import cache_specs, is_locked

from .pass_base import PassResult, graph_pass

SCATTER = torch.ops.aten.scatter.src
SCATTER_IN_PLACE = torch.ops.aten.scatter_.src


@graph_pass
def update_caches_in_place(gm: fx.GraphModule) -> PassResult:
    """Turn each functional ``scatter`` of a cache input into ``scatter_`` on that input.

    The locked graph (``lock_rows``) writes the M active rows of K and V into a copy of each cache
    [B, H, N + 1, D], a copy of every cache in every pass whatever M is. In place, an update costs
    its M rows, and the caches the graph returns are its cache inputs, updated. Precondition: a
    locked graph whose cache inputs have their scatter as only user (as ``lock_rows`` emits them);
    other graphs, and caches already updated in place, are left unchanged. The result mutates its
    inputs: it is for running a decode, where each step's caches are the previous step's outputs,
    not for export (export the functional graph).
    """
    if not is_locked(gm):
        return PassResult(gm, False)
    names = {spec.name for spec in cache_specs(gm)}
    modified = False
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.name not in names or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.target is SCATTER and user.args[0] is node:
            user.target = SCATTER_IN_PLACE
            modified = True
    return PassResult(gm, modified)
