"""Prepack constant CPU linear weights once into oneDNN's blocked layout."""
from __future__ import annotations

import operator

import torch
from torch import fx

from .pass_base import PassResult, graph_pass

LINEAR = torch.ops.aten.linear.default
PREPACKED_LINEAR = torch.ops.mkldnn._linear_pointwise.default
ROWS_HINT = 64  # oneDNN picks the blocked layout for this many rows; any row count runs on it


def prepackable_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes oneDNN prepacks on this CPU: float32, and bfloat16 where the CPU has the instructions
    oneDNN's bfloat16 GEMM needs (AVX512-BW/VL/DQ or AVX-NE-CONVERT on x86; without them it refuses)."""
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def _prepackable_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The constant weight of ``node`` if it is a linear oneDNN can run from a prepacked copy, else None."""
    if node.target is not LINEAR or node.args[1].op != "get_attr":
        return None
    weight = operator.attrgetter(node.args[1].target)(gm)
    if weight.device.type != "cpu" or weight.dtype not in prepackable_dtypes() or weight.dim() != 2:
        return None
    x = node.args[0].meta.get("val")
    if x is None or x.dtype != weight.dtype:
        return None
    return weight


@graph_pass
def prepack_linear_weights(gm: fx.GraphModule) -> PassResult:
    """Run every CPU linear with a constant float32/bfloat16 weight through oneDNN
    (``mkldnn._linear_pointwise``) on a copy of that weight prepacked once into oneDNN's blocked layout.

    The prepacked GEMM keeps its throughput down to a few rows, where ``aten.linear``'s BLAS GEMM loses
    much of it (``benchmarks/step_latency.py`` measures both); few rows are what the locked graph runs at
    small active fractions. Preconditions: weights are get_attr constants with ``meta["val"]`` on their
    inputs (torch.export); other devices and dtypes (bfloat16 on CPUs without oneDNN's bfloat16 support:
    ``prepackable_dtypes``), weights computed in the graph, and builds of torch without oneDNN are left
    unchanged. The prepacked copies are non-persistent buffers in oneDNN's opaque layout (not in the state
    dict, not movable to another device), so the pass is for running a graph on this CPU, not for
    exporting it. ("Prepacked" names this weight layout; "packed" rows are ``pack_rows``'.)
    """
    if not torch.backends.mkldnn.is_available():
        return PassResult(gm, False)
    prepacked: dict[str, str] = {}  # weight attribute -> its prepacked copy's attribute
    for node in list(gm.graph.nodes):
        weight = _prepackable_weight(gm, node)
        if weight is None:
            continue
        source = node.args[1].target
        if source not in prepacked:
            prepacked[source] = f"_prepacked_{source.replace('.', '_')}"
            gm.register_buffer(prepacked[source],
                               torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT), persistent=False)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with gm.graph.inserting_before(node):
            weight_node = gm.graph.get_attr(prepacked[source])
            new = gm.graph.call_function(PREPACKED_LINEAR, (node.args[0], weight_node, bias, "none", [], ""))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    return PassResult(gm, bool(prepacked))
