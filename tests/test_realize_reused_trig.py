"""realize_reused_trig: graph structure, idempotence, no-op cases, numerics against the graph it rewrites,
and inductor computing the rotary tables once."""

import re

import pytest
import torch

from surelock_fx.backends.inductor import FrozenInductor
from surelock_fx.capture import capture
from surelock_fx.passes import copy_graph_module, lock_rows, realize_reused_trig
from surelock_fx.passes.realize_reused_trig import REALIZE, TRIG

from helpers import assert_unchanged_by, captured, counts, hf_llama_from_llada, locked_inputs, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=12, n_layers=2, n_kv_heads=2)


def trig_users(gm) -> list[int]:
    return [len(n.users) for n in gm.graph.nodes if n.target in TRIG]


def test_each_reused_cos_and_sin_is_read_through_one_realize(model):
    gm = captured(model)
    assert trig_users(gm) == [2 * model.config.n_layers] * 2  # one cos, one sin: queries and keys of every layer
    realized = realize_reused_trig(copy_graph_module(gm))
    realized.graph.lint()
    assert trig_users(realized) == [1, 1]
    assert counts(realized)[REALIZE] == 2 and counts(gm)[REALIZE] == 0
    for node in realized.graph.nodes:
        if node.target is REALIZE:
            assert node.args[0].target in TRIG and len(node.users) == 2 * model.config.n_layers
            assert node.meta["val"].shape == node.args[0].meta["val"].shape


def test_rescaled_tables_of_transformers_llama_are_realized_after_the_scaling(model):
    """transformers' rotary embedding returns cos * attention_scaling: the product is what layers read."""
    gm = lock_rows(capture(hf_llama_from_llada(model)))
    realized = realize_reused_trig(copy_graph_module(gm))
    realized.graph.lint()
    tables = [n.args[0] for n in realized.graph.nodes if n.target is REALIZE]
    assert len(tables) == 2 and all(t.target is torch.ops.aten.mul.Tensor for t in tables)
    assert {t.args[0].target for t in tables} == set(TRIG) and all(len(t.users) == 1 for t in tables)
    inputs = locked_inputs(gm, 10, [4, 10], torch.Generator().manual_seed(14))
    with torch.no_grad():
        for expected, got in zip(gm(*inputs), realized(*inputs), strict=True):
            assert torch.equal(got, expected)
    assert_unchanged_by(realize_reused_trig, realized)


def test_second_run_changes_nothing(model):
    assert_unchanged_by(realize_reused_trig, realize_reused_trig(captured(model, locked=False)))


def test_cos_read_once_and_graph_without_trig_are_left_alone():
    class OneReader(torch.nn.Module):
        def forward(self, x):
            return x.cos() * 2, (x * 3).relu()

    gm = torch.export.export(OneReader(), (torch.randn(3, 4),)).module()
    before = counts(gm)
    assert counts(realize_reused_trig(gm)) == before and before[REALIZE] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_realized_graph_equals_the_graph_it_rewrites(dtype):
    model = tiny_model(seed=13, n_layers=2).to(dtype)
    gm = lock_rows(capture(model))
    realized = realize_reused_trig(copy_graph_module(gm))
    inputs = locked_inputs(gm, 10, [4, 10], torch.Generator().manual_seed(13), dtype)
    with torch.no_grad():
        for expected, got in zip(gm(*inputs), realized(*inputs), strict=True):
            assert torch.equal(got, expected)  # the op is a copy: same ops, same values


def kernels_computing(code: str, op: str) -> int:
    """How many generated C++ kernels of inductor's ``code`` call ``op``."""
    kernels = code.split("async_compile.cpp_pybinding")[1:]
    return sum(bool(re.search(rf"\b{op}\(|\.{op}\(", kernel)) for kernel in kernels)


def test_inductor_computes_the_rotary_tables_in_one_kernel(model):
    """Without the pass inductor recomputes cos and sin in every layer's query and key kernels."""
    from torch._inductor.utils import run_and_get_code

    gm = captured(model)
    inputs = locked_inputs(gm, 9, [4, 9], torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, plain = run_and_get_code(FrozenInductor(copy_graph_module(gm)), *inputs)
        _, realized = run_and_get_code(FrozenInductor(realize_reused_trig(copy_graph_module(gm))), *inputs)
    assert kernels_computing("".join(plain), "cos") >= model.config.n_layers
    assert kernels_computing("".join(realized), "cos") == 1 and kernels_computing("".join(realized), "sin") == 1
