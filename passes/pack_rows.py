"""Run a locked graph's row-wise ops on the real active rows only, packed across the batch."""
from __future__ import annotations

import torch
from torch import fx

from surelock_fx.signature import (
    ACTIVE_INDEX,
    KEY_MASK,
    PACKED_ROWS,
    SDPA,
    UNPACK_INDEX,
    cache_specs,
    input_node,
    is_locked,
    is_packed,
    is_row_gather,
)

from .pass_base import PassResult, graph_pass
from .update_caches_in_place import SCATTER, SCATTER_IN_PLACE

aten = torch.ops.aten


def _reroute(graph: fx.Graph, node: fx.Node, convert) -> None:
    """Insert ``convert(node)`` after ``node`` and make ``node``'s users read it instead."""
    users = list(node.users)
    with graph.inserting_before(node.next):
        new = convert(node)
    for user in users:
        user.replace_input_with(node, new)


class _Packer:
    """Emits the packing and unpacking of rows, ``packed_rows`` [R] and ``unpack_index`` [B, M] given."""

    def __init__(self, graph: fx.Graph, active_index: fx.Node, packed: fx.Node, unpack: fx.Node):
        self.graph, self.packed = graph, packed
        call = self.call
        self.unpack_flat = call(aten.view.default, unpack, [-1])
        self.batch_and_width = [call(aten.sym_size.int, active_index, d) for d in (0, 1)]

    def call(self, target, *args) -> fx.Node:
        return self.graph.call_function(target, args)

    def pack_tokens(self, rows: fx.Node) -> fx.Node:
        """[B, M, ...] -> [1, R, ...]."""
        flat = self.call(aten.flatten.using_ints, rows, 0, 1)
        return self.call(aten.unsqueeze.default, self.call(aten.index_select.default, flat, 0, self.packed), 0)

    def unpack_heads(self, rows: fx.Node) -> fx.Node:
        """[1, H, R, D] -> [B, H, M, D] (padding entries hold some real row), copied as [B * M, H, D] rows."""
        packed = self.call(aten.squeeze.dim, self.call(aten.transpose.int, rows, 1, 2), 0)
        spread = self.call(aten.index_select.default, packed, 0, self.unpack_flat)
        return self.call(aten.transpose.int, self.call(aten.unflatten.int, spread, 0, self.batch_and_width), 1, 2)

    def pack_heads(self, rows: fx.Node) -> fx.Node:
        """[B, H, M, D] -> [1, H, R, D], laid out as [1, R, H, D] like attention's output."""
        flat = self.call(aten.flatten.using_ints, self.call(aten.transpose.int, rows, 1, 2), 0, 1)
        packed = self.call(aten.index_select.default, flat, 0, self.packed)
        return self.call(aten.transpose.int, self.call(aten.unsqueeze.default, packed, 0), 1, 2)


@graph_pass
def pack_rows(gm: fx.GraphModule) -> PassResult:
    """Compute the row-wise part of a locked graph on the active index's real entries only, as one
    batch row of R rows; attention and the cache writes see them unpacked to [B, M].

    A batch whose rows have different active counts then computes no padding rows in its projections,
    FFN and LM head (attention still runs the B x M queries, a small share of the FLOPs).
    Precondition: a locked graph as ``lock_rows`` emits it (token inputs gathered by
    ``signature.emit_row_gather`` of an index built from ``active_index``; cache scatters, functional or in
    place, and attention on
    [batch, heads, rows, head_dim]). Two inputs follow ``key_mask``: ``packed_rows`` [R], the flat
    entries b * M + j of ``active_index`` that are real rows (< N), in order, and ``unpack_index``
    [B, M], each entry's place among them (padding entries: any real row), as
    ``surelock_fx.signature.pack_index`` builds them. The logits come out as [1, R, V]. Graphs not locked,
    or already packed, are returned unchanged.
    """
    if not is_locked(gm) or is_packed(gm):
        return PassResult(gm, False)
    graph = gm.graph
    key_mask, active_index = input_node(graph, KEY_MASK), input_node(graph, ACTIVE_INDEX)
    gathers = [n for n in graph.nodes if is_row_gather(n, active_index)]
    if not gathers:
        return PassResult(gm, False)
    with graph.inserting_before(key_mask.next):
        packed, unpack = graph.placeholder(PACKED_ROWS), graph.placeholder(UNPACK_INDEX)
    with graph.inserting_before(gathers[0]):
        packer = _Packer(graph, active_index, packed, unpack)
    for gather in gathers:
        _reroute(graph, gather, packer.pack_tokens)
    caches = {spec.name for spec in cache_specs(gm)}
    for node in list(graph.nodes):
        if node.target in (SCATTER, SCATTER_IN_PLACE) and node.args[0].name in caches:
            with graph.inserting_before(node):
                node.update_arg(3, packer.unpack_heads(node.args[3]))
        elif node.target is SDPA:
            with graph.inserting_before(node):
                node.update_arg(0, packer.unpack_heads(node.args[0]))
            _reroute(graph, node, packer.pack_heads)
    return PassResult(gm, True)
