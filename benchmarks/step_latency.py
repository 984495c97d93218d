"""Per-step latency of the locked graph against the active fraction M/N, dense vs locked.

    python benchmarks/step_latency.py [--quick] [--out DIR]

For each backend and each sequence length N, one forward pass of the dense model over all N rows
is timed against one pass of the locked graph (``surelock_fx.optimize(model, backend)``) computing
M active rows (a random subset, exact M, no bucket padding) while attending over all N cached keys.
The dense baseline of a backend is the same pipeline without the locking rewrite
(``common.compiled_dense``): eager, the captured graph with its linear weights prepacked for oneDNN as
the locked graph's are; inductor, torch.compile of it with frozen weights; onnxruntime, the plain
model exported to ONNX, both in ONNX Runtime CPU sessions with as many threads as torch. The plain
model in PyTorch eager, what a user runs without surelock_fx, is timed too.
Timings are interleaved (every backend, dense then every M, repeated) so that load on the machine
hits all alike; the minimum over the repetitions is reported (load only ever adds time).

    speedup = t_dense / t_locked,  ideal = FLOPs_dense / FLOPs_locked (FlopModel: GEMMs, LM head),
    efficiency = speedup / ideal,  speedup_vs_plain = t_plain / t_locked.

The model's GEMMs alone (``common.gemm_chain``: its linear layers called back to back on prepacked weights)
are timed at the same row counts: their efficiency bounds what a pass at that many rows can reach.

Also reported: the measured crossover (the M/N at which the locked graph stops being faster than
the dense model) and the compilations (torch._dynamo counters) the whole sweep caused.
Writes ``step_latency.json`` and ``step_latency_*.png`` to ``--out``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from surelock_fx.signature import cache_specs  # noqa: E402

import common  # noqa: E402

NAME = "step_latency"
FULL = dict(preset="bench", seqs=[256, 1024], batch=1, reps=3,
            fractions=[0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0], backends=["eager", "inductor", "onnxruntime"])
QUICK = dict(preset="small", seqs=[256], batch=1, reps=3, fractions=[0.1, 0.25, 0.5, 1.0],
             backends=["eager", "inductor", "onnxruntime"])


def parse_args(argv=None):
    ap = common.base_parser(__doc__)
    ap.add_argument("--preset", choices=sorted(common.PRESETS), help="model size (default: bench; small with --quick)")
    ap.add_argument("--seqs", type=int, nargs="+", help="sequence lengths N")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--fractions", type=float, nargs="+", help="active fractions M/N")
    ap.add_argument("--backends", nargs="+", choices=["eager", "inductor", "onnxruntime"])
    return common.fill_defaults(ap.parse_args(argv), QUICK, FULL)


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


def build(model, backend: str):
    """(optimized model, dense baseline) of a backend."""
    return common.optimized(model, backend), common.compiled_dense(model, backend)


def run(args) -> dict:
    common.setup(args)
    machine = common.machine_info(args.malloc)  # at the start: its load average is the start's
    model = common.random_model(args.preset, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    B = args.batch
    built = {backend: build(model, backend) for backend in args.backends}
    optimize_s = {backend: opt.compile_seconds for backend, (opt, _) in built.items()}
    ids = {N: torch.randint(0, model.config.vocab_size - 8, (B, N), generator=gen) for N in args.seqs}
    Ms = {N: sorted({max(1, round(f * N)) for f in args.fractions}) for N in args.seqs}
    inputs = {(backend, N, M): locked_inputs(built[backend][0], B, N, M, gen)
              for backend in args.backends for N in args.seqs for M in Ms[N]}

    gemms, _ = common.gemm_chain(model, B * max(args.seqs))

    def dense_call(backend, N):
        return built[backend][1](ids[N])

    def plain_call(N):
        return model(ids[N])

    def locked_call(backend, N, M):
        i, p, idx, km, caches = inputs[(backend, N, M)]
        return built[backend][0](i, p, idx, km, *caches)

    jobs = [(backend, N) for N in args.seqs for backend in args.backends]
    compilations = {}
    bar = common.progress(total=len(jobs) * (args.reps + 1), desc=NAME, disable=args.no_progress)
    with torch.inference_mode():
        for N in args.seqs:
            plain_call(N)
        for backend, N in jobs:  # warm-up: compiles (inductor) and touches every shape once
            bar.set_postfix_str(f"{backend} N={N} warm-up/compile")
            with common.count_compilations() as compiled:
                dense_call(backend, N)
                for M in Ms[N]:
                    locked_call(backend, N, M)
            compilations[f"{backend}/N={N}"] = compiled
            bar.update()
        t_dense = {job: [] for job in jobs}
        t_plain = {N: [] for N in args.seqs}
        t_gemm = {B * M: [] for N in args.seqs for M in Ms[N] + [N]}
        t_locked = {(b, N, M): [] for b, N in jobs for M in Ms[N]}
        with common.count_compilations() as timed_compiles:
            # interleaved: plain, then every backend, dense and every M, in each repetition
            for rep in range(args.reps):
                for N in args.seqs:
                    t_plain[N] += common.time_calls(lambda: plain_call(N), reps=1, warmup=0)
                for rows in t_gemm:
                    t_gemm[rows] += common.time_calls(lambda: gemms(rows), reps=1, warmup=int(rep == 0))
                for backend, N in jobs:
                    bar.set_postfix_str(f"rep {rep + 1}/{args.reps} {backend} N={N}")
                    t_dense[(backend, N)] += common.time_calls(lambda: dense_call(backend, N), reps=1, warmup=0)
                    for M in Ms[N]:
                        t_locked[(backend, N, M)] += common.time_calls(lambda: locked_call(backend, N, M), reps=1,
                                                                       warmup=0)
                    bar.update()
    bar.close()
    results = []
    for backend, N in jobs:
        td, tp = min(t_dense[(backend, N)]), min(t_plain[N])
        opt = built[backend][0]
        flops_dense = opt.flops.step(B * N, N)
        for M in Ms[N]:
            tl = min(t_locked[(backend, N, M)])
            flops_locked = opt.flops.step(B * M, N)
            results.append(dict(backend=backend, batch=B, seq=N, active_rows=M, fraction=M / N,
                                t_dense_s=td, t_locked_s=tl, t_plain_s=tp, speedup_vs_plain=tp / tl,
                                flops_dense=flops_dense, flops_locked=flops_locked,
                                dense_times_s=t_dense[(backend, N)], locked_times_s=t_locked[(backend, N, M)],
                                plain_times_s=t_plain[N], t_gemm_dense_s=min(t_gemm[B * N]),
                                t_gemm_locked_s=min(t_gemm[B * M]),
                                gemm_efficiency=min(t_gemm[B * N]) / min(t_gemm[B * M]) * M / N,
                                **common.efficiency(td, tl, flops_dense, flops_locked)))
    crossovers = [dict(backend=b, seq=N,
                       fraction=crossover([r for r in results if r["backend"] == b and r["seq"] == N]))
                  for b, N in jobs]
    return dict(benchmark=NAME, machine=machine, quick=args.quick,
                settings=dict(preset=args.preset, seqs=args.seqs, batch=args.batch, reps=args.reps,
                              fractions=args.fractions, backends=args.backends, threads=torch.get_num_threads(),
                              statistic="minimum over interleaved repetitions",
                              dense_baseline="the backend's pipeline without the locking rewrite: captured graph "
                                             "with prepacked linear weights (eager), torch.compile of it with frozen "
                                             "weights (inductor), the plain model exported to ONNX (onnxruntime)",
                              plain="the model in PyTorch eager, unpacked weights",
                              locked_graph="surelock_fx.optimize(model, backend) graph, exact M active rows",
                              gemm_chain="the model's linear layers alone, one oneDNN call each on the eager "
                                         "pipeline's prepacked weights, at B*N and B*M rows; gemm_efficiency = "
                                         "(t_gemm(N) / t_gemm(M)) / (N / M)"),
                model=common.describe_model(model), results=results, crossover=crossovers,
                compilations=compilations, compilations_timed=timed_compiles, optimize_seconds=optimize_s,
                targets=targets(results))


def targets(results: list[dict]) -> dict:
    """Efficiency >= 0.9 where M/N >= 0.1; the locked graph against the plain eager model at M/N ~ 0.5."""
    out = {}
    for backend in sorted({r["backend"] for r in results}):
        eff = [r["efficiency"] for r in results if r["backend"] == backend and r["fraction"] >= 0.1 - 1e-9]
        out[f"min_efficiency_at_fraction_ge_0_1/{backend}"] = min(eff, default=None)
    out["locked_half_vs_plain_eager"] = [
        dict(backend=r["backend"], seq=r["seq"], fraction=r["fraction"], speedup=r["speedup_vs_plain"])
        for r in results if abs(r["fraction"] - 0.5) < 0.05]
    return out


def plot(result: dict, out_dir: Path) -> list[Path]:
    plt = common.plt()
    paths = []
    rows = result["results"]
    backends = sorted({r["backend"] for r in rows})
    for N in sorted({r["seq"] for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for backend, color in zip(backends, ("tab:blue", "tab:orange", "tab:green")):
            pts = sorted((r for r in rows if r["seq"] == N and r["backend"] == backend), key=lambda r: r["fraction"])
            if not pts:
                continue
            f = [p["fraction"] for p in pts]
            axes[0].plot(f, [p["t_locked_s"] * 1e3 for p in pts], "o-", color=color, label=f"locked ({backend})")
            axes[0].axhline(pts[0]["t_dense_s"] * 1e3, color=color, ls="--", label=f"dense ({backend})")
            axes[0].plot(f, [p["t_dense_s"] * 1e3 / p["ideal_speedup"] for p in pts], ":", color=color,
                         label=f"ideal = dense x FLOPs ratio ({backend})")
            axes[1].plot(f, [p["efficiency"] for p in pts], "o-", color=color, label=backend)
        gemm = sorted({(r["fraction"], r["gemm_efficiency"]) for r in rows if r["seq"] == N})
        axes[1].plot(*zip(*gemm), "s--", color="gray", label="the GEMMs alone (bound)")
        plain = next(r["t_plain_s"] for r in rows if r["seq"] == N)
        axes[0].axhline(plain * 1e3, color="black", ls="-.", label="plain model (PyTorch eager)")
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
    result, path = common.run_and_save(NAME, parse_args(argv), run, plot)
    for r in result["results"]:
        print(f"{r['backend']:9s} N={r['seq']:5d} M/N={r['fraction']:.3f}  dense {r['t_dense_s'] * 1e3:8.1f} ms  "
              f"locked {r['t_locked_s'] * 1e3:8.1f} ms  speedup {r['speedup']:.2f}  ideal {r['ideal_speedup']:.2f}  "
              f"efficiency {r['efficiency']:.2f} (GEMMs alone {r['gemm_efficiency']:.2f})  "
              f"vs plain eager {r['speedup_vs_plain']:.2f}")
    print(f"crossover: {result['crossover']}\ncompilations: {result['compilations']}\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
