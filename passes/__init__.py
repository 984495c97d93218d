"""Graph -> graph FX passes: pure functions of a GraphModule, no runtime state (docs/DESIGN.md §5).

One module per pass; ``pass_base`` holds what they share and ``pipeline`` the pipelines they run in.
"""
from .detach_full_attention_masks import detach_full_attention_masks
from .index_copy_cache_updates import index_copy_cache_updates
from .lock_rows import copy_graph_module, lock_rows
from .pack_rows import pack_rows
from .pass_base import GraphPass, PassResult, graph_pass
from .pipeline import run_pipeline
from .prepack_linear_weights import prepack_linear_weights
from .realize_reused_trig import realize_reused_trig
from .remove_metadata_asserts import remove_metadata_asserts
from .row_analysis import UnsupportedGraphError, check_row_wise
from .update_caches_in_place import update_caches_in_place

__all__ = [
    "GraphPass",
    "PassResult",
    "UnsupportedGraphError",
    "check_row_wise",
    "copy_graph_module",
    "detach_full_attention_masks",
    "graph_pass",
    "index_copy_cache_updates",
    "lock_rows",
    "pack_rows",
    "prepack_linear_weights",
    "realize_reused_trig",
    "remove_metadata_asserts",
    "run_pipeline",
    "update_caches_in_place",
]
