"""The benchmark code paths on a tiny model: structure of the JSON, how speedup / ideal / efficiency
are computed, the replayed lock schedule, the runtime's full-width crossover, and the report.
No timing thresholds: the numbers of a tiny model on a busy machine mean nothing."""
from __future__ import annotations

import math
import os
import platform
import sys
import types
from pathlib import Path

import pytest
import torch

import surelock_fx
from surelock_fx.backends import get_backend
from surelock_fx.reference import ReferenceModel
from surelock_fx.runtime import FULL_FROM, LockedForms, LockedRunner
from surelock_fx.signature import active_index, cache_specs

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import decode_e2e  # noqa: E402
import make_report  # noqa: E402
import overhead  # noqa: E402
import schedules  # noqa: E402
import step_latency  # noqa: E402

# One test process runs this module in order (pytest-xdist's loadgroup): the report tests read the JSON
# that the benchmark tests before them wrote.
pytestmark = pytest.mark.xdist_group("benchmarks")

COMMON = ["--quick", "--preset", "tiny", "--no-progress", "--seed", "0"]


@pytest.fixture(scope="module")
def tiny():
    return common.random_model("tiny", seed=0)


@pytest.fixture(scope="module")
def captured(tiny):
    """One capture shared by every optimize() of the module (torch.export dominates the run time)."""
    from surelock_fx.capture import capture

    return capture(tiny)


@pytest.fixture(autouse=True)
def share_model(monkeypatch, tiny, captured):
    """Every benchmark builds the same tiny model and captures it once."""
    import surelock_fx.capture as capture_module

    opt_module = sys.modules["surelock_fx.optimize"]
    real = capture_module.capture

    def cached_capture(model):
        return captured if model is tiny else real(model)

    monkeypatch.setattr(common, "random_model", lambda *a, **k: tiny)
    monkeypatch.setattr(opt_module, "capture", cached_capture)
    monkeypatch.setattr(overhead, "capture", cached_capture)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_efficiency_is_speedup_over_ideal():
    e = common.efficiency(t_dense=2.0, t_locked=0.5, flops_dense=100.0, flops_locked=20.0)
    assert close(e["speedup"], 4.0) and close(e["ideal_speedup"], 5.0) and close(e["efficiency"], 0.8)


@pytest.mark.parametrize("backend", ["eager", "inductor", "onnxruntime"])
def test_dense_baseline_matches_the_model(tiny, backend):
    dense = common.compiled_dense(tiny, backend)
    for B, N in ((1, 5), (3, 12)):
        ids = torch.randint(0, tiny.config.vocab_size, (B, N))
        with torch.no_grad():
            torch.testing.assert_close(dense(ids), tiny(ids), rtol=1e-4, atol=1e-4)


def test_crossover_interpolates_where_locked_reaches_dense():
    pts = [dict(fraction=f, t_locked_s=t, t_dense_s=1.0) for f, t in ((0.5, 0.6), (0.9, 0.9), (1.0, 1.1))]
    assert close(step_latency.crossover(pts), 0.9 + 0.1 * 0.1 / 0.2)
    assert step_latency.crossover([dict(fraction=1.0, t_locked_s=0.9, t_dense_s=1.0)]) is None


def test_step_latency(out, tiny):
    result = step_latency.main(["--out", str(out), "--seqs", "16", "--fractions", "0.25", "1.0",
                                "--backends", "eager", "onnxruntime", "--reps", "1", *COMMON])
    saved = common.read_json(out / "step_latency.json")
    assert saved["benchmark"] == "step_latency"
    for key in ("cpu_model", "cpu_cores", "torch_version", "torch_threads", "load_average_end"):
        assert key in saved["machine"]
    glibc = platform.libc_ver()[0] == "glibc"
    assert saved["machine"]["malloc"] == ("mmap/trim thresholds 2 GiB" if glibc else "defaults")
    assert saved["settings"]["fractions"] == [0.25, 1.0] and saved["model"]["d_model"] == tiny.config.d_model
    assert [(r["backend"], r["active_rows"]) for r in result["results"]] == [
        ("eager", 4), ("eager", 16), ("onnxruntime", 4), ("onnxruntime", 16)]
    flops = surelock_fx.optimize(tiny).flops
    for r in saved["results"]:
        assert r["flops_dense"] == flops.step(r["batch"] * r["seq"], r["seq"])
        assert r["flops_locked"] == flops.step(r["batch"] * r["active_rows"], r["seq"])
        assert close(r["speedup"], r["t_dense_s"] / r["t_locked_s"])
        assert close(r["ideal_speedup"], r["flops_dense"] / r["flops_locked"])
        assert close(r["efficiency"], r["speedup"] / r["ideal_speedup"])
        assert r["t_dense_s"] == min(r["dense_times_s"]) and r["t_locked_s"] == min(r["locked_times_s"])
        assert r["t_plain_s"] == min(r["plain_times_s"])
        assert close(r["speedup_vs_plain"], r["t_plain_s"] / r["t_locked_s"])
        assert close(r["gemm_efficiency"], r["t_gemm_dense_s"] / r["t_gemm_locked_s"] * r["active_rows"] / r["seq"])
    assert set(saved["compilations"]["eager/N=16"]) >= {"graphs", "recompiles"}
    assert (out / "step_latency_N16.png").stat().st_size > 0


