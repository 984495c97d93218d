"""Remove export's tensor-metadata asserts, which pin the dtype and device seen at capture."""
from __future__ import annotations

import torch
from torch import fx

from .pass_base import PassResult, graph_pass

ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


@graph_pass
def remove_metadata_asserts(gm: fx.GraphModule) -> PassResult:
    """Erase ``_assert_tensor_metadata`` nodes so the graph runs on any device and dtype.

    Precondition: none; a graph without such nodes is returned unchanged.
    """
    asserts = [n for n in gm.graph.nodes if n.target in ASSERTS]
    for node in asserts:
        gm.graph.erase_node(node)
    return PassResult(gm, bool(asserts))
