"""Remove export's tensor-metadata asserts, which pin the dtype and device seen at capture."""
from __future__ import annotations

import torch
from torch import fx

ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


def remove_metadata_asserts(gm: fx.GraphModule) -> fx.GraphModule:
    """Erase ``_assert_tensor_metadata`` nodes so the graph runs on any device and dtype.

    Precondition: none; a graph without such nodes is returned unchanged.
    """
    for node in [n for n in gm.graph.nodes if n.target in ASSERTS]:
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