def test_gemm_chain_runs_every_linear_of_the_model(tiny):
    run, flops_per_row = common.gemm_chain(tiny, max_rows=8)
    assert flops_per_row == surelock_fx.optimize(tiny).flops.per_row  # every GEMM of a pass, the LM head included
    run(3)  # any row count up to max_rows


def test_replay_plan_locks_only_unmasked_rows_and_never_unlocks():
    schedule = schedules.Schedule("test", 5e-3, gen_lags=[1, 2, None], prompt_lock_steps=[1, 3, None], recorded={})
    B, P, G = 2, 3, 6
    prompt = torch.zeros(B, P + G, dtype=torch.bool)
    prompt[:, :P] = True
    plan = schedules.Plan.make(schedule, prompt, seed=0)
    order = torch.stack([P + torch.randperm(G, generator=torch.Generator().manual_seed(b)) for b in range(B)])
    previous = torch.zeros_like(prompt)
    for t in range(G):
        unmasked, first = schedules.state_at(plan, order, t)
        assert int((unmasked & ~prompt).sum()) == B * t  # one token per row per step
        locked = plan.locked(first, t)
        assert not (locked & ~unmasked).any()  # a masked row never locks
        assert not (previous & ~locked).any()  # locking is permanent
        assert not locked[:, :P][plan.prompt_step[:, :P] > t].any()
        previous = locked
    assert not plan.locked(schedules.state_at(plan, order, 0)[1], 0).any()
    counts, widths = schedules.replay_counts(schedules.replay_locks(plan, order, G), bucket=4)
    assert counts[0] == B * (P + G) and counts == sorted(counts, reverse=True)
    assert all(w % 4 == 0 or w == P + G for w in widths)


def test_sample_points_and_interpolation():
    assert schedules.sample_points(64, 4) == [0, 1, 32, 63]
    assert schedules.sample_points(2, 6) == [0, 1] and schedules.sample_points(1, 6) == [0]
    pts, times = [0, 2, 4], [1.0, 3.0, 3.0]
    assert close(decode_e2e.interpolated_total(pts, times, 5), 1 + 2 + 3 + 3 + 3)
    # in the work of each step where it differs around t: a drop at step 2 is not smeared over steps 2..3
    pts, times, work = [0, 1, 4], [4.0, 4.0, 1.0], [10, 10, 4, 4, 4]
    assert close(decode_e2e.interpolated_total(pts, times, 5, work), 4 + 4 + 1 + 1 + 1)
    assert close(decode_e2e.interpolated_total(pts, times, 5), 4 + 4 + 3 + 2 + 1)
    assert close(decode_e2e.interpolated_total(pts, times, 5, [7] * 5), 4 + 4 + 3 + 2 + 1)  # constant work: in t


def test_decode_e2e(out):
    decode_e2e.main(["--out", str(out), "--batches", "1", "2", "--gens", "8", "--prompt", "4", "--bucket", "4",
                     "--samples", "3", "--exact", "1x8", "--exact-reps", "2",
                     "--variants", "dense/plain", "dense/eager", "locked/eager", "dense/onnxruntime",
                     "locked/onnxruntime",
                     "--schedule-model", "random", *COMMON])
    saved = common.read_json(out / "decode_e2e.json")
    assert saved["benchmark"] == "decode_e2e" and "random-weight" in saved["schedule"]["source"]
    assert {"gen_lags", "prompt_lock_steps", "recorded"} <= set(saved["schedule"])
    rows = {(r["batch"], r["gen_length"]): r for r in saved["results"]}
    assert set(rows) == {(1, 8), (2, 8)}
    assert rows[(1, 8)]["mode"] == "exact" and rows[(2, 8)]["mode"] == "sampled"
    assert rows[(1, 8)]["exact"]["locked/eager"]["packed_passes"] == 8  # eager runs every pass packed
    for (B, G), r in rows.items():
        assert 0 < r["flops_ratio"] <= 1 and close(r["flops_ratio"], r["flops_locked"] / r["flops_dense"])
        padded = r["padded_flops_ratio"]  # padding rows only add to what is computed; packing only removes them
        assert r["flops_ratio"] <= padded["eager"] <= padded["inductor"] <= 1
        assert r["packed_steps"]["eager"] == G and 0 <= r["packed_steps"]["inductor"] <= G
        assert len(r["active_fraction_curve"]) == G and r["active_fraction_curve"][0] == 1.0
        assert close(r["speedup_eager"], r["time_s"]["dense/eager"] / r["time_s"]["locked/eager"])
        assert close(r["efficiency_eager"], r["speedup_eager"] / r["ideal_speedup"]["eager"])
        assert close(r["speedup_vs_plain_eager"], r["time_s"]["dense/plain"] / r["time_s"]["locked/eager"])
        assert close(r["efficiency_onnxruntime"], r["time_s"]["dense/onnxruntime"] / r["time_s"]["locked/onnxruntime"]
                     / r["ideal_speedup"]["onnxruntime"])
        assert "speedup_inductor" not in r and set(r["ideal_speedup"]) == {"eager", "onnxruntime"}
        for name, t in r["time_s"].items():
            assert close(r["tokens_per_s"][name], B * G / t)
        assert set(r["sampled"]["step_times_s"]) == {"dense/plain", "dense/eager", "locked/eager", "dense/onnxruntime",
                                                     "locked/onnxruntime"}
        assert r["sampled"]["points"][0] == 0 and r["sampled"]["points"][-1] == G - 1
        gemm = r["sampled"]["gemm_time_s"]
        assert close(r["gemm_efficiency"], gemm["dense"] / gemm["locked"] * r["flops_ratio"])
        assert all(len(ts) == len(r["sampled"]["points"]) for ts in r["sampled"]["gemm_step_times_s"].values())
        assert {"graphs", "recompiles"} <= set(r["compilations_timed"])
    exact = rows[(1, 8)]
    for name in exact["time_s"]:
        assert close(exact["time_s"][name], exact["exact"][name]["time_s"])
        times = exact["exact"][name]["times_s"]
        assert len(times) == 2 and exact["time_s"][name] == min(times)
        assert close(exact["estimator_error"][name], exact["sampled"]["time_s"][name] / exact["time_s"][name] - 1)
    for b in ("eager", "onnxruntime"):
        run = exact["exact"][f"locked/{b}"]
        assert close(exact["ideal_speedup"][b], run["flops_dense"] / run["flops_locked"])
        assert run["flops_locked"] <= run["flops_computed"] <= run["flops_dense"]  # the runner's own count
        assert len(run["times_s"]) == len(exact["exact"][f"dense/{b}"]["times_s"]) == 2
    assert "never_slower_than_dense_eager" in saved["targets"]
    assert (out / "decode_e2e_speedup.png").exists() and (out / "decode_e2e_schedule.png").exists()


def test_replay_schedule_applies_the_plan(tiny):
    """In a whole decode, the runner computes exactly the rows the plan leaves unlocked, and counts the packed
    passes and the FLOPs computed that ``schedules.pass_plans`` plans for them."""
    opt = surelock_fx.optimize(tiny, bucket=4)
    eager = get_backend("eager")
    both = opt.with_forms(LockedForms(eager.compile(opt.graph_module), eager.compile(opt.graph_module, packed=True)))
    schedule = schedules.Schedule("test", 5e-3, gen_lags=[1, 2, 3], prompt_lock_steps=[1, 2], recorded={})
    prompt = torch.randint(0, 90, (2, 4), generator=torch.Generator().manual_seed(0))
    plan_prompt = torch.zeros(2, 12, dtype=torch.bool)
    plan_prompt[:, :4] = True
    plan = schedules.Plan.make(schedule, plan_prompt, seed=1)
    out = surelock_fx.generate(both, prompt, gen_length=8, steps=8, block_length=8, lock=surelock_fx.LockConfig(),
                               schedule=schedules.Replay(plan, tiny.config.mask_token_id))
    unmask = out.stats.unmask_step  # step that committed each position (-1 prompt)
    locks = []
    for t, active in enumerate(out.stats.active_counts):
        first = torch.where(plan_prompt, 0, torch.where(unmask < t, unmask + 1, schedules.NEVER))
        locks.append(plan.locked(first, t))
        assert active == int((~locks[-1]).sum())
    plans = list(schedules.pass_plans(locks, 4, "inductor"))  # both forms, as inductor's
    assert 0 < out.stats.packed_passes == sum(p.packed for p in plans) < len(plans)
    assert out.stats.flops_computed == sum(p.flops(opt.flops) for p in plans)


def test_lock_timings_are_read_from_the_decode_stats():
    """A position committed at step s is seen from pass s + 1; one locked by pass t is skipped from pass t + 1."""
    stats = surelock_fx.DecodeStats(forward_passes=4)
    stats.unmask_step = torch.tensor([[-1, -1, 0, 1, 2, 3]])  # prompt of 2; the last one committed after pass 3
    stats.lock_state = types.SimpleNamespace(lock_step=torch.tensor([[0, -1, 2, -1, 3, -1]]))
    assert schedules.lock_timings(stats, prompt=2) == ([2, None, 1], [1, None])


class FullFrom:
    """``opt`` as a ``Decodable`` whose runners widen the graph to N from ``full_from`` (``LockedRunner``'s), its
    packed graph recording (M, N, largest active count) per pass in ``widths``."""

    def __init__(self, opt, full_from: float):
        self.config, self.opt, self.full_from, self.widths = opt.config, opt, full_from, []
        self.forms = LockedForms(None, self.recording(opt.forms.packed))

    def recording(self, graph):
        def run(x, positions, index, *rest):
            self.widths.append((index.shape[1], x.shape[1], int((index < x.shape[1]).sum(1).max())))
            return graph(x, positions, index, *rest)

        return run

    def decode_runner(self, lock, stats, schedule=None):
        opt = self.opt
        return LockedRunner(self.forms, cache_specs(opt.graph_module), opt.config, opt.flops, lock, stats, opt.bucket,
                            self.full_from, kl=opt.kl, schedule=schedule)


