"""index_copy_cache_updates: graph structure, idempotence, no-op cases, and numerics against the functional graph."""
from collections import Counter

import pytest
import torch

from surelock_fx.capture import capture
from surelock_fx.optimize import copy_graph_module
from surelock_fx.passes import cache_specs, index_copy_cache_updates, lock_rows, update_caches_in_place
from surelock_fx.passes.index_copy_cache_updates import INDEX_COPY
from surelock_fx.passes.update_caches_in_place import SCATTER_IN_PLACE

from helpers import tiny_model


def counts(gm):
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


@pytest.fixture(scope="module")
def locked():
    return lock_rows(capture(tiny_model(seed=6, n_layers=2, n_kv_heads=2)))


def rewritten(locked):
    return index_copy_cache_updates(update_caches_in_place(copy_graph_module(locked)))


def test_every_cache_update_is_an_index_copy(locked):
    gm = rewritten(locked)
    gm.graph.lint()
    caches = len(cache_specs(locked))
    assert counts(gm)[SCATTER_IN_PLACE] == 0 and counts(gm)[INDEX_COPY] == caches
    assert counts(gm)[torch.ops.aten.arange.default] == 1  # the flat rows, shared by caches of the same heads
    names = {spec.name for spec in cache_specs(gm)}
    cache_inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name in names]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert list(output.args[0][1:]) == cache_inputs  # returns its cache inputs, updated


def test_second_run_changes_nothing(locked):
    gm = rewritten(locked)
    code = gm.code
    assert index_copy_cache_updates(gm).code == code


@pytest.mark.parametrize("make", [lambda locked: copy_graph_module(locked), lambda locked: capture(tiny_model(seed=7))],
                         ids=["functional-locked-graph", "graph-not-locked"])
def test_graphs_without_in_place_cache_updates_are_left_alone(locked, make):
    gm = make(locked)
    code = gm.code
    assert index_copy_cache_updates(gm).code == code


@pytest.mark.parametrize("B, N, M", [(1, 7, 1), (3, 10, 10), (2, 12, 5)])
def test_index_copy_graph_matches_functional_and_updates_its_inputs(locked, B, N, M):
    gen = torch.Generator().manual_seed(B * N + M)
    index = torch.stack([torch.randperm(N, generator=gen)[:M].sort().values for _ in range(B)])
    index[-1, M // 2:] = N  # padding rows of the last batch row aim at the scratch slot
    caches = [torch.randn(B, s.heads, N + 1, s.head_dim, generator=gen) for s in cache_specs(locked)]
    inputs = (torch.randint(0, 97, (B, N), generator=gen), torch.arange(N).expand(B, N), index,
              torch.ones(B, N, dtype=torch.bool))
    with torch.no_grad():
        expected = locked(*inputs, *caches)
        got = rewritten(locked)(*inputs, *caches)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for out, cache, want in zip(got[1:], caches, expected[1:], strict=True):
        assert out is cache  # updated in place
        # every slot but the scratch slot, which padding rows write in an unspecified order
        torch.testing.assert_close(cache[:, :, :N], want[:, :, :N], rtol=1e-5, atol=1e-5)
