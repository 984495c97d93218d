"""index_copy_cache_updates: graph structure, idempotence, no-op cases, and numerics against the scatter graph,
for in-place (the in-process backends') and functional (export's) cache updates."""

import re

import pytest
import torch

from surelock_fx.backends import get_backend
from surelock_fx.passes import copy_graph_module, index_copy_cache_updates, update_caches_in_place
from surelock_fx.passes.index_copy_cache_updates import INDEX_COPY, INDEX_COPY_FUNCTIONAL
from surelock_fx.passes.update_caches_in_place import SCATTER, SCATTER_IN_PLACE
from surelock_fx.signature import cache_specs

from helpers import (
    assert_in_place_graph_matches_functional,
    assert_unchanged_by,
    captured,
    counts,
    locked_inputs,
    shared_tiny_model,
)


@pytest.fixture(scope="module")
def locked():
    return captured(shared_tiny_model(6, n_layers=2, n_kv_heads=2))


def rewritten(locked, in_place: bool = True):
    gm = copy_graph_module(locked)
    return index_copy_cache_updates(update_caches_in_place(gm) if in_place else gm)


@pytest.mark.parametrize("in_place, scatter, index_copy", [(True, SCATTER_IN_PLACE, INDEX_COPY),
                                                           (False, SCATTER, INDEX_COPY_FUNCTIONAL)],
                         ids=["in-place", "functional"])
def test_every_cache_update_is_an_index_copy(locked, in_place, scatter, index_copy):
    gm = rewritten(locked, in_place)
    gm.graph.lint()
    caches = len(cache_specs(locked))
    assert counts(gm)[scatter] == 0 and counts(gm)[index_copy] == caches
    assert counts(gm)[torch.ops.aten.arange.default] == 1  # the flat rows, shared by caches of the same heads
    names = {spec.name for spec in cache_specs(gm)}
    cache_inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name in names]
    returned = next(n for n in gm.graph.nodes if n.op == "output").args[0][1:]
    if in_place:
        assert list(returned) == cache_inputs  # returns its cache inputs, updated
    else:
        assert all(out.args[0].target is index_copy for out in returned)  # new caches, viewed back


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "functional"])
def test_second_run_changes_nothing(locked, in_place):
    assert_unchanged_by(index_copy_cache_updates, rewritten(locked, in_place))


def test_graphs_not_locked_are_left_alone():
    assert_unchanged_by(index_copy_cache_updates, captured(shared_tiny_model(7), locked=False))


def test_scatter_with_another_index_is_left_alone(locked):
    """Only scatters whose index is the active rows (as lock_rows emits it) are rewritten."""
    gm = update_caches_in_place(copy_graph_module(locked))
    scatter = next(n for n in gm.graph.nodes if n.target is SCATTER_IN_PLACE)
    with gm.graph.inserting_before(scatter):
        other = gm.graph.call_function(torch.ops.aten.clone.default, (scatter.args[2],))
    scatter.args = (scatter.args[0], scatter.args[1], other, scatter.args[3])
    gm.recompile()
    gm = index_copy_cache_updates(gm)
    assert counts(gm)[SCATTER_IN_PLACE] == 1 and counts(gm)[INDEX_COPY] == len(cache_specs(locked)) - 1


@pytest.mark.parametrize("B, N, M", [(1, 7, 1), (3, 10, 10), (2, 12, 5)])
def test_index_copy_graph_matches_functional_and_updates_its_inputs(locked, B, N, M):
    assert_in_place_graph_matches_functional(locked, rewritten(locked), B, N, M)


@pytest.mark.parametrize("B, N, M", [(1, 7, 1), (3, 10, 10), (2, 12, 5)])
def test_functional_index_copy_graph_matches_scatter_graph_and_keeps_its_inputs(locked, B, N, M):
    gen = torch.Generator().manual_seed(B * N + M)
    inputs = locked_inputs(locked, N, [M] * (B - 1) + [M // 2 + 1], gen)
    kept = [t.clone() for t in inputs]
    with torch.no_grad():
        want, got = locked(*inputs), rewritten(locked, in_place=False)(*inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for cache, expected in zip(got[1:], want[1:], strict=True):  # slot N: scratch, written in any order
        torch.testing.assert_close(cache[:, :, :N], expected[:, :, :N], rtol=0, atol=0)
    for given, before in zip(inputs, kept):
        assert torch.equal(given, before)  # functional: its inputs are left as they were


def test_inductor_writes_the_cache_rows_in_place(locked):
    """Inductor compiles a scatter_ into a cache input as a scatter into a copy of the whole cache and a
    copy back; the compiled backend's cache updates are index_copy_ in place."""
    from torch._inductor.utils import run_and_get_code

    inputs = locked_inputs(locked, 9, [3, 3], torch.Generator().manual_seed(4))
    caches = inputs[4:]
    expected = locked(*inputs[:4], *[c.clone() for c in caches])  # the functional graph
    torch._dynamo.reset()
    with torch.inference_mode():
        out, code = run_and_get_code(get_backend("inductor").compile(locked), *inputs)
    # inductor names its kernels after the ops they fuse: the cache rows are index-copied, not scattered
    kernels = set(re.findall(r"cpp_fused_(\w+)_\d+\(", "\n".join(code)))
    assert kernels and not any("scatter" in k for k in kernels) and any("index_copy" in k for k in kernels)
    assert [c.data_ptr() for c in out[1:]] == [c.data_ptr() for c in caches]
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want)
