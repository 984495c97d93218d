"""The SureLock rewrite: compute only the active rows, attend over per-layer K/V caches."""
from __future__ import annotations

import copy
import operator

import torch
from torch import fx

from surelock_fx.signature import (
    ACTIVE_INDEX,
    CACHES_META,
    KEY_MASK,
    SDPA,
    CacheSpec,
    cache_name,
    emit_cache_row_index,
    emit_row_gather,
    is_locked,
)

from .pass_base import PassResult, graph_pass
from .row_analysis import check_row_wise, sequence_symbol, token_inputs

aten = torch.ops.aten


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with its own graph and meta (cache specs), sharing its weights: for passes that
    rewrite a graph in place while the original stays as it is."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta.update(gm.meta)
    return new


class _Builder:
    """Emits the rewritten graph node by node."""

    def __init__(self, gm: fx.GraphModule):
        self.old = gm.graph
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.specs: list[CacheSpec] = []
        self.updated: list[fx.Node] = []
        self._index4: dict[tuple[int, int], fx.Node] = {}
        self._bias: dict[torch.dtype, fx.Node] = {}

    def call(self, target, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(target, args, kwargs)

    def inputs(self, tokens: list[fx.Node]) -> None:
        placeholders = [n for n in self.old.nodes if n.op == "placeholder"]
        new = {n: self.graph.placeholder(n.name) for n in placeholders}
        self.active_index = self.graph.placeholder(ACTIVE_INDEX)
        self.key_mask = self.graph.placeholder(KEY_MASK)
        for n in placeholders:
            self.env[n] = new[n]
        seq_len = self.call(aten.sym_size.int, new[tokens[0]], 1)
        last = self.call(operator.sub, seq_len, 1)
        gather_index = self.call(aten.clamp_max.default, self.active_index, last)
        for n in tokens:
            trailing = [int(s) for s in n.meta["val"].shape[2:]]  # must be static
            self.env[n] = emit_row_gather(self.graph, new[n], gather_index, trailing)

    def _attention_bias(self, dtype: torch.dtype) -> fx.Node:
        """[B, 1, 1, N] additive attention mask of ``dtype`` from ``key_mask``: 0 where a key is attended
        to, -inf where not (what SDPA makes of a boolean mask; as a float one, ONNX's attention needs no
        NaN guard over the scores)."""
        if dtype not in self._bias:
            padding = self.call(aten.logical_not.default, self.key_mask)
            zeros = self.call(aten.zeros_like.default, padding, dtype=dtype)
            bias = self.call(aten.masked_fill.Scalar, zeros, padding, float("-inf"))
            self._bias[dtype] = self.call(aten.unsqueeze.default, self.call(aten.unsqueeze.default, bias, 1), 1)
        return self._bias[dtype]

    def _scatter_index(self, heads: int, head_dim: int) -> fx.Node:
        key = (heads, head_dim)
        if key not in self._index4:
            self._index4[key] = emit_cache_row_index(self.graph, self.active_index, heads, head_dim)
        return self._index4[key]

    def cached(self, node: fx.Node, kind: str) -> fx.Node:
        """Scatter the active rows of K or V into a new cache input; return the N-row view attention reads."""
        val = node.meta["val"]
        spec = CacheSpec(cache_name(kind, len(self.specs) // 2), int(val.shape[1]), int(val.shape[3]), val.dtype)
        self.specs.append(spec)
        cache = self.graph.placeholder(spec.name)
        updated = self.call(aten.scatter.src, cache, 2, self._scatter_index(spec.heads, spec.head_dim), self.env[node])
        self.updated.append(updated)
        return self.call(aten.slice.Tensor, updated, 2, 0, -1)

    def attention(self, node: fx.Node) -> fx.Node:
        q, k, v = node.args[:3]
        kwargs = {k_: v_ for k_, v_ in node.kwargs.items() if k_ not in ("attn_mask", "is_causal", "dropout_p")}
        extra = dict(zip(("dropout_p", "is_causal", "scale"), node.args[4:7]))
        kwargs.update({k_: v_ for k_, v_ in extra.items() if k_ == "scale"})
        key, value = self.cached(k, "k"), self.cached(v, "v")
        bias = self._attention_bias(q.meta["val"].dtype)
        return self.call(SDPA, self.env[q], key, value, bias, **kwargs)


@graph_pass
def lock_rows(gm: fx.GraphModule) -> PassResult:
    """Rewrite a dense graph into its locked form: gather active rows, scatter K/V into caches.

    Precondition: a flat ATen graph captured with a symbolic sequence length (surelock_fx.capture),
    whose every op is row-wise except mask-free, non-causal scaled_dot_product_attention
    (check_row_wise proves it or names the offending node). The result has the signature of
    docs/DESIGN.md §4 (``surelock_fx.signature``): the original inputs, then ``active_index`` [B, M]
    (positions to compute; padding rows hold N, the scratch slot), ``key_mask`` [B, N] (bool, False for
    padding keys) and one cache [B, H, N + 1, D] per K and V of each attention; it returns the original
    outputs on the M rows followed by the updated caches. A graph that is already locked is returned
    unchanged.
    """
    if is_locked(gm):
        return PassResult(gm, False)
    check_row_wise(gm)
    seq = sequence_symbol(gm)
    builder = _Builder(gm)
    builder.inputs(token_inputs(gm, seq))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outputs = fx.map_arg(node.args[0], lambda n: builder.env[n])
            outputs = tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)
            builder.graph.output(outputs + tuple(builder.updated))
            continue
        if node.target is SDPA:
            builder.env[node] = builder.attention(node)
        else:
            builder.env[node] = builder.graph.node_copy(node, lambda n: builder.env[n])
    new_gm = fx.GraphModule(gm, builder.graph)
    new_gm.meta[CACHES_META] = builder.specs
    return PassResult(new_gm, True)
