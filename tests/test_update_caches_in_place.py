"""update_caches_in_place: graph structure, idempotence, no-op cases, and numerics against the functional graph."""

import pytest

from surelock_fx.passes import copy_graph_module, update_caches_in_place
from surelock_fx.passes.update_caches_in_place import SCATTER, SCATTER_IN_PLACE
from surelock_fx.signature import cache_specs

from helpers import assert_in_place_graph_matches_functional, assert_unchanged_by, captured, counts, shared_tiny_model


@pytest.fixture(scope="module")
def locked():
    return captured(shared_tiny_model(6, n_layers=2, n_kv_heads=2))


def test_every_cache_is_updated_in_place(locked):
    gm = update_caches_in_place(copy_graph_module(locked))
    gm.graph.lint()
    caches = len(cache_specs(locked))
    assert counts(locked)[SCATTER] == caches
    assert counts(gm)[SCATTER] == 0 and counts(gm)[SCATTER_IN_PLACE] == caches
    assert counts(locked)[SCATTER_IN_PLACE] == 0  # the copy was rewritten, not its source


def test_second_run_changes_nothing(locked):
    gm = update_caches_in_place(copy_graph_module(locked))
    assert_unchanged_by(update_caches_in_place, gm)


def test_graph_that_is_not_locked_is_left_alone():
    gm = captured(shared_tiny_model(7), locked=False)
    assert_unchanged_by(update_caches_in_place, gm)


@pytest.mark.parametrize("B, N, M", [(1, 7, 1), (3, 10, 10), (2, 12, 5)])
def test_in_place_graph_matches_functional_and_returns_its_inputs(locked, B, N, M):
    assert_in_place_graph_matches_functional(locked, update_caches_in_place(copy_graph_module(locked)), B, N, M)
