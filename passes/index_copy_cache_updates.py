"""Write the K/V rows of a locked graph's cache updates with index_copy, not scatter."""
from __future__ import annotations

import itertools
import operator

import torch
from torch import fx

from surelock_fx.signature import ACTIVE_INDEX, cache_specs, input_node, is_cache_row_index, is_locked

from .pass_base import PassResult, graph_pass
from .update_caches_in_place import SCATTER, SCATTER_IN_PLACE

aten = torch.ops.aten
INDEX_COPY = aten.index_copy_.default
INDEX_COPY_FUNCTIONAL = aten.index_copy.default


def _flat_rows(graph: fx.Graph, active_index: fx.Node, cache: fx.Node, heads: int, device: torch.device) -> fx.Node:
    """[B * H * M] rows of the cache viewed as [B * H * (N + 1), D] that ``active_index`` [B, M] names, per head."""
    call = graph.call_function
    batch = call(aten.sym_size.int, (active_index, 0))
    slots = call(aten.sym_size.int, (cache, 2))
    heads_of_batch = call(aten.arange.default, (call(operator.mul, (batch, heads)),), {"device": device})
    starts = call(aten.mul.Tensor, (call(aten.view.default, (heads_of_batch, [batch, heads, 1])), slots))
    rows = call(aten.add.Tensor, (starts, call(aten.unsqueeze.default, (active_index, 1))))
    return call(aten.reshape.default, (rows, [-1]))


@graph_pass(after=("update_caches_in_place", "pack_rows"))
def index_copy_cache_updates(gm: fx.GraphModule) -> PassResult:
    """Turn each ``scatter_`` (``scatter``) of active rows into a cache input into ``index_copy_``
    (``index_copy``) of those rows into the cache viewed as [B * H * (N + 1), D].

    On CPU, ``index_copy_`` copies whole rows where ``scatter_`` copies single elements; exported to ONNX,
    the functional form is a ScatterND of D-wide slices, not a ScatterElements of single elements; under
    inductor, a ``scatter_`` into a graph input compiles as a scatter into a copy of the whole cache and a
    copy back, ``index_copy_`` in place. Preconditions: a locked graph whose scatter index is
    ``signature.emit_cache_row_index`` of ``active_index`` (as ``lock_rows`` emits it), and contiguous cache
    inputs at run time (as the runtime allocates them); it runs after ``update_caches_in_place`` and
    ``pack_rows``, which look for the scatters. Padding rows write to the scratch slot either way. Other
    graphs, and scatters with another index, are left unchanged.
    """
    if not is_locked(gm):
        return PassResult(gm, False)
    device = next(itertools.chain(gm.parameters(), gm.buffers()), torch.empty(0)).device  # the inputs' too
    names = {spec.name: spec for spec in cache_specs(gm)}
    active_index = input_node(gm.graph, ACTIVE_INDEX)
    rows_of: dict[int, fx.Node] = {}  # heads -> flat rows, shared by the caches of that many heads
    for node in list(gm.graph.nodes):
        if node.target not in (SCATTER, SCATTER_IN_PLACE) or node.args[0].name not in names:
            continue
        cache, dim, index, src = node.args
        spec = names[cache.name]
        if dim != 2 or not is_cache_row_index(index, active_index):
            continue
        call = gm.graph.call_function
        with gm.graph.inserting_before(node):
            if spec.heads not in rows_of:
                rows_of[spec.heads] = _flat_rows(gm.graph, active_index, cache, spec.heads, device)
            flat_cache = call(aten.view.default, (cache, [-1, spec.head_dim]))
            flat_src = call(aten.reshape.default, (src, [-1, spec.head_dim]))
            if node.target is SCATTER_IN_PLACE:
                call(INDEX_COPY, (flat_cache, 0, rows_of[spec.heads], flat_src))
                updated = cache
            else:
                flat = call(INDEX_COPY_FUNCTIONAL, (flat_cache, 0, rows_of[spec.heads], flat_src))
                updated = call(aten.view.default, (flat, [call(aten.sym_size.int, (cache, d)) for d in range(4)]))
        node.replace_all_uses_with(updated)
        gm.graph.erase_node(node)
    return PassResult(gm, bool(rows_of))
