"""The declared pass pipelines and what every pass shares: results, the finish, order checks, the debug switch,
and the row patterns that lock_rows emits and later passes recognise (surelock_fx.signature)."""
import logging

import pytest

from surelock_fx.passes import (
    index_copy_cache_updates,
    lock_rows,
    pack_rows,
    pass_base,
    prepack_linear_weights,
    realize_reused_trig,
    update_caches_in_place,
)
from surelock_fx.passes.pipeline import (
    CAPTURE,
    EAGER_TAIL,
    EXPORT_PACKED,
    EXPORT_PADDED,
    INDUCTOR_TAIL,
    LOCK,
    RUN_PACKED,
    RUN_PADDED,
    check_order,
    run_pipeline,
)
from surelock_fx.passes.update_caches_in_place import SCATTER, SCATTER_IN_PLACE
from surelock_fx.signature import (
    ACTIVE_INDEX,
    cache_specs,
    input_node,
    is_cache_row_index,
    is_row_gather,
    token_input_names,
)

from helpers import captured, counts, shared_tiny_model

PIPELINES = dict(CAPTURE=CAPTURE, LOCK=LOCK, RUN_PADDED=RUN_PADDED, RUN_PACKED=RUN_PACKED, EXPORT_PADDED=EXPORT_PADDED,
                 EXPORT_PACKED=EXPORT_PACKED, EAGER_TAIL=EAGER_TAIL, INDUCTOR_TAIL=INDUCTOR_TAIL)


@pytest.fixture(scope="module")
def model():
    return shared_tiny_model(0)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_declared_pipelines_are_in_a_valid_order(name):
    check_order(PIPELINES[name])


def test_a_pass_before_one_it_must_follow_is_refused():
    with pytest.raises(ValueError, match="index_copy_cache_updates must run after"):
        check_order((index_copy_cache_updates, pack_rows))
    with pytest.raises(ValueError, match="must run after"):
        run_pipeline(None, (index_copy_cache_updates, update_caches_in_place))


def test_lock_rows_emits_the_row_patterns_the_later_passes_recognise(model):
    """Every cache scatter's index and every token gather of lock_rows' output are the shared helpers'
    patterns: an emitter that changed them alone would make index_copy_cache_updates and pack_rows no-ops."""
    gm = captured(model)
    active_index = input_node(gm.graph, ACTIVE_INDEX)
    scatters = [n for n in gm.graph.nodes if n.target is SCATTER]
    assert len(scatters) == len(cache_specs(gm)) == 2 * model.config.n_layers
    assert all(is_cache_row_index(n.args[2], active_index) for n in scatters)
    gathers = [n for n in gm.graph.nodes if is_row_gather(n, active_index)]
    assert len(gathers) == len(token_input_names(gm)) == 2


@pytest.mark.parametrize("pipeline", ["RUN_PADDED", "RUN_PACKED", "EXPORT_PADDED", "EXPORT_PACKED"])
def test_every_pass_of_a_locked_form_changes_the_locked_graph(model, pipeline):
    """On lock_rows' output each pass of each form finds its pattern, and no cache scatter is left."""
    gm = captured(model)
    for graph_pass in PIPELINES[pipeline]:
        result = graph_pass.run(gm)
        assert result.modified, f"{graph_pass.name} changed nothing in {pipeline}"
        gm = result.graph_module
    assert counts(gm)[SCATTER] == counts(gm)[SCATTER_IN_PLACE] == 0
    gm.graph.lint()


@pytest.mark.parametrize("graph_pass", [lock_rows, update_caches_in_place, index_copy_cache_updates, pack_rows,
                                        prepack_linear_weights, realize_reused_trig], ids=lambda p: p.name)
def test_a_second_run_reports_no_change(model, graph_pass):
    gm = graph_pass(captured(model))
    code = gm.code
    result = graph_pass.run(gm)
    assert not result.modified and result.graph_module.code == code


@pytest.mark.parametrize("graph_pass", [update_caches_in_place, index_copy_cache_updates, pack_rows],
                         ids=lambda p: p.name)
def test_passes_of_the_locked_graph_report_no_change_on_a_dense_graph(model, graph_pass):
    gm = captured(model, locked=False)
    code = gm.code
    assert not graph_pass.run(gm).modified and gm.code == code


def test_the_finish_runs_only_after_a_change(model, monkeypatch, caplog):
    gm = captured(model)  # first: capturing runs passes of its own
    finished = []
    monkeypatch.setattr(pass_base, "finish", finished.append)
    with caplog.at_level(logging.DEBUG, logger="surelock_fx.passes"):
        update_caches_in_place(gm)
        assert finished == [gm]
        update_caches_in_place(gm)
    assert finished == [gm]
    assert "update_caches_in_place: nothing to do" in caplog.text


def test_the_debug_switch_prints_the_graph_after_each_pass(model, monkeypatch, capsys):
    gm = captured(model)
    monkeypatch.setenv("SURELOCK_DEBUG_PASSES", "1")
    run_pipeline(gm, RUN_PADDED)
    printed = capsys.readouterr().out
    assert "--- after update_caches_in_place (changed) ---" in printed
    assert "--- after index_copy_cache_updates (changed) ---" in printed
    assert "index_copy_" in printed.split("index_copy_cache_updates (changed) ---")[1]
    monkeypatch.setenv("SURELOCK_DEBUG_PASSES", "0")
    run_pipeline(captured(model), RUN_PADDED)
    assert capsys.readouterr().out == ""


def test_pipelines_keep_the_locked_graph_exact(model):
    """The in-process padded form against the functional locked graph on random inputs; the locked graph
    stays functional."""
    from surelock_fx.passes.pipeline import running_form

    from helpers import assert_in_place_graph_matches_functional

    locked = captured(model)
    assert_in_place_graph_matches_functional(locked, running_form(locked, packed=False), B=2, N=9, M=4)
    assert counts(locked)[SCATTER] == 2 * model.config.n_layers
