"""The pass pipelines, declared in one place (docs/DESIGN.md §5).

Each pipeline is a tuple of passes run in order by ``run_pipeline``, which first checks the order
constraints the passes declare (``GraphPass.after``). The locked graph is built once:

    CAPTURE      after torch.export: export's metadata asserts, attention masks that mask nothing
    LOCK         the rewrite to active rows and K/V caches (the functional locked graph)

and every form of it that runs or is exported starts from a copy of that graph:

    RUN_PADDED   in process, the B x M entries of the active index: caches updated in place
    RUN_PACKED   in process, the real rows only (``pack_rows``), caches updated in place
    EXPORT_PADDED / EXPORT_PACKED   the functional forms that torch.export, ONNX and TensorRT take

followed by a backend's tail: ``EAGER_TAIL`` (prepacked oneDNN weights) or ``INDUCTOR_TAIL`` (rotary
tables computed once a pass, before torch.compile).
"""
from __future__ import annotations

from typing import Sequence

from torch import fx

from .detach_full_attention_masks import detach_full_attention_masks
from .index_copy_cache_updates import index_copy_cache_updates
from .lock_rows import copy_graph_module, lock_rows
from .pack_rows import pack_rows
from .pass_base import GraphPass
from .prepack_linear_weights import prepack_linear_weights
from .realize_reused_trig import realize_reused_trig
from .remove_metadata_asserts import remove_metadata_asserts
from .update_caches_in_place import update_caches_in_place

Pipeline = Sequence[GraphPass]

CAPTURE: Pipeline = (remove_metadata_asserts, detach_full_attention_masks)
LOCK: Pipeline = (lock_rows,)
RUN_PADDED: Pipeline = (update_caches_in_place, index_copy_cache_updates)
RUN_PACKED: Pipeline = (update_caches_in_place, pack_rows, index_copy_cache_updates)
EXPORT_PADDED: Pipeline = (index_copy_cache_updates,)
EXPORT_PACKED: Pipeline = (pack_rows, index_copy_cache_updates)
EAGER_TAIL: Pipeline = (prepack_linear_weights,)
INDUCTOR_TAIL: Pipeline = (realize_reused_trig,)


def check_order(pipeline: Pipeline) -> None:
    """Raise ValueError if a pass comes before one that it must run after (``GraphPass.after``)."""
    for i, graph_pass in enumerate(pipeline):
        late = [p.name for p in pipeline[i + 1:] if p.name in graph_pass.after]
        if late:
            raise ValueError(f"pipeline {[p.name for p in pipeline]}: {graph_pass.name} must run after {late}")


def run_pipeline(gm: fx.GraphModule, pipeline: Pipeline) -> fx.GraphModule:
    """``gm`` through every pass of ``pipeline`` in order (passes rewrite it in place or return a new one)."""
    check_order(pipeline)
    for graph_pass in pipeline:
        gm = graph_pass(gm)
    return gm


def running_form(locked: fx.GraphModule, packed: bool) -> fx.GraphModule:
    """The in-process form of a functional locked graph, on a copy sharing its weights (``locked`` stays
    functional, for export): ``RUN_PACKED`` if ``packed``, else ``RUN_PADDED``."""
    return run_pipeline(copy_graph_module(locked), RUN_PACKED if packed else RUN_PADDED)


def export_form(locked: fx.GraphModule, packed: bool) -> fx.GraphModule:
    """The functional form of a locked graph that export takes, on a copy: ``EXPORT_PACKED`` or ``EXPORT_PADDED``."""
    return run_pipeline(copy_graph_module(locked), EXPORT_PACKED if packed else EXPORT_PADDED)
