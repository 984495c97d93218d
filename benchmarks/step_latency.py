"""Per-step latency of the locked graph against the active fraction M/N, dense vs locked.

    python benchmarks/step_latency.py [--quick] [--out DIR]

For each backend (eager: the plain model and the rewritten graph run as they are; inductor: both
compiled with torch.compile) and each sequence length N, one forward pass of the dense model over
all N rows is timed against one pass of the locked graph (``surelock_fx.optimize``) computing M
active rows (a random subset, exact M, no bucket padding) while attending over all N cached keys.
Timings are interleaved (dense, then every M, repeated) so that load on the machine hits both alike;
the median of the repetitions is reported.

    speedup = t_dense / t_locked,  ideal = FLOPs_dense / FLOPs_locked (FlopModel: GEMMs, LM head),
    efficiency = speedup / ideal.

Also reported: the measured crossover (the M/N at which the locked graph stops being faster than
the dense model) and the compilations (torch._dynamo counters) the whole sweep caused.
Writes ``step_latency.json`` and ``step_latency_*.png`` to ``--out``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
import surelock_fx  # noqa: E402
from surelock_fx.passes import cache_specs  # noqa: E402

NAME = "step_latency"
FULL = dict(preset="bench", seqs=[256, 1024], batch=1, reps=3,
            fractions=[0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0], backends=["eager", "inductor"])
QUICK = dict(preset="small", seqs=[256], batch=1, reps=3, fractions=[0.1, 0.25, 0.5, 1.0],
             backends=["eager", "inductor"])


def parse_args(argv=None):
    ap = common.base_parser(__doc__)
    ap.add_argument("--preset", choices=sorted(common.PRESETS), help="model size (default: bench; small with --quick)")
    ap.add_argument("--seqs", type=int, nargs="+", help="sequence lengths N")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--fractions", type=float, nargs="+", help="active fractions M/N")
    ap.add_argument("--backends", nargs="+", choices=["eager", "inductor"])
    args = ap.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def locked_inputs(opt, B: int, N: int, M: int, gen: torch.Generator):
    """Inputs of the locked graph computing M random active rows of N, with zero caches."""
    V = opt.config.vocab_size
    ids = torch.randint(0, V - 8, (B, N), generator=gen)
    positions = torch.arange(N).expand(B, N)
    index = torch.stack([torch.randperm(N, generator=gen)[:M].sort().values for _ in range(B)])
    key_mask = torch.ones(B, N, dtype=torch.bool)
    caches = [torch.zeros(B, s.heads, N + 1, s.head_dim, dtype=s.dtype) for s in cache_specs(opt.graph_module)]
    return ids, positions, index, key_mask, caches


def crossover(points: list[dict]) -> float | None:
    """The M/N where t_locked / t_dense reaches 1, by linear interpolation between measured points;
    None if the locked graph is faster everywhere measured (the crossover lies at or beyond M = N)."""
    pts = sorted(points, key=lambda p: p["fraction"])
    prev = None
    for p in pts:
        ratio = p["t_locked_s"] / p["t_dense_s"]
        if ratio >= 1:
            if prev is None:
                return p["fraction"]
            f0, r0 = prev
            return f0 + (1 - r0) * (p["fraction"] - f0) / (ratio - r0)
        prev = (p["fraction"], ratio)
    return None


def run(args) -> dict:
    common.setup(args)
    model = common.random_model(args.preset, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    results, compilations, optimize_s = [], {}, {}
    jobs = [(b, N) for b in args.backends for N in args.seqs]
    bar = common.progress(total=len(jobs) * args.reps * (len(args.fractions) + 1), desc=NAME, disable=args.no_progress)
    built = {}
    for backend, N in jobs:
        B = args.batch
        if backend not in built:  # one optimized model and one dense baseline per backend, shared by all N
            built[backend] = surelock_fx.optimize(model, backend=backend), common.compiled_dense(model, backend)
        opt, dense = built[backend]
        optimize_s[backend] = opt.compile_seconds
        ids = torch.randint(0, model.config.vocab_size - 8, (B, N), generator=gen)
        Ms = sorted({max(1, round(f * N)) for f in args.fractions})
        inputs = {M: locked_inputs(opt, B, N, M, gen) for M in Ms}

        def dense_call():
            return dense(ids)

        def locked_call(M):
            i, p, idx, km, caches = inputs[M]
            return opt(i, p, idx, km, *caches)

        with torch.inference_mode(), common.count_compilations() as compiled:
            bar.set_postfix_str(f"{backend} N={N} warmup/compile")
            dense_call()
            for M in Ms:  # warm-up: compiles (inductor) and touches every shape once
                locked_call(M)
            t_dense, t_locked = [], {M: [] for M in Ms}
            for rep in range(args.reps):
                bar.set_postfix_str(f"{backend} N={N} rep {rep + 1}/{args.reps}")
                t_dense += common.time_calls(dense_call, reps=1, warmup=0)
                bar.update()
                for M in Ms:
                    t_locked[M] += common.time_calls(lambda: locked_call(M), reps=1, warmup=0)
                    bar.update()
        compilations[f"{backend}/N={N}"] = compiled
        td = common.summary(t_dense)["median_s"]
        flops_dense = opt.flops.step(B * N, N)
        for M in Ms:
            tl = common.summary(t_locked[M])["median_s"]
            flops_locked = opt.flops.step(B * M, N)
            results.append(dict(backend=backend, batch=B, seq=N, active_rows=M, fraction=M / N,
                                t_dense_s=td, t_locked_s=tl, flops_dense=flops_dense, flops_locked=flops_locked,
                                dense_times_s=t_dense, locked_times_s=t_locked[M],
                                **common.efficiency(td, tl, flops_dense, flops_locked)))
    bar.close()
    crossovers = [dict(backend=b, seq=N, fraction=crossover([r for r in results if r["backend"] == b and r["seq"] == N]))
                  for b, N in jobs]
    return dict(benchmark=NAME, machine=common.machine_info(), quick=args.quick,
                settings=dict(preset=args.preset, seqs=args.seqs, batch=args.batch, reps=args.reps,
                              fractions=args.fractions, backends=args.backends, threads=torch.get_num_threads(),
                              dense_baseline="plain model (eager) / torch.compile(model, dynamic=False) (inductor)",
                              locked_graph="surelock_fx.optimize(model, backend) graph, exact M active rows"),
                model=common.describe_model(model), results=results, crossover=crossovers,
                compilations=compilations, optimize_seconds=optimize_s, targets=targets(results))


def targets(results: list[dict]) -> dict:
    """Efficiency >= 0.9 where M/N >= 0.1; inductor locked >= 2x eager dense at M/N ~ 0.5."""
    eff = [r for r in results if r["fraction"] >= 0.1 - 1e-9]
    out = dict(min_efficiency_at_fraction_ge_0_1=min((r["efficiency"] for r in eff), default=None))
    eager_dense = {(r["seq"], r["batch"]): r["t_dense_s"] for r in results if r["backend"] == "eager"}
    half = [r for r in results if r["backend"] == "inductor" and abs(r["fraction"] - 0.5) < 0.05
            and (r["seq"], r["batch"]) in eager_dense]
    out["inductor_locked_half_vs_eager_dense"] = [
        dict(seq=r["seq"], fraction=r["fraction"], speedup=eager_dense[(r["seq"], r["batch"])] / r["t_locked_s"])
        for r in half]
    return out


def plot(result: dict, out_dir: Path) -> list[Path]:
    plt = common.plt()
    paths = []
    rows = result["results"]
    backends = sorted({r["backend"] for r in rows})
    for N in sorted({r["seq"] for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for backend, color in zip(backends, ("tab:blue", "tab:orange")):
            pts = sorted((r for r in rows if r["seq"] == N and r["backend"] == backend), key=lambda r: r["fraction"])
            if not pts:
                continue
            f = [p["fraction"] for p in pts]
            axes[0].plot(f, [p["t_locked_s"] * 1e3 for p in pts], "o-", color=color, label=f"locked ({backend})")
            axes[0].axhline(pts[0]["t_dense_s"] * 1e3, color=color, ls="--", label=f"dense ({backend})")
            axes[0].plot(f, [p["t_dense_s"] * 1e3 / p["ideal_speedup"] for p in pts], ":", color=color,
                         label=f"ideal = dense x FLOPs ratio ({backend})")
            axes[1].plot(f, [p["efficiency"] for p in pts], "o-", color=color, label=backend)
        axes[0].set(xlabel="active fraction M/N", ylabel="ms per forward pass", title=f"step latency, N={N}")
        axes[0].legend(fontsize=7)
        axes[1].axhline(0.9, color="gray", ls=":", label="target 0.9")
        axes[1].axvline(0.1, color="lightgray", ls="-")
        axes[1].set(xlabel="active fraction M/N", ylabel="speedup / ideal speedup", title=f"efficiency, N={N}",
                    ylim=(0, max(1.2, max(r["efficiency"] for r in rows) * 1.05)))
        axes[1].legend(fontsize=7)
        paths.append(common.save_figure(fig, out_dir, f"{NAME}_N{N}.png"))
    return paths


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    path = common.write_json(args.out / f"{NAME}.json", result)
    plot(result, args.out)
    for r in result["results"]:
        print(f"{r['backend']:9s} N={r['seq']:5d} M/N={r['fraction']:.3f}  dense {r['t_dense_s'] * 1e3:8.1f} ms  "
              f"locked {r['t_locked_s'] * 1e3:8.1f} ms  speedup {r['speedup']:.2f}  ideal {r['ideal_speedup']:.2f}  "
              f"efficiency {r['efficiency']:.2f}")
    print(f"crossover: {result['crossover']}\ncompilations: {result['compilations']}\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
