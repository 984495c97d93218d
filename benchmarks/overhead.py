"""What locking costs besides the graph: ``optimize()`` itself, and the per-step bookkeeping.

    python benchmarks/overhead.py [--quick] [--out DIR]

1. **optimize()**: wall time of its parts, capture (torch.export + cleanup passes), the
   ``lock_rows`` rewrite, and, for inductor, the compilation on the first call (first call minus a
   steady call) and that of its packed form on the first packed pass (which a decode runs only once
   padding pays, ``runtime.PACK_FROM``), next to ``torch.compile`` of the dense model; compilations
   counted with torch._dynamo's counters.
2. **Per-step bookkeeping**: complete decode steps of the locked runner at several points of a
   replayed lock schedule (``schedules.py``, as decode_e2e replays it), profiled with torch.profiler.
   The runtime labels its phases (``surelock::index``, ``surelock::release``, ``surelock::graph``,
   ``surelock::lock_update`` with ``surelock::kl`` inside); the sampler's work is labelled here;
   the K/V cache updates inside the graph are the eager graph's ``aten::index_copy_`` ops.
   Reported per step: wall time, each phase's share, and the bookkeeping share
   (runner time - graph time) / step time. For comparison, the bookkeeping of the first runtime
   (log-softmax and KL over all M rows against a [B, N + 1, V] log-prob buffer gathered and
   scattered with expanded indices, and a scatter_ of the logits into a second such buffer) is
   timed on the same tensors.
Writes ``overhead.json`` and ``overhead_*.png``.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import surelock_fx  # noqa: E402
from surelock_fx.capture import capture  # noqa: E402
from surelock_fx.decoding import DecodeStats, special_ids  # noqa: E402
from surelock_fx.passes.pipeline import LOCK, run_pipeline  # noqa: E402
from surelock_fx.runtime import plan_pass  # noqa: E402

import common  # noqa: E402
import schedules  # noqa: E402

NAME = "overhead"
LABELS = ("surelock::index", "surelock::release", "surelock::graph", "surelock::lock_update", "surelock::kl",
          "bench::runner", "bench::sampler")
CACHE_UPDATE_OPS = ("aten::index_copy_", "aten::scatter", "aten::scatter_")
FULL = dict(preset="e2e", batches=[1, 8], gen=256, prompt=64, bucket=1, points=5, reps=2,
            backends=["eager", "inductor"])
QUICK = dict(preset="small", batches=[1], gen=32, prompt=16, bucket=8, points=3, reps=1,
             backends=["eager", "inductor"])


def parse_args(argv=None):
    ap = common.base_parser(__doc__)
    ap.add_argument("--preset", choices=sorted(common.PRESETS))
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--gen", type=int, help="generation length G of the replayed decode")
    ap.add_argument("--prompt", type=int)
    ap.add_argument("--bucket", type=int)
    ap.add_argument("--points", type=int, help="decode steps measured per configuration")
    ap.add_argument("--reps", type=int, help="profiled repetitions of each step")
    ap.add_argument("--backends", nargs="+", choices=["eager", "inductor"])
    schedules.add_arguments(ap)
    ap.add_argument("--cold-cache", dest="cold_cache", action="store_true", default=None,
                    help="compile with an empty inductor cache directory (default in full mode)")
    ap.add_argument("--warm-cache", dest="cold_cache", action="store_false",
                    help="reuse the inductor on-disk caches (default with --quick)")
    args = ap.parse_args(argv)
    if args.cold_cache is None:
        args.cold_cache = not args.quick
    return common.fill_defaults(args, QUICK, FULL)


def first_and_steady(call) -> tuple[float, float, dict]:
    """(seconds of the first of three calls, of the fastest later one, compilations during them)."""
    times = []
    with common.count_compilations() as compiles, torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return times[0], min(times[1:]), compiles


def optimize_cost(model, backends, B: int, N: int, bucket: int) -> tuple[dict, dict]:
    """Seconds of capture, rewrite, and first-call compilation, per backend (inductor: of its padded
    graph at the first call, of its packed form at the first packed one), with dense torch.compile
    alongside; and the optimized models (reused for the step measurements)."""
    out, built = {}, {}
    t0 = time.perf_counter()
    dense_graph = capture(model)
    t1 = time.perf_counter()
    run_pipeline(dense_graph, LOCK)
    t2 = time.perf_counter()
    out["capture_s"], out["lock_rows_s"] = t1 - t0, t2 - t1
    ids = torch.randint(0, model.config.vocab_size - 8, (B, N), generator=torch.Generator().manual_seed(0))

    def runner_call(opt, pack_from):
        """A fresh runner's first pass (all rows active), packed if pack_from is 0."""
        return lambda: opt.decode_runner(surelock_fx.LockConfig(), DecodeStats(), pack_from=pack_from)(ids, None)

    for backend in backends:
        start = time.perf_counter()
        opt = built[backend] = surelock_fx.optimize(model, backend=backend, bucket=bucket)
        optimize_s = time.perf_counter() - start
        first, steady, compiles = first_and_steady(runner_call(opt, float("inf")))  # first call compiles (inductor)
        entry = dict(optimize_s=optimize_s, first_call_s=first, steady_call_s=steady,
                     compile_on_first_call_s=max(0.0, first - steady), compilations=compiles,
                     packed_compile_on_first_use_s=0.0)
        if schedules.both_forms(opt):
            first, steady, compiles = first_and_steady(runner_call(opt, 0.0))
            entry["packed_compile_on_first_use_s"] = max(0.0, first - steady)
            entry["packed_compilations"] = compiles
        dense = common.compiled_dense(model, backend)
        first, steady, compiles = first_and_steady(lambda: dense(ids))
        entry.update(dense_first_call_s=first, dense_steady_call_s=steady, dense_compile_s=max(0.0, first - steady),
                     dense_compilations=compiles)
        entry["total_setup_s"] = optimize_s + entry["compile_on_first_call_s"] + entry["packed_compile_on_first_use_s"]
        out[backend] = entry
    return out, built


