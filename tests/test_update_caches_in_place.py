"""update_caches_in_place: graph structure, idempotence, no-op cases, and numerics against the functional graph."""
from collections import Counter

import pytest
import torch

from surelock_fx.capture import capture
from surelock_fx.optimize import copy_graph_module
from surelock_fx.passes import cache_specs, lock_rows, update_caches_in_place
from surelock_fx.passes.update_caches_in_place import SCATTER, SCATTER_IN_PLACE

from helpers import tiny_model


def counts(gm):
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


@pytest.fixture(scope="module")
def locked():
    return lock_rows(capture(tiny_model(seed=6, n_layers=2, n_kv_heads=2)))


def test_every_cache_is_updated_in_place(locked):
    gm = update_caches_in_place(copy_graph_module(locked))
    gm.graph.lint()
    caches = len(cache_specs(locked))
    assert counts(locked)[SCATTER] == caches
    assert counts(gm)[SCATTER] == 0 and counts(gm)[SCATTER_IN_PLACE] == caches
    assert counts(locked)[SCATTER_IN_PLACE] == 0  # the copy was rewritten, not its source


def test_second_run_changes_nothing(locked):
    gm = update_caches_in_place(copy_graph_module(locked))
    code = gm.code
    assert update_caches_in_place(gm).code == code


def test_graph_that_is_not_locked_is_left_alone():
    gm = capture(tiny_model(seed=7))
    code = gm.code
    assert update_caches_in_place(gm).code == code


@pytest.mark.parametrize("B, N, M", [(1, 7, 1), (3, 10, 10), (2, 12, 5)])
def test_in_place_graph_matches_functional_and_returns_its_inputs(locked, B, N, M):
    gen = torch.Generator().manual_seed(B * N + M)
    index = torch.stack([torch.randperm(N, generator=gen)[:M].sort().values for _ in range(B)])
    index[-1, M // 2:] = N  # padding rows of the last batch row aim at the scratch slot
    caches = [torch.randn(B, s.heads, N + 1, s.head_dim, generator=gen) for s in cache_specs(locked)]
    inputs = (torch.randint(0, 97, (B, N), generator=gen), torch.arange(N).expand(B, N), index,
              torch.ones(B, N, dtype=torch.bool))
    with torch.no_grad():
        expected = locked(*inputs, *caches)
        got = update_caches_in_place(copy_graph_module(locked))(*inputs, *caches)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for out, cache, want in zip(got[1:], caches, expected[1:], strict=True):
        assert out is cache  # updated in place
        torch.testing.assert_close(cache, want, rtol=1e-5, atol=1e-5)