@pytest.mark.parametrize("full_from", [0.0, 0.5, 1.0])
def test_crossover_to_full_width_is_exact(tiny, full_from):
    """Whatever the crossover, a decode computes the same tokens and locks the same rows as the
    reference semantics; the graph width is N exactly when the bucketed M reaches full_from * N."""
    model = FullFrom(surelock_fx.optimize(tiny, bucket=4), full_from)
    prompt = torch.randint(0, 90, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(gen_length=16, steps=16, block_length=16, lock=surelock_fx.LockConfig(kl_threshold=5e-2))
    fast = surelock_fx.generate(model, prompt, **kw)
    ref = surelock_fx.generate(ReferenceModel(tiny), prompt, **kw)
    assert torch.equal(fast.tokens, ref.tokens)
    assert fast.stats.active_counts == ref.stats.active_counts
    assert fast.stats.locked_counts[-1] > 0
    for M, N, active in model.widths:
        bucketed = min(N, -(-active // 4) * 4)
        assert M == (N if bucketed >= full_from * N else bucketed)


def test_active_index_crossover():
    locked = torch.zeros(1, 20, dtype=torch.bool)
    locked[0, :3] = True  # 17 active
    assert active_index(locked, bucket=4)[0].shape[1] == 20  # bucketed 20 = N
    locked[0, :5] = True  # 15 active -> bucket 16
    assert active_index(locked, bucket=4, full_from=1.0)[0].shape[1] == 16
    assert active_index(locked, bucket=4, full_from=0.8)[0].shape[1] == 20
    index, _ = active_index(locked, bucket=4, full_from=0.8)
    assert (index[0, 15:] == 20).all()  # padding rows aim at the scratch slot
    assert 0 < FULL_FROM <= 1


def test_overhead(out):
    result = overhead.main(["--out", str(out), "--batches", "1", "--gen", "8", "--prompt", "4", "--bucket", "4",
                            "--points", "2", "--reps", "1", "--backends", "eager", "--warm-cache",
                            "--schedule-model", "random", *COMMON])
    saved = common.read_json(out / "overhead.json")
    cost = saved["optimize_cost"]
    assert {"capture_s", "lock_rows_s", "eager"} <= set(cost)
    assert {"optimize_s", "compile_on_first_call_s", "total_setup_s", "compilations"} <= set(cost["eager"])
    eager = cost["eager"]  # eager's one graph is packed: no second form to compile
    assert eager["packed_compile_on_first_use_s"] == 0 and "packed_compilations" not in eager
    assert close(eager["total_setup_s"], eager["optimize_s"] + eager["compile_on_first_call_s"])
    assert len(saved["steps"]) == 2 == len(result["steps"])
    for st in saved["steps"]:
        assert {"index", "graph", "lock_update", "runner", "sampler"} <= set(st["phases_s"])
        shares = st["graph_share"] + st["bookkeeping_share"] + st["sampler_share"]
        assert close(shares, 1.0)
        assert close(st["bookkeeping_s"], st["phases_s"]["runner"] - st["phases_s"]["graph"])
        assert 0 < st["phases_s"]["cache_scatter"] < st["phases_s"]["graph"]  # the eager graph's cache updates
    assert (out / "overhead_step_shares.png").exists()


def test_make_report(out):
    for name in ("step_latency", "decode_e2e", "overhead"):
        if not (out / f"{name}.json").exists():
            pytest.skip("needs the JSON of the other tests")
    report = out / "REPORT.md"
    make_report.main(["--results", str(out), "--output", str(report), "--figures", str(out / "figures"), "--no-blocks"])
    text = report.read_text()
    for name in ("step_latency", "decode_e2e", "overhead"):
        assert common.read_json(out / "figures" / f"{name}.json") == common.read_json(out / f"{name}.json")
    for heading in ("## Machine and settings", "## Targets", "## Per-step latency", "## End-to-end decoding",
                    "## Overheads", "## Comparison with the paper"):
        assert heading in text
    assert "0.73x" in text and "1.17–1.39x" in text
    options = [f"--{name} {os.path.relpath(path.resolve(), make_report.ROOT)}" for name, path in
               (("results", out), ("output", report), ("figures", out / "figures"))]
    assert f"*Generated by `python benchmarks/make_report.py {' '.join(options)}`;" in text  # how to redo it
    header = next(line for line in text.splitlines() if line.startswith("| B | G | mode |"))
    assert "| speedup eager | speedup ONNX Runtime |" in header and "inductor" not in header  # the backends measured
    assert "ours, ONNX Runtime" in text
    m = common.read_json(out / "decode_e2e.json")["machine"]
    assert f"| {m['cpu_model']} | {m['cpu_capability']} |" in text
    e2e = common.read_json(out / "decode_e2e.json")["results"]
    exact = next(r for r in e2e if r["mode"] == "exact")  # each interleaved repetition's efficiency, against its own
    reps = zip(exact["exact"]["dense/onnxruntime"]["times_s"], exact["exact"]["locked/onnxruntime"]["times_s"])
    effs = [dense / locked / exact["ideal_speedup"]["onnxruntime"] for dense, locked in reps]
    assert f"B={exact['batch']} G={exact['gen_length']} ONNX Runtime: {make_report.span(effs)}" in text
    low = min(r["gemm_efficiency"] for r in e2e)
    assert f"The decodes' GEMMs alone reach an efficiency of {low:.2f}" in text
    for line in text.splitlines():
        if line.startswith("!["):
            assert (report.parent / line.split("(", 1)[1].rstrip(")")).exists()


def test_report_of_the_default_paths_names_the_plain_command():
    command = "`python benchmarks/make_report.py` from `results/*.json`"
    assert make_report.generated_by(make_report.parse_args([])) == command


def test_make_report_writes_the_docs_limitations(out):
    if not all((out / f"{name}.json").exists() for name in ("step_latency", "decode_e2e")):
        pytest.skip("needs the JSON of the other tests")
    data = make_report.load(out)
    doc = out / "limitations.md"
    doc.write_text("intro\n<!-- limitations:begin -->\nold\n<!-- limitations:end -->\nrest\n")
    assert make_report.update_blocks(dict(benchmarks="absent", limitations=make_report.limitations(data)),
                                     dict(benchmarks=doc, limitations=doc)) == ["limitations"]
    text = doc.read_text()
    assert text.startswith("intro\n<!-- limitations:begin -->\n- A pass with few") and "old" not in text
    assert text.endswith("<!-- limitations:end -->\nrest\n")
    flat = " ".join(text.split())
    r = next(r for r in data["decode_e2e"]["results"] if r["batch"] == 2)
    assert f"a FLOPs ratio of {r['padded_flops_ratio']['tensorrt']:.3f} computed for {r['flops_ratio']:.3f}" in flat
    assert "benchmark of [BENCHMARKS.md](../BENCHMARKS.md)," in flat  # provenance: the report, not a commit hash
    assert "commit" not in flat


def test_committed_blocks_are_what_make_report_makes_of_the_committed_json():
    """README.md's headline and docs/limitations.md's bullets are generated: regenerate them with
    ``python benchmarks/make_report.py --results benchmarks/figures --blocks-only``, never edit them."""
    data = make_report.load(common.FIGURES)
    texts = make_report.blocks(data, make_report.ROOT / "BENCHMARKS.md")
    for name, path in make_report.BLOCK_FILES.items():
        begin, end = common.readme_markers(name)
        assert f"{begin}\n{texts[name]}\n{end}" in path.read_text(), f"{path}'s {name} block is stale"
