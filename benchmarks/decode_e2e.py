"""End-to-end decoding, dense vs locked, with the lock schedule of real decodes.

    python benchmarks/decode_e2e.py [--quick] [--out DIR] [--schedule-model DIR]

1. **Record a lock schedule** (``schedules.py``, shared with ``overhead.py``). Locked decodes
   (``LockConfig(kl_threshold=--eps)``) of a small model: the trained checkpoint of ``--schedule-model``
   or the one shipped with the package (``surelock_fx.tasks``) on its task prompts, else a random-weight
   model on random prompts (the JSON says which). Recorded: for every generated token, the number of
   steps from the first pass that saw it unmasked to the first pass that skipped it (its lock lag;
   "never" if it did not lock before the end), and for every prompt token the pass from which it was
   skipped.
2. **Replay it** on the benchmark model (random weights, LLaDA-shaped, preset ``--preset``) at
   every batch size B and generation length G: each prompt token locks at a step drawn from the
   recorded prompt lock steps, each generated token a lag drawn from the recorded lags after it is
   unmasked (seeded draws, identical for every variant). The runtime does all its real per-step
   work (active index, graph, KL on the candidate rows); the replay only decides
   which rows are locked, so the active-fraction curve is the recorded one whatever the random
   model predicts. Sampler: LLaDA's, one block, steps = G, temperature 0, low_confidence.
3. **Time seven variants** on identical schedules: locked eager, inductor and ONNX Runtime
   (``surelock_fx.optimize(model, backend, bucket)``; ONNX Runtime in CPU sessions with as many
   threads as torch), the dense baseline of each of these backends (the same pipeline without the
   locking rewrite, ``common.compiled_dense``: eager with prepacked linear weights, inductor with frozen
   weights, the plain model exported to ONNX), and the plain model in PyTorch eager (what a user runs
   without surelock_fx).
   * ``exact`` configurations run whole decodes through ``surelock_fx.generate``, ``--exact-reps``
     per variant, interleaved across variants; the fastest counts (load only ever adds time);
   * ``sampled`` configurations (whole decodes would take hours on a CPU: a decode costs
     O(G * B * (P + G)) row passes) time K complete decode steps (runner or model forward, plus the
     sampler's candidate/top-k work) at step 0 and K - 1 evenly spaced later steps t_k, with the
     decode state of step t_k
     (tokens unmasked, rows locked by the replay), interleaving the variants at each t_k; the decode
     time is the sum over all G steps of the step time interpolated between the samples, in the
     step's active rows for locked variants (dense ones: linearly in t). Exact
     configurations are also estimated this way; the JSON reports the estimator's error.

Per configuration: time per variant, tokens/s, the FLOPs of the decode (runtime FlopModel, dense
vs locked, unpadded active counts), speedup = t_dense / t_locked (same backend), ideal =
FLOPs_dense / FLOPs_locked, efficiency = speedup / ideal, and each locked variant against the plain
model (``speedup_vs_plain_<backend>``). ``padded_flops_ratio`` is, per backend (the timed ones, ONNX Runtime
and TensorRT), the FLOPs ratio of what its locked graph computes: attention runs B x M queries, every batch
row as many as the one with the most active rows; the projections, FFN and LM head run the active rows only
on steps that run packed across the batch (passes.pack_rows: eager every step, inductor and ONNX Runtime
where padding pays, TensorRT never; ``packed_steps``), else B x M rows: what ``runtime.plan_pass`` plans for
each pass of the replayed plan with the forms the backend builds (``schedules.pass_plans``). Exact decodes
also report the packed passes and the FLOPs computed from their runner's ``DecodeStats``.
``gemm_efficiency`` is the same efficiency for the model's GEMMs alone (``common.gemm_chain``, timed at
each sampled step at the eager graph's active rows and at the dense rows, interpolated alike): the bound the
weights' memory traffic and few-row GEMMs set to the decode's, before attention, sampler and bookkeeping.
Writes ``decode_e2e.json`` and ``decode_e2e_*.png``.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import surelock_fx  # noqa: E402
from surelock_fx.backends import BACKEND_NAMES  # noqa: E402
from surelock_fx.decoding import model_forward, special_ids  # noqa: E402

import common  # noqa: E402
import schedules  # noqa: E402

NAME = "decode_e2e"
BACKENDS = ("eager", "inductor", "onnxruntime")
VARIANTS = ("dense/plain", *(f"{kind}/{b}" for kind in ("dense", "locked") for b in BACKENDS))
FULL = dict(preset="e2e", batches=[1, 2, 4, 8], gens=[64, 256, 1024], prompt=64, bucket=1, samples=12,
            exact=["1x64", "2x64", "4x64", "8x64"], exact_reps=3, variants=list(VARIANTS))
QUICK = dict(preset="small", batches=[1], gens=[32, 64], prompt=16, bucket=8, samples=4, exact=[], exact_reps=1,
             variants=list(VARIANTS))


def parse_args(argv=None):
    ap = common.base_parser(__doc__)
    ap.add_argument("--preset", choices=sorted(common.PRESETS),
                    help="benchmark model (default e2e; small with --quick)")
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--gens", type=int, nargs="+", help="generation lengths G (steps = G, one block)")
    ap.add_argument("--prompt", type=int, help="prompt length P (random tokens)")
    ap.add_argument("--bucket", type=int, help="optimize(bucket=...): active counts padded up to a multiple of it "
                                               "(default 1: exact; the inductor graph's M is dynamic, so every width "
                                               "reuses its compiled graphs)")
    ap.add_argument("--samples", type=int, help="K: timed steps per sampled decode")
    ap.add_argument("--exact", nargs="*", help="BxG configurations decoded whole (others are sampled)")
    ap.add_argument("--exact-reps", type=int, help="whole decodes per variant of an exact configuration, "
                                                   "interleaved across variants; the fastest counts")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS)
    schedules.add_arguments(ap)
    return common.fill_defaults(ap.parse_args(argv), QUICK, FULL)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

class Variant:
    def __init__(self, name: str, model, optimized: dict):
        self.name = name
        self.kind, self.backend = name.split("/")
        self.model = optimized[self.backend] if self.kind == "locked" else common.compiled_dense(model, self.backend)


def build_variants(model, names, bucket: int) -> dict:
    optimized = {}
    for backend in BACKENDS:
        if f"locked/{backend}" in names:
            optimized[backend] = common.optimized(model, backend, bucket=bucket)
    return {name: Variant(name, model, optimized) for name in names}


def interpolated_total(points: list[int], times: list[float], steps: int, work: list[float] | None = None) -> float:
    """Sum over t = 0..steps-1 of the step time interpolated between the sampled steps: in ``work`` [steps]
    (what each step computes, e.g. its active rows) where it differs at the two samples around t, else
    linearly in t. A locked decode's active rows fall steeply when the prompt locks, then slowly; linear
    interpolation in t across that drop overestimates every step in it."""
    total = 0.0
    for t in range(steps):
        j = next((i for i, p in enumerate(points) if p >= t), len(points) - 1)
        if points[j] == t or j == 0:
            total += times[j]
            continue
        t0, t1 = points[j - 1], points[j]
        if work is not None and work[t0] != work[t1]:
            fraction = (work[t0] - work[t]) / (work[t0] - work[t1])
        else:
            fraction = (t - t0) / (t1 - t0)
        total += times[j - 1] + (times[j] - times[j - 1]) * fraction
    return total


def warm_up(variants: dict, plan, x0: torch.Tensor, order: torch.Tensor, steps: int, lock, mask_id, eos, eot):
    """Build what the variants build on first use, untimed: inductor's graphs for this shape and its
    lock rule's KL (one and several candidate rows), and, where a backend has both forms of the locked
    graph (padded, packed: inductor, and ONNX Runtime, which exports the packed one on its first packed
    step), a full-width, a mid-decode and a single-row pass in each (dynamo specialises a size of 1,
    and M = N at first sight through duck sizing)."""
    with torch.inference_mode():
        x = x0.clone()
        for v in variants.values():
            if v.kind == "dense":
                if v.backend != "plain":
                    schedules.decode_step(model_forward(v.model), x, mask_id, eos, eot)
                continue
            if v.backend == "inductor":
                warm_up_kl(v.model)
            if schedules.both_forms(v.model):
                for pack_from in (float("inf"), 0.0):  # no pass packed, then every pass
                    pinned = schedules.Pinned(v.model, lock, pack_from)
                    warm_up_widths(pinned, plan, x, order, steps, mask_id, eos, eot)


def warm_up_kl(opt) -> None:
    """The lock rule's KL at (rows of the new logits, of the previous ones, candidates) whose sizes of 1
    dynamo specialises."""
    V = opt.config.vocab_size
    for rows, prev_rows, count in ((3, 4, 2), (3, 4, 1), (1, 4, 1), (3, 1, 1), (1, 1, 1)):
        opt.kl(torch.zeros(rows, V), torch.arange(count), torch.zeros(prev_rows, V), torch.arange(count),
               torch.zeros(count))


def warm_up_widths(pinned, plan, x: torch.Tensor, order: torch.Tensor, steps: int, mask_id, eos, eot) -> None:
    """A full-width, a mid-decode and a single-row pass of a ``schedules.Pinned`` runner, from the first input
    ``x``."""
    schedules.decode_step(pinned.runner, x, mask_id, eos, eot)
    t = steps // 2
    unmasked, first = schedules.state_at(plan, order, t)
    pinned.locked = plan.locked(first, t)
    schedules.decode_step(pinned.runner, schedules.decided(x, unmasked, mask_id), mask_id, eos, eot)
    locked = torch.ones_like(unmasked)
    locked[:, -1] = False  # every other position decided, as locked ones are
    pinned.locked = locked
    schedules.decode_step(pinned.runner, schedules.decided(x, locked, mask_id), mask_id, eos, eot)


def sampled_decode(variants: dict, plan, x0: torch.Tensor, order: torch.Tensor, steps: int, k: int,
                   lock, mask_id, eos, eot, gemms, counts: list[int]) -> dict:
    """Estimated decode time per variant from K timed steps (see the module docstring). Pass 0 is
    always sampled and, for locked variants, is the runner's real first pass (allocations included);
    each later one skips the plan's rows at its step (``schedules.Pinned``).
    At each sampled step the model's GEMMs alone (``common.gemm_chain``) are timed too, at the rows
    of the locked graph (``counts``: the active rows, packed) and of the dense one."""
    points = schedules.sample_points(steps, k)
    B, N = x0.shape
    V = next(iter(variants.values())).model.config.vocab_size
    tokens = torch.randint(0, V - 8, x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        x0 = x0.clone()  # every step works on inference-mode tensors, as generate() does after its first step
    pinned = {name: schedules.Pinned(v.model, lock) for name, v in variants.items() if v.kind == "locked"}
    runners = {name: pinned[name].runner if name in pinned else model_forward(v.model) for name, v in variants.items()}
    times = {name: [] for name in variants}
    gemm_times = {"dense": [], "locked": []}
    with torch.inference_mode():
        for t in points:
            x, locked = schedules.step_input(plan, order, x0, tokens, t)
            for p in pinned.values():
                p.locked = locked
            for name, fwd in runners.items():
                times[name] += common.time_calls(lambda: schedules.decode_step(fwd, x, mask_id, eos, eot),
                                                 reps=1, warmup=0)
            for kind, rows in (("dense", B * N), ("locked", max(counts[t], 1))):
                gemm_times[kind] += common.time_calls(lambda: gemms(rows), reps=1, warmup=int(t == 0))
    return dict(points=points, step_times_s=times, gemm_step_times_s=gemm_times,
                time_s={name: interpolated_total(points, ts, steps, counts if name.startswith("locked") else None)
                        for name, ts in times.items()},
                gemm_time_s={kind: interpolated_total(points, ts, steps, counts if kind == "locked" else None)
                             for kind, ts in gemm_times.items()})


def exact_decode(variant: Variant, plan, prompt: torch.Tensor, G: int, lock, mask_id) -> dict:
    """A whole ``generate`` call (locked variants: replaying ``plan``, ``schedules.Replay``) and what its runner
    counted: active rows, FLOPs (dense, locked, and computed, padding included) and packed passes."""
    kw = dict(gen_length=G, steps=G, block_length=G, temperature=0.0, remasking="low_confidence")
    if variant.kind == "locked":
        kw.update(lock=lock, schedule=schedules.Replay(plan, mask_id))
    s = surelock_fx.generate(variant.model, prompt, **kw).stats
    return dict(time_s=s.wall_time_s, active_counts=s.active_counts, flops_dense=s.flops_dense,
                flops_locked=s.flops_locked, flops_computed=s.flops_computed, packed_passes=s.packed_passes)


# ----------------------------------------------------------------------------------------------
# one configuration
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Bench:
    """What every configuration of a run shares."""

    args: object
    model: torch.nn.Module
    schedule: schedules.Schedule
    variants: dict
    lock: surelock_fx.LockConfig
    flops: object  # the runtime's FlopModel
    gemms: object  # common.gemm_chain's run(rows)
    gen: torch.Generator  # prompts and unmasking orders, drawn configuration after configuration
    special: tuple  # (mask_id, eos, eot)


def flops_fields(flops, locks: list[torch.Tensor], bucket: int, counts: list[int], widths: list[int]) -> dict:
    """A replayed decode's FLOPs (``counts``: its unpadded active rows), and per backend the passes it runs packed
    and the FLOPs ratio of what its locked graph computes, padding included (``schedules.pass_plans`` of
    ``locks``; see the module docstring)."""
    B, N = locks[0].shape
    dense = sum(flops.step(B * N, N) for _ in counts)
    locked = sum(flops.step(a, N) for a in counts)
    passes = {b: [(plan.packed, plan.flops(flops)) for plan in schedules.pass_plans(locks, bucket, b)]
              for b in BACKEND_NAMES}
    return dict(flops_dense=dense, flops_locked=locked, flops_ratio=locked / dense,
                active_fraction_curve=[c / (B * N) for c in counts], graph_widths=sorted(set(widths)),
                packed_steps={b: sum(packed for packed, _ in ps) for b, ps in passes.items()},
                padded_flops_ratio={b: sum(computed for _, computed in ps) / dense for b, ps in passes.items()})


def exact_times(bench: Bench, row: dict, plan, prompt: torch.Tensor, G: int) -> dict:
    """Times of whole decodes, ``--exact-reps`` per variant, interleaved; the fastest counts. Adds to ``row``
    the runs, the sampled estimate's error, and the ideal speedups of the runners' own FLOP accounting."""
    runs = [{name: exact_decode(v, plan, prompt, G, bench.lock, bench.special[0]) for name, v in bench.variants.items()}
            for _ in range(bench.args.exact_reps)]  # interleaved: every variant once per repetition
    exact = {name: dict(min((run[name] for run in runs), key=lambda e: e["time_s"]),
                        times_s=[run[name]["time_s"] for run in runs]) for name in bench.variants}
    row["exact"] = exact
    row["estimator_error"] = {k: row["sampled"]["time_s"][k] / exact[k]["time_s"] - 1 for k in exact}
    for b in row["ideal_speedup"]:
        e = exact[f"locked/{b}"]
        row["ideal_speedup"][b] = e["flops_dense"] / e["flops_locked"]
    return {k: e["time_s"] for k, e in exact.items()}


def speedups(times: dict, ideal: dict) -> dict:
    """Per backend of ``ideal``: locked against dense (speedup, efficiency) and against the plain model."""
    out = {}
    for b in ideal:
        dense, locked = times.get(f"dense/{b}"), times.get(f"locked/{b}")
        if dense and locked:
            out[f"speedup_{b}"] = dense / locked
            out[f"efficiency_{b}"] = dense / locked / ideal[b]
        if times.get("dense/plain") and locked:
            out[f"speedup_vs_plain_{b}"] = times["dense/plain"] / locked
    return out


def configuration(bench: Bench, B: int, G: int) -> dict:
    """The result row of batch size B and generation length G."""
    args, (mask_id, eos, eot) = bench.args, bench.special
    P, N = args.prompt, args.prompt + G
    seed = args.seed * 1000 + B * 7 + G
    x0, plan, order = schedules.draw_decode(bench.schedule, B, P, G, mask_id, bench.model.config.vocab_size,
                                            bench.gen, seed)
    locks = schedules.replay_locks(plan, order, G)
    counts, widths = schedules.replay_counts(locks, args.bucket)
    row = dict(batch=B, gen_length=G, prompt=P, seq=N, steps=G, mode="exact" if f"{B}x{G}" in args.exact else "sampled",
               **flops_fields(bench.flops, locks, args.bucket, counts, widths))
    row["ideal_speedup"] = {b: row["flops_dense"] / row["flops_locked"] for b in BACKENDS
                            if f"locked/{b}" in bench.variants}
    with common.count_compilations() as compiles:
        warm_up(bench.variants, plan, x0, order, G, bench.lock, mask_id, eos, eot)
    row["compilations_warmup"] = compiles
    with common.count_compilations() as compiles:
        sampled = row["sampled"] = sampled_decode(bench.variants, plan, x0, order, G, args.samples, bench.lock,
                                                  mask_id, eos, eot, bench.gemms, counts)
        gemm = sampled["gemm_time_s"]
        row["gemm_efficiency"] = gemm["dense"] / gemm["locked"] * row["flops_locked"] / row["flops_dense"]
        times = exact_times(bench, row, plan, x0[:, :P], G) if row["mode"] == "exact" else dict(sampled["time_s"])
    row["compilations_timed"] = compiles
    row["time_s"] = times
    row["tokens_per_s"] = {k: B * G / t for k, t in times.items()}
    row.update(speedups(times, row["ideal_speedup"]))
    return row


def run(args) -> dict:
    common.setup(args)
    machine = common.machine_info(args.malloc)  # at the start: its load average is the start's
    bar = common.progress(total=2, desc=f"{NAME}: record schedule", disable=args.no_progress)
    schedule = schedules.record_schedule(args)
    bar.update(2)
    bar.close()
    model = common.random_model(args.preset, seed=args.seed)
    variants = build_variants(model, args.variants, args.bucket)
    flops = next((v.model.flops for v in variants.values() if v.kind == "locked"), None) \
        or surelock_fx.optimize(model).flops
    gemms, _ = common.gemm_chain(model, max(args.batches) * (args.prompt + max(args.gens)))
    bench = Bench(args, model, schedule, variants, surelock_fx.LockConfig(kl_threshold=args.eps), flops, gemms,
                  torch.Generator().manual_seed(args.seed), special_ids(model.config))
    configs = [(B, G) for G in args.gens for B in args.batches]
    results = []
    bar = common.progress(total=len(configs), desc=NAME, disable=args.no_progress)
    for B, G in configs:
        bar.set_postfix_str(f"B={B} G={G}")
        results.append(configuration(bench, B, G))
        bar.update()
    bar.close()
    return dict(benchmark=NAME, machine=machine, quick=args.quick,
                settings=dict(preset=args.preset, batches=args.batches, gens=args.gens, prompt=args.prompt,
                              bucket=args.bucket, samples=args.samples, exact=args.exact, exact_reps=args.exact_reps,
                              variants=args.variants,
                              eps=args.eps, threads=torch.get_num_threads(),
                              sampler="one block, steps = G, temperature 0, low_confidence, no CFG"),
                model=common.describe_model(model), schedule=dataclasses.asdict(schedule), results=results,
                targets=targets(results))


def targets(results: list[dict]) -> dict:
    out = {}
    for backend in BACKENDS:
        vals = [r[f"speedup_{backend}"] for r in results if f"speedup_{backend}" in r]
        out[f"min_speedup_{backend}"] = min(vals, default=None)
        out[f"never_slower_than_dense_{backend}"] = None if not vals else all(v >= 1 for v in vals)
    eff = [r[f"efficiency_{b}"] for r in results for b in BACKENDS if f"efficiency_{b}" in r]
    out["min_efficiency"] = min(eff, default=None)
    near_half = [r for r in results if 0.4 <= r["flops_ratio"] <= 0.6 and "speedup_vs_plain_inductor" in r]
    out["inductor_locked_vs_plain_at_flops_ratio_0_4_to_0_6"] = [
        dict(batch=r["batch"], gen_length=r["gen_length"], flops_ratio=r["flops_ratio"],
             speedup=r["speedup_vs_plain_inductor"]) for r in near_half]
    return out


def plot(result: dict, out_dir: Path) -> list[Path]:
    plt = common.plt()
    rows = result["results"]
    paths = []
    gens = sorted({r["gen_length"] for r in rows})
    fig, axes = plt.subplots(1, len(gens), figsize=(4.2 * len(gens), 3.8), squeeze=False)
    for ax, G in zip(axes[0], gens):
        pts = sorted((r for r in rows if r["gen_length"] == G), key=lambda r: r["batch"])
        Bs = [r["batch"] for r in pts]
        for key, style, label in (*((f"speedup_{b}", f"{m}-", f"{b}: locked / dense") for b, m in zip(BACKENDS, "osd")),
                                  ("speedup_vs_plain_inductor", "^--", "locked inductor / plain eager model")):
            if all(key in r for r in pts):
                ax.plot(Bs, [r[key] for r in pts], style, label=label)
        ax.plot(Bs, [r["flops_dense"] / r["flops_locked"] for r in pts], "k:", label="ideal (FLOPs)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xscale="log", xticks=Bs, xticklabels=[str(b) for b in Bs], xlabel="batch size B",
               ylabel="tokens/s ratio (locked / dense)", title=f"G={G}")
        ax.minorticks_off()  # only the batch sizes are labelled
        ax.legend(fontsize=7)
    paths.append(common.save_figure(fig, out_dir, f"{NAME}_speedup.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["batch"] == max(x["batch"] for x in rows if x["gen_length"] == r["gen_length"]):
            curve = r["active_fraction_curve"]
            ax.plot([t / len(curve) for t in range(len(curve))], curve, label=f"G={r['gen_length']}, P={r['prompt']}")
    rec = result["schedule"]["recorded"]["active_fraction_curve"]
    ax.plot([t / len(rec) for t in range(len(rec))], rec, "k--", label="recorded decode")
    ax.set(xlabel="decode progress t/T", ylabel="active fraction M/N", title="replayed lock schedule", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    paths.append(common.save_figure(fig, out_dir, f"{NAME}_schedule.png"))
    return paths


def main(argv=None):
    result, path = common.run_and_save(NAME, parse_args(argv), run, plot)
    for r in result["results"]:
        print(f"B={r['batch']} G={r['gen_length']:5d} {r['mode']:7s} FLOPs ratio {r['flops_ratio']:.3f}  "
              + "  ".join(f"{k} {v:.2f}s" for k, v in r["time_s"].items())
              + "  speedup " + " ".join(f"{b} {r[f'speedup_{b}']:.2f}" for b in BACKENDS if f"speedup_{b}" in r))
    print(f"targets: {result['targets']}\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
