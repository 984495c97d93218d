"""prepack_linear_weights: graph structure, idempotence, no-op cases, numerics against the unprepacked graph,
and the compiled backends (eager with prepacked weights, inductor with frozen ones) against the locking semantics."""

import pytest
import torch
import torch.nn.functional as F

from surelock_fx.backends import get_backend
from surelock_fx.capture import capture
from surelock_fx.passes import copy_graph_module, prepack_linear_weights
from surelock_fx.passes.prepack_linear_weights import LINEAR, PREPACKED_LINEAR

from helpers import captured, counts, locked_inputs, shared_tiny_model, tiny_model
from test_passes import check_against_reference, compiled_with_specs

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="prepacking needs a torch build with oneDNN (mkldnn)")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, n_layers=2, n_kv_heads=2)


@pytest.fixture
def one_layer_model():
    """The compiled-backend tests' model: one layer, d_model 32 (an inductor compile takes seconds a layer)."""
    return shared_tiny_model(9, n_layers=1, n_kv_heads=2, d_model=32)


def test_every_linear_runs_on_a_prepacked_weight(model):
    gm = captured(model)
    linears = counts(gm)[LINEAR]
    prepacked = prepack_linear_weights(gm)
    prepacked.graph.lint()
    assert linears == 7 * model.config.n_layers + 1
    assert counts(prepacked)[LINEAR] == 0 and counts(prepacked)[PREPACKED_LINEAR] == linears
    buffers = dict(prepacked.named_buffers())
    assert sum(name.startswith("_prepacked_") for name in buffers) == linears
    assert all(b.layout == torch._mkldnn for name, b in buffers.items() if name.startswith("_prepacked_"))
    assert not any(key.startswith("_prepacked_") for key in prepacked.state_dict())  # not persistent


def test_second_run_changes_nothing(model):
    gm = prepack_linear_weights(captured(model))
    code, buffers = gm.code, len(list(gm.buffers()))
    assert prepack_linear_weights(gm).code == code
    assert len(list(gm.buffers())) == buffers


def test_float64_graph_is_left_alone():
    gm = capture(tiny_model(seed=4).double())
    before = counts(gm)
    assert counts(prepack_linear_weights(gm)) == before


def test_weight_computed_in_the_graph_is_left_alone():
    class ScaledWeight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(6, 4))

        def forward(self, x):
            return F.linear(x, self.weight * 2)

    gm = torch.export.export(ScaledWeight(), (torch.randn(3, 4),)).run_decompositions({}).module()
    assert counts(prepack_linear_weights(gm))[LINEAR] == 1


@pytest.mark.parametrize("supported", [True, False])
def test_bfloat16_is_prepacked_only_where_onednn_supports_it(supported, monkeypatch):
    if supported and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU lacks oneDNN's bfloat16 support (AVX512-BW/VL/DQ or AVX-NE-CONVERT)")
    gm = captured(shared_tiny_model(5, torch.bfloat16))
    linears = counts(gm)[LINEAR]
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: supported)
    prepacked = prepack_linear_weights(gm)
    assert counts(prepacked)[PREPACKED_LINEAR] == (linears if supported else 0)
    assert counts(prepacked)[LINEAR] == (0 if supported else linears)


def test_without_onednn_nothing_changes(model, monkeypatch):
    gm = captured(model)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert counts(prepack_linear_weights(gm))[LINEAR] == 7 * model.config.n_layers + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, N, M", [(1, 9, 1), (3, 11, 11), (2, 16, 5)])
def test_prepacked_graph_matches_unprepacked(dtype, B, N, M):
    gm = captured(shared_tiny_model(5, dtype))
    prepacked = prepack_linear_weights(copy_graph_module(gm))
    gen = torch.Generator().manual_seed(B * N * M)
    inputs = locked_inputs(gm, N, [M] * B, gen, dtype)
    with torch.no_grad():
        expected, got = gm(*inputs), prepacked(*inputs)
    tol = TOLERANCE[dtype]
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


def test_compiling_leaves_its_input_exportable(model):
    gm = captured(model)
    code = gm.code
    get_backend("eager").compile(gm)
    assert gm.code == code and counts(gm)[PREPACKED_LINEAR] == 0


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_backends_match_reference_semantics(one_layer_model, backend, packed):
    gm = captured(one_layer_model)
    check_against_reference(one_layer_model, compiled_with_specs(get_backend(backend).compile(gm, packed), gm), 3, 10,
                            [2, 10, 0], seed=9, rows_packed=packed)


@pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.enable_grad])  # generate's, and a direct call's
def test_inductor_backend_packs_every_linear(one_layer_model, grad_mode):
    from torch._dynamo.utils import counters

    gm = captured(one_layer_model)
    before = counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"]
    with grad_mode():
        get_backend("inductor").compile(gm)(*locked_inputs(gm, 9, [4, 4], torch.Generator().manual_seed(0)))
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] - before == counts(gm)[LINEAR]