def profiled_step(runner, x, mask_id, eos, eot) -> tuple[float, dict]:
    """One decode step under torch.profiler: (wall seconds, CPU seconds per label)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        with record_function("bench::runner"):
            logits = runner(x, None)
        with record_function("bench::sampler"):
            schedules.sample_step(logits, x, mask_id, eos, eot)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    labels = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in LABELS}
    # the K/V cache updates inside the graph: in the eager graph aten::index_copy_ of whole rows
    # (passes.index_copy_cache_updates), aten::scatter_ where a cache update was left as is (inductor
    # fuses them into its generated kernels, where they cannot be told apart)
    labels["cache_scatter"] = sum(e.self_cpu_time_total for e in prof.events()
                                  if e.name in CACHE_UPDATE_OPS and _inside(e, "surelock::graph")) / 1e6
    return wall, labels


def _inside(event, label: str) -> bool:
    """Whether a profiler event ran under the record_function ``label``."""
    while event is not None:
        if event.name == label:
            return True
        event = event.cpu_parent
    return False


def legacy_bookkeeping(state_shape, index: torch.Tensor, logits: torch.Tensor, reps: int) -> float:
    """Seconds of the first runtime's per-step bookkeeping on these tensors (see the module docstring)."""
    B, N1, V = state_shape
    prev_logp = torch.zeros(B, N1, V)
    logits_buf = torch.zeros(B, N1, V, dtype=logits.dtype)

    def step():
        logp = torch.log_softmax(logits.float(), dim=-1)
        rows = index.unsqueeze(-1).expand_as(logp)
        prev = prev_logp.gather(1, rows)
        (logp.exp() * (logp - prev)).sum(-1)
        prev_logp.scatter_(1, rows, logp)
        logits_buf.scatter_(1, index.unsqueeze(-1).expand_as(logits), logits)

    return min(common.time_calls(step, reps=reps, warmup=1))


def bookkeeping(model, opt, args, schedule, backend: str, B: int, bar) -> list[dict]:
    """Profiled steps of ``opt``'s runner at ``--points`` passes of a replayed decode of batch size B: each pass t
    in the decode's state, pinned to the plan's rows at t (``schedules.Pinned``) after an untimed pass t - 1; a
    fresh runner for pass 0."""
    mask_id, eos, eot = special_ids(model.config)
    lock = surelock_fx.LockConfig(kl_threshold=args.eps)
    P, G = args.prompt, args.gen
    N, V = P + G, model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    x0, plan, order = schedules.draw_decode(schedule, B, P, G, mask_id, V, gen, args.seed)
    tokens = torch.randint(0, V - 8, (B, N), generator=gen)
    pinned = schedules.Pinned(opt, lock)

    def replay(t: int):
        """Put the runner in the decode's state before pass ``t``; (its input, locked rows)."""
        x, locked = schedules.step_input(plan, order, x0, tokens, t)
        if not t:
            pinned.restart()  # the first pass: a fresh lock state and caches
        pinned.locked = locked
        return x, locked

    rows = []
    with torch.inference_mode():
        schedules.decode_step(pinned.runner, x0, mask_id, eos, eot)  # pass 0 (and compilation)
        for t in schedules.sample_points(G, args.points):
            measures = []
            for rep in range(args.reps + 1):  # the first repetition touches the shape (compilation), untimed
                if t:  # pass t - 1 first, untimed: the lock state's per-row caches are then those of a decode
                    schedules.decode_step(pinned.runner, replay(t - 1)[0], mask_id, eos, eot)
                x, locked = replay(t)
                measures.append(profiled_step(pinned.runner, x, mask_id, eos, eot))
            index = plan_pass(locked, args.bucket).index
            legacy = legacy_bookkeeping((B, N + 1, V), index, torch.randn(B, index.shape[1], V, generator=gen),
                                        reps=args.reps)
            candidates = int(((x != mask_id) & ~locked).sum()) if t else 0
            rows.append(dict(backend=backend, batch=B, seq=N, step=t, **step_summary(measures[1:], locked),
                             graph_width=index.shape[1], kl_candidates=candidates, legacy_bookkeeping_s=legacy))
            bar.update()
    return rows


