"""What locking costs besides the graph: ``optimize()`` itself, and the per-step bookkeeping.

    python benchmarks/overhead.py [--quick] [--out DIR]

1. **optimize()**: wall time of its parts, capture (torch.export + cleanup passes), the
   ``lock_rows`` rewrite, and, for inductor, the compilation on the first call (first call minus a
   steady call) and that of its packed form on the first packed pass (which a decode runs only once
   padding pays, ``runtime.PACK_FROM``), next to ``torch.compile`` of the dense model; compilations
   counted with torch._dynamo's counters.
2. **Per-step bookkeeping**: complete decode steps of the locked runner at several points of a
   replayed lock schedule (decode_e2e's replay), profiled with torch.profiler. The runtime labels
   its phases (``surelock::index``, ``surelock::release``, ``surelock::graph``,
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

import common  # noqa: E402
import decode_e2e  # noqa: E402
import surelock_fx  # noqa: E402
from surelock_fx.capture import capture  # noqa: E402
from surelock_fx.passes import lock_rows  # noqa: E402
from surelock_fx.sampler import DecodeStats, select_topk, special_ids, step_candidates  # noqa: E402

NAME = "overhead"
LABELS = ("surelock::index", "surelock::release", "surelock::graph", "surelock::lock_update", "surelock::kl",
          "bench::runner", "bench::sampler")
CACHE_UPDATE_OPS = ("aten::index_copy_", "aten::scatter", "aten::scatter_")
FULL = dict(preset="e2e", batches=[1, 8], gen=256, prompt=64, bucket=1, points=5, reps=2, backends=["eager", "inductor"])
QUICK = dict(preset="small", batches=[1], gen=32, prompt=16, bucket=8, points=3, reps=1, backends=["eager", "inductor"])


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
    ap.add_argument("--eps", type=float, default=5e-3)
    ap.add_argument("--schedule-model", type=Path, default=None)
    ap.add_argument("--cold-cache", dest="cold_cache", action="store_true", default=None,
                    help="compile with an empty inductor cache directory (default in full mode)")
    ap.add_argument("--warm-cache", dest="cold_cache", action="store_false",
                    help="reuse the inductor on-disk caches (default with --quick)")
    args = ap.parse_args(argv)
    if args.cold_cache is None:
        args.cold_cache = not args.quick
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


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
    lock_rows(dense_graph)
    t2 = time.perf_counter()
    out["capture_s"], out["lock_rows_s"] = t1 - t0, t2 - t1
    ids = torch.randint(0, model.config.vocab_size - 8, (B, N), generator=torch.Generator().manual_seed(0))

    def runner_call(opt, pack_from):
        """A fresh runner's first pass (all rows active), packed if pack_from is 0."""
        def call():
            runner = opt.decode_runner(surelock_fx.LockConfig(), DecodeStats())
            runner.pack_from = pack_from
            runner(ids, None)
        return call

    for backend in backends:
        start = time.perf_counter()
        opt = built[backend] = surelock_fx.optimize(model, backend=backend, bucket=bucket)
        optimize_s = time.perf_counter() - start
        first, steady, compiles = first_and_steady(runner_call(opt, float("inf")))  # first call compiles (inductor)
        entry = dict(optimize_s=optimize_s, first_call_s=first, steady_call_s=steady,
                     compile_on_first_call_s=max(0.0, first - steady), compilations=compiles,
                     packed_compile_on_first_use_s=0.0)
        if opt.compiled_packed is not None:
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
            x0, confidence = step_candidates(logits, x, x == mask_id, x.shape[1], mask_id=mask_id, temperature=0.0,
                                             remasking="low_confidence", eos=eos, eot=eot, logits_eos_inf=False,
                                             confidence_eos_eot_inf=False, generator=None)
            torch.where(select_topk(confidence, torch.ones(x.shape[0], dtype=torch.long)), x0, x)
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
    mask_id, eos, eot = special_ids(model.config)
    lock = surelock_fx.LockConfig(kl_threshold=args.eps)
    P, G = args.prompt, args.gen
    N = P + G
    gen = torch.Generator().manual_seed(args.seed)
    x0 = torch.full((B, N), mask_id, dtype=torch.long)
    x0[:, :P] = torch.randint(0, model.config.vocab_size - 8, (B, P), generator=gen)
    plan = decode_e2e.Plan.make(schedule, x0 != mask_id, args.seed)
    order = torch.stack([P + torch.randperm(G, generator=gen) for _ in range(B)])
    tokens = torch.randint(0, model.config.vocab_size - 8, (B, N), generator=gen)
    runner = opt.decode_runner(lock, DecodeStats())

    def replay(t: int):
        """Put the runner in the decode's state before pass ``t``; (its input, locked rows)."""
        unmasked, first = decode_e2e.state_at(plan, order, t)
        locked = plan.locked(first, t) if t else torch.zeros_like(plan.prompt)
        if t:
            runner.state.locked = locked
        else:  # the decode's first pass: a fresh lock state and caches
            runner.state = None
        return torch.where(unmasked & ~plan.prompt, tokens, x0), locked

    rows = []
    with torch.inference_mode():
        decode_e2e.decode_step(runner, x0, mask_id, eos, eot)  # pass 0 (and compilation)
        for t in decode_e2e.sample_points(G, args.points):
            measures = []
            for rep in range(args.reps + 1):  # the first repetition touches the shape (compilation), untimed
                if t:  # pass t - 1 first, untimed: the lock state's per-row caches are then those of a decode
                    decode_e2e.decode_step(runner, replay(t - 1)[0], mask_id, eos, eot)
                x, locked = replay(t)
                measures.append(profiled_step(runner, x, mask_id, eos, eot))
            wall = min(m[0] for m in measures[1:])
            labels = {k: min(m[1].get(k, 0.0) for m in measures[1:]) for k in LABELS + ("cache_scatter",)}
            active = int((~locked).sum())
            index, _ = surelock_fx.lock.active_index(locked, args.bucket)
            M = index.shape[1]
            fake_logits = torch.randn(B, M, model.config.vocab_size, generator=gen)
            legacy = legacy_bookkeeping((B, N + 1, model.config.vocab_size), index, fake_logits, reps=args.reps)
            candidates = int(((x != mask_id) & ~locked).sum()) if t else 0
            runner_s, graph_s = labels["bench::runner"], labels["surelock::graph"]
            step_s = runner_s + labels["bench::sampler"]
            rows.append(dict(backend=backend, batch=B, seq=N, step=t, active_rows=active, fraction=active / (B * N),
                             graph_width=M, kl_candidates=candidates, step_wall_s=wall, step_profiled_s=step_s,
                             phases_s={k.split("::")[-1]: v for k, v in labels.items()},
                             graph_share=graph_s / step_s, bookkeeping_share=(runner_s - graph_s) / step_s,
                             sampler_share=labels["bench::sampler"] / step_s,
                             legacy_bookkeeping_s=legacy, bookkeeping_s=runner_s - graph_s))
            bar.update()
    return rows


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
    schedule = decode_e2e.record_schedule(args)
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
                              inductor_cache="cold (empty cache directory)" if args.cold_cache else "warm (on-disk caches reused)"),
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
        print(f"{s['backend']:9s} B={s['batch']} step {s['step']:4d} M/N={s['fraction']:.2f}  step {s['step_wall_s'] * 1e3:8.1f} ms  "
              f"graph {s['graph_share']:.1%}  bookkeeping {s['bookkeeping_share']:.1%} ({s['bookkeeping_s'] * 1e3:.1f} ms, "
              f"first runtime {s['legacy_bookkeeping_s'] * 1e3:.1f} ms)  sampler {s['sampler_share']:.1%}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
