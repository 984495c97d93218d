"""Graph -> graph FX passes: pure functions of a GraphModule, no runtime state."""
from .detach_full_attention_masks import detach_full_attention_masks
from .index_copy_cache_updates import index_copy_cache_updates
from .lock_rows import CacheSpec, cache_specs, copy_graph_module, is_locked, lock_rows
from .pack_rows import is_packed, pack_rows
from .prepack_linear_weights import prepack_linear_weights
from .realize_reused_trig import realize_reused_trig
from .remove_metadata_asserts import remove_metadata_asserts
from .row_analysis import UnsupportedGraphError, check_row_wise
from .update_caches_in_place import update_caches_in_place

__all__ = [
    "CacheSpec",
    "UnsupportedGraphError",
    "cache_specs",
    "check_row_wise",
    "copy_graph_module",
    "detach_full_attention_masks",
    "index_copy_cache_updates",
    "is_locked",
    "is_packed",
    "lock_rows",
    "pack_rows",
    "prepack_linear_weights",
    "realize_reused_trig",
    "remove_metadata_asserts",
    "update_caches_in_place",
]