def step_summary(measures: list[tuple[float, dict]], locked: torch.Tensor) -> dict:
    """Active rows, wall time and phase shares of a step, the fastest of its profiled repetitions."""
    labels = {k: min(m[1].get(k, 0.0) for m in measures) for k in LABELS + ("cache_scatter",)}
    active = int((~locked).sum())
    runner_s, graph_s, sampler_s = labels["bench::runner"], labels["surelock::graph"], labels["bench::sampler"]
    step_s = runner_s + sampler_s
    return dict(active_rows=active, fraction=active / locked.numel(), step_wall_s=min(m[0] for m in measures),
                step_profiled_s=step_s, phases_s={k.split("::")[-1]: v for k, v in labels.items()},
                graph_share=graph_s / step_s, bookkeeping_share=(runner_s - graph_s) / step_s,
                sampler_share=sampler_s / step_s, bookkeeping_s=runner_s - graph_s)


def run(args) -> dict:
    common.setup(args)
    machine = common.machine_info(args.malloc)  # at the start: its load average is the start's
    if args.cold_cache:  # must precede the first compilation of this process
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="surelock-overhead-inductor-")
    model = common.random_model(args.preset, seed=args.seed)
    bar = common.progress(total=1 + len(args.backends) * len(args.batches) * args.points, desc=NAME,
                          disable=args.no_progress)
    bar.set_postfix_str("optimize() cost")
    setup_cost, built = optimize_cost(model, args.backends, args.batches[0], args.prompt + args.gen, args.bucket)
    bar.update()
    schedule = schedules.record_schedule(args)
    steps = []
    for backend in args.backends:
        for B in args.batches:
            bar.set_postfix_str(f"{backend} B={B}")
            steps += bookkeeping(model, built[backend], args, schedule, backend, B, bar)
    bar.close()
    return dict(benchmark=NAME, machine=machine, quick=args.quick,
                settings=dict(preset=args.preset, batches=args.batches, gen=args.gen, prompt=args.prompt,
                              bucket=args.bucket, points=args.points, reps=args.reps, backends=args.backends,
                              eps=args.eps, threads=torch.get_num_threads(), schedule_source=schedule.source,
                              inductor_cache="cold (empty cache directory)" if args.cold_cache
                              else "warm (on-disk caches reused)"),
                model=common.describe_model(model), optimize_cost=setup_cost, steps=steps)


def plot(result: dict, out_dir: Path) -> list[Path]:
    plt = common.plt()
    steps = result["steps"]
    groups = sorted({(s["backend"], s["batch"]) for s in steps})
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.8), squeeze=False, sharey=True)
    for ax, (backend, B) in zip(axes[0], groups):
        pts = sorted((s for s in steps if s["backend"] == backend and s["batch"] == B), key=lambda s: s["step"])
        labels = [f"{s['fraction']:.2f}" for s in pts]
        graph = [s["graph_share"] for s in pts]
        book = [s["bookkeeping_share"] for s in pts]
        samp = [s["sampler_share"] for s in pts]
        ax.bar(labels, graph, label="graph")
        ax.bar(labels, book, bottom=graph, label="runner bookkeeping")
        ax.bar(labels, samp, bottom=[g + b for g, b in zip(graph, book)], label="sampler")
        ax.set(title=f"{backend}, B={B}", xlabel="active fraction M/N")
    axes[0][0].set_ylabel("share of step time")
    axes[0][0].legend(fontsize=7)
    return [common.save_figure(fig, out_dir, f"{NAME}_step_shares.png")]


def main(argv=None):
    result, path = common.run_and_save(NAME, parse_args(argv), run, plot)
    for backend, entry in result["optimize_cost"].items():
        print(f"{backend}: {entry}")
    for s in result["steps"]:
        print(f"{s['backend']:9s} B={s['batch']} step {s['step']:4d} M/N={s['fraction']:.2f}  "
              f"step {s['step_wall_s'] * 1e3:8.1f} ms  graph {s['graph_share']:.1%}  "
              f"bookkeeping {s['bookkeeping_share']:.1%} ({s['bookkeeping_s'] * 1e3:.1f} ms, "
              f"first runtime {s['legacy_bookkeeping_s'] * 1e3:.1f} ms)  sampler {s['sampler_share']:.1%}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
