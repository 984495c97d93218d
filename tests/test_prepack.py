"""prepack_linear_weights: graph structure, idempotence, no-op cases, numerics against the unpacked graph,
and the compiled backends (eager with packed weights, inductor with frozen ones) against the locking semantics."""

import pytest
import torch
import torch.nn.functional as F

from surelock_fx.capture import capture
from surelock_fx.optimize import compile_graph, copy_graph_module
from surelock_fx.passes import prepack_linear_weights
from surelock_fx.passes.prepack_linear_weights import LINEAR, PACKED_LINEAR

from helpers import captured, counts, locked_inputs, shared_tiny_model, tiny_model
from test_passes import check_against_reference, compiled_with_specs

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="prepacking needs a torch build with oneDNN (mkldnn)")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, n_layers=2, n_kv_heads=2)


def test_every_linear_runs_on_a_packed_weight(model):
    gm = captured(model)
    linears = counts(gm)[LINEAR]
    packed = prepack_linear_weights(gm)
    packed.graph.lint()
    assert linears == 7 * model.config.n_layers + 1
    assert counts(packed)[LINEAR] == 0 and counts(packed)[PACKED_LINEAR] == linears
    buffers = dict(packed.named_buffers())
    assert sum(name.startswith("_packed_") for name in buffers) == linears
    assert all(b.layout == torch._mkldnn for name, b in buffers.items() if name.startswith("_packed_"))
    assert not any(key.startswith("_packed_") for key in packed.state_dict())  # not persistent


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
def test_bfloat16_is_packed_only_where_onednn_supports_it(supported, monkeypatch):
    if supported and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU lacks oneDNN's bfloat16 support (AVX512-BW/VL/DQ or AVX-NE-CONVERT)")
    gm = captured(shared_tiny_model(5, torch.bfloat16))
    linears = counts(gm)[LINEAR]
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: supported)
    packed = prepack_linear_weights(gm)
    assert counts(packed)[PACKED_LINEAR] == (linears if supported else 0)
    assert counts(packed)[LINEAR] == (0 if supported else linears)


def test_without_onednn_nothing_changes(model, monkeypatch):
    gm = captured(model)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert counts(prepack_linear_weights(gm))[LINEAR] == 7 * model.config.n_layers + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, N, M", [(1, 9, 1), (3, 11, 11), (2, 16, 5)])
def test_packed_graph_matches_unpacked(dtype, B, N, M):
    gm = captured(shared_tiny_model(5, dtype))
    packed = prepack_linear_weights(copy_graph_module(gm))
    gen = torch.Generator().manual_seed(B * N * M)
    inputs = locked_inputs(gm, N, [M] * B, gen, dtype)
    with torch.no_grad():
        expected, got = gm(*inputs), packed(*inputs)
    tol = TOLERANCE[dtype]
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


def test_compile_graph_leaves_its_input_exportable(model):
    gm = captured(model)
    code = gm.code
    compile_graph(gm, "eager")
    assert gm.code == code and counts(gm)[PACKED_LINEAR] == 0


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_backends_match_reference_semantics(backend, packed):
    model = shared_tiny_model(9, n_layers=1, n_kv_heads=2, d_model=32)
    gm = captured(model)
    check_against_reference(model, compiled_with_specs(compile_graph(gm, backend, packed), gm), 3, 10, [2, 10, 0],
                            seed=9, rows_packed=packed)


@pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.enable_grad])  # generate's, and a direct call's
def test_inductor_backend_packs_every_linear(model, grad_mode):
    from torch._dynamo.utils import counters

    gm = captured(model)
    before = counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"]
    with grad_mode():
        compile_graph(gm, "inductor")(*locked_inputs(gm, 9, [4, 4], torch.Generator().manual_seed(0)))
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] - before == counts(gm)[LINEAR]
