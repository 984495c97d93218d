"""Run a locked graph's row-wise ops on the real active rows only, packed across the batch."""
from __future__ import annotations

import torch
from torch import fx

from .lock_rows import cache_specs, input_node, is_locked
from .row_analysis import SDPA
from .update_caches_in_place import SCATTER, SCATTER_IN_PLACE

aten = torch.ops.aten
PACKED_ROWS, UNPACK_INDEX = "packed_rows", "unpack_index"


def is_packed(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is pack_rows' output (it takes ``packed_rows``)."""
    return input_node(gm.graph, PACKED_ROWS) is not None


def _token_gathers(graph: fx.Graph, active_index: fx.Node) -> list[fx.Node]:
    """The gathers of token inputs along dim 1 whose index is built from ``active_index`` (lock_rows' inputs)."""
    def from_active_index(node) -> bool:
        return node is active_index or (isinstance(node, fx.Node) and node.op == "call_function"
                                        and any(from_active_index(a) for a in node.all_input_nodes))
    return [n for n in graph.nodes if n.target is aten.gather.default and n.args[0].op == "placeholder"
            and n.args[1] == 1 and from_active_index(n.args[2])]


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


def pack_rows(gm: fx.GraphModule) -> fx.GraphModule:
    """Compute the row-wise part of a locked graph on the active index's real entries only, as one
    batch row of R rows; attention and the cache writes see them unpacked to [B, M].

    A batch whose rows have different active counts then computes no padding rows in its projections,
    FFN and LM head (attention still runs the B x M queries, a small share of the FLOPs).
    Precondition: a locked graph as ``lock_rows`` emits it (token inputs gathered along dim 1 by an
    index built from ``active_index``; cache scatters, functional or in place, and attention on
    [batch, heads, rows, head_dim]). Two inputs follow ``key_mask``: ``packed_rows`` [R], the flat
    entries b * M + j of ``active_index`` that are real rows (< N), in order, and ``unpack_index``
    [B, M], each entry's place among them (padding entries: any real row), as
    ``surelock_fx.lock.pack_index`` builds them. The logits come out as [1, R, V]. Graphs not locked,
    or already packed, are returned unchanged.
    """
    if not is_locked(gm) or is_packed(gm):
        return gm
    graph = gm.graph
    key_mask, active_index = input_node(graph, "key_mask"), input_node(graph, "active_index")
    with graph.inserting_before(key_mask.next):
        packed, unpack = graph.placeholder(PACKED_ROWS), graph.placeholder(UNPACK_INDEX)
    gathers = _token_gathers(graph, active_index)
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
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm
