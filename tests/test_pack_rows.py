"""pack_rows: graph structure, idempotence, no-op cases, pack_index, and numerics against the unpacked locked graph."""

import pytest
import torch

from surelock_fx.passes import copy_graph_module, pack_rows, update_caches_in_place
from surelock_fx.signature import SDPA, cache_specs, is_packed, pack_index

from helpers import assert_unchanged_by, captured, counts, locked_inputs, run_locked, shared_tiny_model

aten = torch.ops.aten
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


LAYERS = 2


def locked_graph(dtype=torch.float32):
    """A fresh copy of the module's locked graph in ``dtype`` (captured once: helpers.captured)."""
    return captured(shared_tiny_model(9, dtype, n_layers=LAYERS, n_kv_heads=2))


def test_packed_graph_structure():
    locked = locked_graph()
    gm = pack_rows(copy_graph_module(locked))
    gm.graph.lint()
    before, after = counts(locked), counts(gm)
    # one per token input, then per attention: unpack its query, key and value, pack its output
    assert after[aten.index_select.default] - before[aten.index_select.default] == 2 + 4 * LAYERS
    for target in (SDPA, aten.linear.default, aten.gather.default, aten.scatter.src):
        assert after[target] == before[target]
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert names[:6] == ["input_ids", "position_ids", "active_index", "key_mask", "packed_rows", "unpack_index"]
    assert names[6:] == [spec.name for spec in cache_specs(locked)]
    assert is_packed(gm) and not is_packed(locked)


def test_second_run_changes_nothing():
    gm = pack_rows(locked_graph())
    assert_unchanged_by(pack_rows, gm)


def test_graph_not_locked_is_left_alone():
    gm = captured(shared_tiny_model(9), locked=False)
    assert_unchanged_by(pack_rows, gm)


def test_pack_index():
    N = 5
    index = torch.tensor([[0, 3, N], [N, N, N], [1, 2, 4]])
    rows, unpack = pack_index(index, N)
    assert rows.tolist() == [0, 1, 6, 7, 8]
    assert unpack[index < N].tolist() == [0, 1, 2, 3, 4]
    assert (unpack >= 0).all() and (unpack < len(rows)).all()
    rows, unpack = pack_index(torch.full((2, 1), N), N)  # nothing active: one padding entry runs
    assert rows.tolist() == [0] and unpack.tolist() == [[0], [0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place_first", [False, True], ids=["functional", "in-place-caches"])
@pytest.mark.parametrize("N, active", [(9, [3]), (12, [1, 12, 5]), (10, [4, 0, 7, 2]), (6, [0, 0])])
def test_packed_graph_matches_unpacked(dtype, in_place_first, N, active):
    """Real rows' logits and every cache row but the scratch slot equal the unpacked graph's, with batch
    rows of different active counts (none at all included)."""
    locked = locked_graph(dtype)
    packed = copy_graph_module(locked)
    packed = pack_rows(update_caches_in_place(packed)) if in_place_first else pack_rows(packed)
    inputs = locked_inputs(locked, N, active, torch.Generator().manual_seed(N + sum(active)), dtype)
    with torch.no_grad():
        expected, expected_caches = run_locked(locked, inputs, rows_packed=False)
        fresh = tuple(t.clone() for t in inputs)  # the in-place graph writes its cache inputs
        got, got_caches = run_locked(packed, fresh, rows_packed=True)
    tol = TOLERANCE[dtype]
    real = inputs[2] < N
    torch.testing.assert_close(got[real], expected[real], rtol=tol, atol=tol)
    for cache, want in zip(got_caches, expected_caches, strict=True):
        torch.testing.assert_close(cache[:, :, :N], want[:, :, :N], rtol=tol, atol=tol)


@pytest.mark.parametrize("counts", [[3, 1, 0], [0, 0], [4, 4]])
def test_pack_index_given_the_real_count_reads_nothing_back_and_agrees(counts):
    """``pack_index(index, N, real)`` (nonzero_static, no device sync) gives what the nonzero path gives."""
    N, M = 6, max(max(counts), 1)
    index = torch.full((len(counts), M), N)
    for b, count in enumerate(counts):
        index[b, :count] = torch.arange(count)
    for got, want in zip(pack_index(index, N, sum(counts)), pack_index(index, N), strict=True):
        assert torch.equal(got, want)
