"""benchmarks/gpu_check.py in a dry run on the CPU, what can be checked without CUDA: every section of its JSON,
the correctness checks, the rooflines, the markdown; and its helpers (GPU busy time, pytest's summary, the
replayed lock schedule). No timing thresholds: a tiny model's times on a busy CPU mean nothing."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from surelock_fx.tasks import TASKS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_check  # noqa: E402

# One test process runs the module: its tests share one dry run (about 30 s on a 2-core CPU).
pytestmark = pytest.mark.xdist_group("gpu_check")
# The dry run's pytest of CUDA_TESTS, narrowed to a TensorRT test that passes on the CPU and the one that needs a
# GPU (and skips): the other TensorRT tests run in this suite's own run of test_export.py.
CUDA_TESTS_ON_THE_CPU = (*gpu_check.CUDA_TESTS[:-1], f"({gpu_check.CUDA_TESTS[-1]}) and (settings or engines_decode)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_check, "CUDA_TESTS", CUDA_TESTS_ON_THE_CPU)
        gpu_check.main(["--dry-run", "--out", str(out), "--no-progress"])
    return out, json.loads((out / "gpu_check.json").read_text())


def test_every_part_is_recorded_and_the_skips_say_why(run):
    _, result = run
    assert {"benchmark", "machine", "settings", "parts", "skipped", "elapsed_s"} <= set(result)
    assert list(result["parts"]) == list(gpu_check.PARTS)
    assert {name: part["status"] for name, part in result["parts"].items()} == dict(
        correctness="ok", cuda_tests="ok", steps_eager="ok", decode="ok", steps_inductor="skipped")
    assert result["machine"]["gpu"] is None and result["machine"]["torch_version"] == torch.__version__
    assert result["settings"]["dry_run"] and result["settings"]["layers"] == 2
    assert [(s["part"], s.get("item")) for s in result["skipped"]] == [("correctness", "inductor decode"),
                                                                       ("steps_inductor", None)]
    assert all("dry run" in s["reason"] for s in result["skipped"])
    assert 0 < result["elapsed_s"] < result["settings"]["budget_s"]


def test_correctness_passed_on_the_cpu(run):
    part = run[1]["parts"]["correctness"]
    assert part["passed"] and part["prompts"] == len(TASKS)
    assert [(c["decode"], c["reference"], c["threshold"]) for c in part["checks"]] == [
        ("eager cpu float32", "eager cpu float32", 1.0),
        ("eager cpu bfloat16", "eager cpu float32", gpu_check.BF16_AGREEMENT)]
    assert all(c["passed"] and c["agreement"] >= c["threshold"] for c in part["checks"])
    assert all(0 < c["flops_ratio"] < 1 for c in part["checks"])  # the decodes did lock


def test_cuda_tests_outcome_is_recorded(run):
    part = run[1]["parts"]["cuda_tests"]
    assert part["command"].endswith(" ".join(CUDA_TESTS_ON_THE_CPU))
    assert part["passed"] == (part["returncode"] == 0) and part["counts"].get("passed", 0) > 0
    assert part["counts"].get("skipped", 0) == len(part["skips"]) > 0  # the TensorRT engines test, at least
    if importlib.util.find_spec("torch_tensorrt") is None:
        assert any("torch-tensorrt is not installed" in s for s in part["skips"])


def test_pass_grid_times_and_rooflines(run):
    _, result = run
    settings, part = result["settings"], result["parts"]["steps_eager"]
    rows = part["results"]
    assert [(r["batch"], r["seq"], r["fraction"]) for r in rows] == [
        (B, N, f) for B in settings["batches"] for N in settings["seqs"] for f in settings["fractions"]]
    weights_s = part["model"]["streamed_weight_bytes"] / gpu_check.PEAK_BYTES_PER_S
    for r in rows:
        assert r["t_dense_s"] > 0 and r["t_locked_s"] > 0
        assert r["active_rows"] == max(1, round(r["fraction"] * r["seq"]))
        assert r["flops_locked"] <= r["flops_dense"] and (r["fraction"] < 1 or r["flops_locked"] == r["flops_dense"])
        for kind in ("dense", "locked"):
            roof = r[f"roofline_{kind}"]
            assert math.isclose(roof["flops_s"], r[f"flops_{kind}"] / gpu_check.PEAK_FLOPS)
            assert math.isclose(roof["weights_s"], weights_s)
            assert roof["bound_s"] == max(roof["flops_s"], roof["weights_s"]) > 0
            assert math.isclose(roof["time_over_bound"], r[f"t_{kind}_s"] / roof["bound_s"])
            assert math.isfinite(roof["time_over_bound"]) and roof["time_over_bound"] > 0


def test_decodes_dense_vs_locked(run):
    _, result = run
    settings, rows = result["settings"], result["parts"]["decode"]["results"]
    variants = [(B, v) for B in settings["batches"] for v in ("dense", "locked")]
    assert [(r["batch"], r["variant"]) for r in rows] == variants
    for r in rows:
        assert r["steps"] == settings["decode"]["steps"] and r["tokens_per_s"] > 0
        assert r["syncs"] is None and "dry run" in r["syncs_label"] and r["idle_share"] is None
        assert r["roofline"]["bound_s"] > 0 and r["roofline"]["time_over_bound"] > 0
    for dense, locked in zip(rows[::2], rows[1::2]):
        assert dense["mean_active_fraction"] == 1 and 0 < locked["mean_active_fraction"] < 1
        assert math.isclose(locked["flops_ratio"], locked["flops"] / dense["flops"])
        assert math.isclose(locked["speedup"], dense["wall_s"] / locked["wall_s"])


def test_markdown_is_the_written_report(run):
    out, result = run
    text = (out / "gpu_check.md").read_text()
    assert gpu_check.markdown(result) == text
    for header in ("| decode | reference | token agreement | threshold |",
                   "| backend | B | N | M/N | dense ms | locked ms | speedup | ideal | dense bound ms |",
                   "| B | variant | s | tokens/s | speedup | active fraction | syncs/step | GPU idle share |"):
        assert header in text
    assert "- steps_inductor: dry run" in text and "no 32-layer time is measured" in text


def test_make_report_turns_the_json_into_a_gpu_section(run, tmp_path):
    import make_report

    out, result = run
    report = tmp_path / "BENCHMARKS.md"
    make_report.main(["--results", str(out), "--output", str(report), "--figures", str(tmp_path / "figures"),
                      "--no-blocks"])
    text = report.read_text()
    assert gpu_check.markdown(result) in text and text.index("## GPU check") < text.index("## Comparison")
    assert (tmp_path / "figures" / "gpu_check.json").exists()


def test_out_of_budget_every_part_is_skipped_and_saved(tmp_path):
    result = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--no-progress", "--budget-s", "0",
                             "--parts", "correctness", "decode"])
    assert [(s["part"], s["reason"].split(":")[0]) for s in result["skipped"]] == [
        ("correctness", "budget"), ("cuda_tests", "not in --parts"), ("steps_eager", "not in --parts"),
        ("decode", "budget"), ("steps_inductor", "not in --parts")]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").read_text() == gpu_check.markdown(saved)


def test_busy_seconds_is_the_union_of_the_intervals():
    s = 10**9
    assert gpu_check.busy_seconds([]) == 0
    assert gpu_check.busy_seconds([(5 * s, 6 * s), (0, 2 * s), (1 * s, 3 * s)]) == 4.0
    assert gpu_check.busy_seconds([(0, 10 * s), (2 * s, 3 * s)]) == 10.0


def test_count_syncs_counts_every_sync_warning_and_restores_the_mode(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def syncing():
        for _ in range(3):  # one source line: the "default" warnings filter would show it once
            warnings.warn(gpu_check.SYNC_WARNING)
        warnings.warn("something else")
        return "done"

    assert gpu_check.count_syncs(syncing) == ("done", 3)
    assert modes == ["warn", "default"]


def test_pytest_outcome_reads_the_summary_and_the_skips():
    stdout = ("......s                                      [100%]\n"
              "=========== short test summary info ===========\n"
              "SKIPPED [1] tests/test_export.py:356: TensorRT test needs a GPU: torch-tensorrt is not installed\n"
              "6 passed, 1 skipped, 20 deselected in 10.97s\n")
    out = gpu_check.pytest_outcome(stdout)
    assert out["counts"] == dict(passed=6, skipped=1, deselected=20)
    assert out["skips"] == ["[1] tests/test_export.py:356: TensorRT test needs a GPU: torch-tensorrt is not installed"]
    assert gpu_check.pytest_outcome("==== 1 failed, 2 passed in 3.20s ====\n")["counts"] == dict(failed=1, passed=2)


def test_lag_schedule_locks_the_prompt_from_pass_1_and_tokens_lag_passes_after_unmasked():
    mask = 9
    schedule = gpu_check.LagSchedule(mask, lag=2)
    x = torch.tensor([[1, 2, mask, mask]])
    assert not schedule(0, x).any()
    assert schedule(1, x).tolist() == [[True, True, False, False]]
    x = torch.tensor([[1, 2, 5, mask]])  # position 2 first seen unmasked by pass 2
    assert schedule(2, x).tolist() == schedule(3, x).tolist() == [[True, True, False, False]]
    assert schedule(4, x).tolist() == [[True, True, True, False]]


def test_help_says_what_it_needs(capsys):
    with pytest.raises(SystemExit) as done:
        gpu_check.parse_args(["--help"])
    assert done.value.code == 0
    assert "--budget-s" in capsys.readouterr().out
