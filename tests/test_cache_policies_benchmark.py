"""benchmarks/cache_policies.py on a tiny grid: the JSON it writes, the passes and FLOPs of every policy, the
estimator check, the targets, the recorded lock timing and its replay, and the report section. No timing
thresholds: the numbers of a tiny model on a busy machine mean nothing."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import cache_policies  # noqa: E402
import common  # noqa: E402
import make_report  # noqa: E402
import schedules  # noqa: E402

pytestmark = pytest.mark.xdist_group("cache_policies_benchmark")

GEN, BLOCK = 32, 16
ARGS = ["--quick", "--preset", "tiny", "--prompts", "8", "24", "--batches", "1", "2", "--gen", str(GEN), "--block",
        str(BLOCK), "--reps", "1", "--points", "3", "--validate", "1", "8", "32", "--validate-reps", "1", "--clock",
        "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("cache_policies")


@pytest.fixture(scope="module")
def result(out):
    """One run; the benchmark and replay models are one tiny model, captured once (torch.export dominates)."""
    tiny = common.random_model("tiny", seed=0)
    optimize_module, captured = sys.modules["surelock_fx.optimize"], {}
    real = optimize_module.capture

    def cached_capture(model):
        return captured.setdefault("tiny", real(model)) if model is tiny else real(model)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "random_model", lambda *a, **k: tiny)
        patch.setattr(optimize_module, "capture", cached_capture)
        cache_policies.main([*ARGS, "--out", str(out)])
    return common.read_json(out / "cache_policies.json")


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_json_holds_every_section(result, out):
    assert result["benchmark"] == "cache_policies"
    for key in ("machine", "settings", "published", "model", "recorded", "results", "validation", "targets"):
        assert key in result
    assert result["settings"]["clock"] == "cpu" and result["settings"]["variants"][0] == "dense"
    assert {(r["batch"], r["prompt"]) for r in result["results"]} == {(1, 8), (2, 8), (1, 24), (2, 24)}
    assert all(list(r["variants"]) == list(cache_policies.VARIANTS) for r in result["results"])
    rec = result["recorded"]
    assert set(rec["profiles"]) == {v for v in cache_policies.VARIANTS if v.endswith("+thr")}
    assert set(rec["timings"]) == {"none", "dual"} and all(rec["timings"][p]["gen_lags"] for p in rec["timings"])
    assert (out / "cache_policies_tokens_per_s.png").stat().st_size > 0


def test_passes_and_rows_follow_each_policy(result):
    for r in result["results"]:
        B, P, N, vs = r["batch"], r["prompt"], r["seq"], r["variants"]
        for name, v in vs.items():
            assert v["forward_passes"] == v["steps"] == len(v["computed"]) == len(v["kl"]) == len(v["live"])
            base = name.removesuffix("+thr")
            assert v["steps"] == GEN if name == base else v["steps"] < vs[base]["steps"]
            spb = v["steps"] // (GEN // BLOCK)
            assert all(v["live"][t] == B * BLOCK for t in range(0, v["steps"], spb))  # a block starts fully masked
            assert all(live <= B * BLOCK for live in v["live"])
            assert (max(v["kl"]) > 0) == ("lock" in name)
        for suffix in ("", "+thr"):
            dense, prefix, dual = (vs[n + suffix]["computed"] for n in ("dense", "prefix", "dual"))
            spb = len(dense) // (GEN // BLOCK)
            assert dense == [B * N] * len(dense)
            for t in range(len(dense)):
                lo = P + t // spb * BLOCK
                assert prefix[t] == (B * N if t % spb == 0 else B * (N - lo))
                assert dual[t] == (B * N if t % spb == 0 else B * BLOCK)
            for locked, unlocked in (("lock", "dense"), ("dual+lock", "dual")):
                assert all(a <= b for a, b in zip(vs[locked + suffix]["computed"], vs[unlocked + suffix]["computed"]))


def test_flops_and_efficiencies_are_consistent(result):
    for r in result["results"]:
        vs = r["variants"]
        dense = vs["dense"]
        assert dense["flops_ratio"] == 1.0 and close(dense["speedup"], 1.0)
        for suffix in ("", "+thr"):
            f = {n: vs[n + suffix]["flops"] for n in ("dense", "lock", "prefix", "dual", "dual+lock")}
            assert f["dual+lock"] <= f["dual"] <= f["prefix"] <= f["dense"] and f["lock"] <= f["dense"]
        for name, v in vs.items():
            assert close(v["flops_ratio"], v["flops"] / dense["flops"])
            assert close(v["tokens_per_s"], r["batch"] * GEN / v["time_s"])
            assert close(v["time_s"], v["graph_s"] + v["kl_s"] + v["sampler_s"])
            assert close(v["speedup"], dense["time_s"] / v["time_s"])
            assert close(v["ideal_speedup"], 1 / v["flops_ratio"])
            assert close(v["efficiency"], v["speedup"] / v["ideal_speedup"])
            assert close(v["gemm_efficiency"], dense["gemm_s"] / v["gemm_s"] / v["ideal_speedup"])
            assert v["kl_s"] == 0 or "lock" in name
            if name.endswith("+thr"):
                assert v["forward_passes"] < vs[name.removesuffix("+thr")]["forward_passes"]


def test_the_estimator_error_is_reported(result):
    val = result["validation"]
    assert (val["batch"], val["prompt"], val["gen_length"]) == (1, 8, GEN)
    assert list(val["variants"]) == list(cache_policies.VALIDATED)
    for v in val["variants"].values():
        assert v["measured_wall_s"] > 0 and v["measured_cpu_s"] > 0 and v["rows_match"]
        assert close(v["estimator_error"], v["time_s"] / v["measured_cpu_s"] - 1)
    dense, locked = val["variants"].values()
    assert close(val["speedup_error"],
                 locked["measured_cpu_s"] / dense["measured_cpu_s"] * dense["time_s"] / locked["time_s"] - 1)


def test_targets_are_reported_with_their_numbers(result):
    targets = result["targets"]
    tenfold = [t for t in targets if "10x" in t["target"]]
    assert {(t["batch"], t["prompt"]) for t in tenfold} == {(r["batch"], r["prompt"]) for r in result["results"]}
    halves = [t for t in targets if "dual+lock" in t["target"] and "10x" not in t["target"]]
    assert {(t["batch"], t["prompt"]) for t in halves} == {(1, 24), (2, 24)} and len(halves) == 4
    for t in halves:
        assert t["met"] == (t["flops_ratio"] <= 0.5 and t["tokens_per_s_ratio"] >= 1.6)
    for t in tenfold:
        r = next(r for r in result["results"] if (r["batch"], r["prompt"]) == (t["batch"], t["prompt"]))
        ratio = r["variants"]["dual+lock+thr"]["tokens_per_s"] / r["variants"]["dense"]["tokens_per_s"]
        assert close(t["tokens_per_s_ratio"], ratio) and t["met"] == (ratio >= 10)


def test_recorded_lock_timing_follows_the_policy(result):
    """Lock timing counts a token's computations: at least two for a prompt token (its KL compares two), at most
    one per block with the dual cache (computed at block starts only); at least one for a generated token. The
    locked decodes have as many blocks as the benchmark's, the threshold profiles one block of the shipped
    model's gen."""
    rec = result["recorded"]
    gen = rec["settings"]["gen_length"]
    assert rec["lock_block"] == gen // (GEN // BLOCK) and rec["threshold_block"] == min(BLOCK, gen)
    counts = {p: [c for c in t["prompt_lock_steps"] if c is not None] for p, t in rec["timings"].items()}
    assert counts["dual"] and all(2 <= c <= GEN // BLOCK for c in counts["dual"])
    assert all(c >= 2 for c in counts["none"]) and max(counts["none"]) > GEN // BLOCK
    for timing in rec["timings"].values():
        assert all(lag >= 1 for lag in timing["gen_lags"] if lag is not None)
        assert timing["recorded"]["passes"] == gen
        assert timing["recorded"]["settings"]["block_length"] == rec["lock_block"]
    assert all(0 < s <= 1 for p in rec["profiles"].values() for s in p)


def replayed_masks(cache) -> list:
    """The masks a ReplaySchedule returns over a decode of 2 prompt and 4 generated tokens, blocks of 2, two steps
    each, one token committed per step, every prompt token locking after 2 computations, every generated one
    after 2 from the first pass that saw it unmasked."""
    schedule = schedules.Schedule("test", 0.0, gen_lags=[2], prompt_lock_steps=[2], recorded={})
    replay = cache_policies.ReplaySchedule(schedule, cache, 1, 2, 4, block=2, steps=4, mask_id=9, seed=0)
    x = torch.tensor([[5, 5, 9, 9, 9, 9]])
    masks = []
    for step in range(4):
        masks.append(replay(step, x)[0].tolist())
        x[0, 2 + step] = 1
    assert len(replay.masks) == 4
    return masks


def test_replay_schedule_counts_computations():
    """Without a cache every pass computes the prompt, so it locks at pass 2; with the dual cache only block starts
    (passes 0 and 2) do, so it locks at pass 3. Masked tokens never lock."""
    F, T = False, True
    assert replayed_masks(None) == [[F] * 6, [F] * 6, [T, T, F, F, F, F], [T, T, T, F, F, F]]
    assert replayed_masks("dual") == [[F] * 6, [F] * 6, [F] * 6, [T, T, T, F, F, F]]


def test_expected_max_and_replayed_steps():
    assert close(cache_policies.expected_max([1.0, 2.0], 1), 1.5)
    assert close(cache_policies.expected_max([1.0, 2.0], 2), 1.75)
    recorded = dict(profiles={"dual+thr": [0.125, 0.25]})
    v = cache_policies.Variant.of("dual+thr")
    assert cache_policies.replay_steps(v, recorded, 1, 256, 32) == 8 * round(32 * 0.1875)
    assert cache_policies.replay_steps(cache_policies.Variant.of("dual"), recorded, 1, 256, 32) == 256


def test_report_renders_the_section(result, out):
    report, figures = out / "BENCHMARKS.md", out / "figures"
    make_report.main(["--results", str(out), "--output", str(report), "--figures", str(figures), "--no-blocks"])
    text = report.read_text()
    section = text.split("## Cache policies", 1)[1]
    assert "theirs: Fast-dLLM" in section and "theirs: SureLock" in section and "1.73x" in section
    assert "Estimator check" in section and "Targets (from the issue)" in section
    assert section.count("| dual+lock+thr |") == len(result["results"])
    assert "![cache policies](figures/cache_policies_tokens_per_s.png)" in section
    assert (figures / "cache_policies_tokens_per_s.png").stat().st_size > 0
