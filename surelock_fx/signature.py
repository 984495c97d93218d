"""The locked graph's signature (docs/DESIGN.md §4): its input and output names, its K/V caches, the active
index that drives it and the row patterns the rewrite emits, and the FLOP model of a pass.

Every piece that builds, rewrites, exports or runs a locked graph (``passes/``, the runtime, the backends,
export, tests) reads these names and helpers here, so that they cannot drift apart.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import fx

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

ACTIVE_INDEX = "active_index"  # [B, M] positions to compute; padding entries hold N, the scratch slot
KEY_MASK = "key_mask"  # [B, N] bool: False for padding keys
PACKED_ROWS = "packed_rows"  # [R] flat entries of the active index that are real rows (a packed graph's)
UNPACK_INDEX = "unpack_index"  # [B, M] each entry's place among the packed rows
LOGITS = "logits"
CACHES_META = "surelock_caches"  # GraphModule.meta key of a locked graph's cache specs


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """One K or V cache: [batch, heads, seq + 1, head_dim]; the last slot is the scratch slot."""

    name: str
    heads: int
    head_dim: int
    dtype: torch.dtype


def cache_name(kind: str, layer: int) -> str:
    """``k_cache_<layer>`` or ``v_cache_<layer>``: the input name of one attention's K or V cache."""
    return f"{kind}_cache_{layer}"


def is_locked(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is a locked graph (``passes.lock_rows``' output)."""
    return CACHES_META in gm.meta


def cache_specs(gm: fx.GraphModule) -> list[CacheSpec]:
    return gm.meta[CACHES_META]


def input_node(graph: fx.Graph, name: str) -> fx.Node | None:
    """The placeholder called ``name`` (an input such as ``active_index`` or ``key_mask``), or None."""
    return next((n for n in graph.nodes if n.op == "placeholder" and n.name == name), None)


def is_packed(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` runs packed rows (``passes.pack_rows``' output: it takes ``packed_rows``)."""
    return input_node(gm.graph, PACKED_ROWS) is not None


def input_names(gm: fx.GraphModule) -> list[str]:
    """The locked graph's inputs in order: token inputs, active_index, key_mask, (packed_rows, unpack_index),
    caches."""
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def token_input_names(gm: fx.GraphModule) -> list[str]:
    """The token-indexed inputs [B, N] (input ids, positions) that precede ``active_index``."""
    names = input_names(gm)
    return names[: names.index(ACTIVE_INDEX)]


def output_names(gm: fx.GraphModule) -> list[str]:
    return [LOGITS] + [f"{spec.name}_out" for spec in cache_specs(gm)]


# --- the row patterns lock_rows emits and later passes recognise ----------------------------------

def _call(graph: fx.Graph, target, *args) -> fx.Node:
    return graph.call_function(target, args)


def emit_row_gather(graph: fx.Graph, full: fx.Node, index: fx.Node, trailing: list[int]) -> fx.Node:
    """Rows ``index`` [B, M] of a [B, N, *trailing] token input: ``gather`` along dim 1."""
    for _ in trailing:
        index = _call(graph, aten.unsqueeze.default, index, -1)
    if trailing:
        index = _call(graph, aten.expand.default, index, [-1, -1] + trailing)
    return _call(graph, aten.gather.default, full, 1, index)


def _derives_from(node, source: fx.Node) -> bool:
    return node is source or (isinstance(node, fx.Node) and node.op == "call_function"
                              and any(_derives_from(a, source) for a in node.all_input_nodes))


def is_row_gather(node: fx.Node, active_index: fx.Node) -> bool:
    """Whether ``node`` is an ``emit_row_gather`` of a token input by an index built from ``active_index``."""
    return (node.target is aten.gather.default and node.args[0].op == "placeholder" and node.args[1] == 1
            and _derives_from(node.args[2], active_index))


def emit_cache_row_index(graph: fx.Graph, active_index: fx.Node, heads: int, head_dim: int) -> fx.Node:
    """``active_index`` [B, M] as the [B, heads, M, head_dim] index of a scatter into a cache along dim 2."""
    index = _call(graph, aten.unsqueeze.default, _call(graph, aten.unsqueeze.default, active_index, 1), -1)
    return _call(graph, aten.expand.default, index, [-1, heads, -1, head_dim])


def is_cache_row_index(index: fx.Node, active_index: fx.Node) -> bool:
    """Whether ``index`` is ``emit_cache_row_index`` of ``active_index``."""
    if index.target is not aten.expand.default:
        return False
    inner = index.args[0]
    if inner.target is not aten.unsqueeze.default or inner.args[1] != -1:
        return False
    inner = inner.args[0]
    return inner.target is aten.unsqueeze.default and inner.args[1] == 1 and inner.args[0] is active_index


# --- the active index, as the runtime builds it --------------------------------------------------

def active_index(locked: torch.Tensor, bucket: int = 1, full_from: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, M] positions of unlocked rows in order, padded with N; [B] active counts).

    M is the largest active count rounded up to a multiple of ``bucket`` (at most N); if that is at
    least ``full_from * N``, M is N (the crossover to a full-width step: same rows computed, padding
    to the scratch slot, one graph shape for all nearly dense steps).
    """
    counts = (~locked).sum(dim=1)
    return padded_index(locked, counts, max(counts.tolist()), bucket, full_from), counts


def padded_index(locked: torch.Tensor, counts: torch.Tensor, most: int, bucket: int = 1,
                 full_from: float = 1.0) -> torch.Tensor:
    """``active_index``'s index, given the active counts [B] and their maximum ``most`` read to the host."""
    N = locked.shape[1]
    M = min(N, -(-max(most, 1) // bucket) * bucket)
    if M >= full_from * N:
        M = N
    order = torch.sort(locked.to(torch.uint8), dim=1, stable=True).indices[:, :M]
    padding = torch.arange(M, device=locked.device)[None, :] >= counts[:, None]
    return order.masked_fill(padding, N)


def pack_index(index: torch.Tensor, seq: int, real: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``packed_rows`` [R], ``unpack_index`` [B, M]) of an active index [B, M] over ``seq`` positions, for
    a packed graph (``passes.pack_rows``): the flat entries b * M + j that are real rows (< seq), in
    order, and each entry's place among them (padding entries: the real row before them, or the first).
    Without real rows, the first entry runs (R = 1): a pass computes at least one row. Given the number
    of ``real`` rows, nothing is read back to the host (no device sync)."""
    is_real = (index < seq).flatten()
    if real is None:
        rows = is_real.nonzero().squeeze(1)
        rows = rows if len(rows) else rows.new_zeros(1)
    else:
        rows = torch.nonzero_static(is_real, size=max(real, 1), fill_value=0).squeeze(1)
    return rows, (is_real.cumsum(0) - 1).clamp_min_(0).view_as(index)


# --- FLOPs ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Algorithmic GEMM FLOPs (docs/DESIGN.md §1, the LM head included): per computed row, and per
    (query row, key) pair of attention."""

    per_row: int
    per_pair: int

    @classmethod
    def from_graph(cls, gm: fx.GraphModule) -> "FlopModel":
        per_row = per_pair = 0
        for node in gm.graph.nodes:
            if node.target is aten.linear.default:
                out_features, in_features = node.args[1].meta["val"].shape
                per_row += 2 * int(in_features) * int(out_features)
            elif node.target is SDPA:
                q = node.args[0].meta["val"]
                per_pair += 4 * int(q.shape[1]) * int(q.shape[3])
        return cls(per_row, per_pair)

    def step(self, rows: int, keys: int, queries: int | None = None) -> int:
        """FLOPs of a pass computing ``rows`` rows whose attention runs ``queries`` (default: those rows)
        over ``keys`` keys."""
        return rows * self.per_row + (rows if queries is None else queries) * keys * self.per_pair
