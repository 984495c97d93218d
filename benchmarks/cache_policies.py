"""Cache policies end to end: dense, SureLock, Fast-dLLM's prefix and dual caches and dual + SureLock, each with
and without threshold decoding, at the shapes of long decodes.

    python benchmarks/cache_policies.py [--quick] [--out DIR] [--preset e2e] [--prompts 64 512] [--batches 1 8]

Whole decodes of a benchmark-size model at N = P + 256 and B = 8 take hours on a CPU, so the script measures
what a decode's time is made of and adds it up:

1. **Record** on the shipped checkpoint and its task prompts (``schedules.schedule_source``; ``--schedule-model``):
   a decode with each threshold variant's settings (``--threshold``; one block of the benchmark's block length, or
   of the recorded gen if shorter), from which the steps each prompt row took per block, relative to the block's
   length (rows commit alone: a row's steps in a block are its own, whatever the others do); and a locked decode
   (``--eps``, LLaDA's schedule, steps = gen, ``--record-blocks`` blocks: as many as the benchmark's by default)
   of each cache policy a locked variant uses, from which its lock timing (``lock_timing``: per generated token
   the computations from the first pass that saw it unmasked to its lock, per prompt token those up to its lock;
   from ``stats.unmask_step`` and ``lock_state.lock_step``). Lock timing counts a token's own computations, not
   passes, since a cache policy computes some tokens at block starts only; threshold variants replay the timing
   of their policy's LLaDA-schedule decode.
2. **Replay** at every (B, P): variants without threshold run steps = gen (one token per step); threshold
   variants the step count of the recorded profile at batch B (per block: the block length times the expected
   largest relative steps of B rows, rounded), in LLaDA's even per-step schedule: the replay of threshold
   decoding's step count, not of its choice of tokens. Locked variants lock by the recorded timing
   (``ReplaySchedule``, a ``runtime.LockSchedule``), so the rows each pass computes depend on the policy, the
   steps and the seeded draws only. A real decode of the replay on the random 'tiny' model (eager backend)
   gives every pass's computed rows (``stats.active_counts``); the KL candidate rows (computed and unmasked,
   locked variants, from pass 1) and the rows the sampler reads (the block's masked ones) are counted beside.
3. **Time** on the benchmark model (``--preset``, random weights, one thread by default; ``--clock``: wall or CPU
   time), interleaved, the fastest of ``--reps``: the dense graph's pass (``common.compiled_dense``, eager) at
   B x N rows; a runner pass of the locked graph (``surelock_fx.optimize``, eager: active index, release, graph,
   lock update; the rows it computes masked, so that none is a KL candidate) at ``--points`` row counts from the
   fewest any pass computes to B x N; the model's GEMMs alone (``common.gemm_chain``) at the same counts; the
   sampler's step at 1, block / 2 and block masked rows per batch row; the lock rule's KL. A decode's time is the
   sum over its passes of the pass time interpolated in the rows it computes (the dense graph's for dense
   variants), the KL's in its candidate rows and the sampler's in its masked rows.
4. **Validate** the estimate once (``--validate B P G``): dense and dual+lock decoded whole on the benchmark
   model, the same replay; the JSON reports estimate / measured - 1 (wall and CPU time measured), the error of
   the speedup between them, and whether the whole decodes computed the replayed rows at every pass.

Reported per (B, P) and variant: steps, forward passes, tokens/s (B x gen / time), the FLOPs ratio against the
dense LLaDA sampler (runtime FlopModel of the benchmark model: the computed rows against B x N rows at each of
gen steps), speedup against it, efficiency (speedup / FLOPs ideal), the same efficiency of the GEMMs alone and
the share of the time the GEMMs alone take; and the targets (dual+lock at P = 512, else the largest prompt: at
most half the FLOPs of dual and at least 1.6x its tokens/s; dual+lock+threshold at least 10x the dense sampler's
tokens/s). Writes ``cache_policies.json`` and ``cache_policies_tokens_per_s.png``.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import surelock_fx  # noqa: E402
from surelock_fx.decoding import RowLogits, rows_per_chunk, special_ids  # noqa: E402
from surelock_fx.lock import log_sum_exp  # noqa: E402
from surelock_fx.sampler import cache_rows  # noqa: E402

import common  # noqa: E402
import schedules  # noqa: E402

NAME = "cache_policies"
VARIANTS = ("dense", "dense+thr", "lock", "lock+thr", "prefix", "prefix+thr", "dual", "dual+thr", "dual+lock",
            "dual+lock+thr")
VALIDATED = ("dense", "dual+lock")
FULL = dict(preset="e2e", gen=256, prompts=[64, 512], batches=[1, 8], points=6, reps=3, validate=[1, 64, 64],
            validate_reps=2)
QUICK = dict(preset="small", gen=64, prompts=[16, 64], batches=[1], points=4, reps=2, validate=[1, 16, 64],
             validate_reps=1)
CLOCKS = ("wall", "cpu")  # what the timings measure (``timed``)
TARGET_PROMPT = 512  # the prompt of the dual+lock vs dual target (if not measured: the largest measured)
# Published figures, theirs, reported beside ours (not measured here).
PUBLISHED = dict(
    surelock=dict(source="SureLock (ICLR 2026), Table 4: SureLock + selection, LLaDA-8B", tokens_per_s_ratio=1.73,
                  flops_ratio=0.28),
    fast_dllm=dict(source="Fast-dLLM, LLaDA-8B, GSM8K, A100, its caches and threshold decoding",
                   gen_256=dict(tokens_per_s=[6.7, 54.4], ratio=8.1, accuracy_pct=[79.3, 78.5]), gen_512_ratio=11.0),
)


def parse_args(argv=None):
    ap = common.base_parser(__doc__)
    ap.add_argument("--preset", choices=sorted(common.PRESETS),
                    help="benchmark model (default e2e; small with --quick)")
    ap.add_argument("--gen", type=int, help="generation length (default 256; 64 with --quick)")
    ap.add_argument("--block", type=int, default=32, help="block length of the benchmark decodes")
    ap.add_argument("--prompts", type=int, nargs="+", help="prompt lengths P (random tokens)")
    ap.add_argument("--batches", type=int, nargs="+", help="batch sizes B")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="policies ('+thr': threshold decoding); dense is always run, the baseline")
    ap.add_argument("--threshold", type=float, default=0.9, help="threshold of the recorded threshold decodes")
    ap.add_argument("--record-blocks", type=int,
                    help="blocks of the recorded locked decodes (default: as many as the benchmark's, gen / block)")
    ap.add_argument("--points", type=int, help="row counts at which the locked pass and the GEMMs are timed")
    ap.add_argument("--reps", type=int, help="interleaved repetitions of every timing; the fastest counts")
    ap.add_argument("--validate", type=int, nargs=3, metavar=("B", "P", "G"),
                    help="the configuration decoded whole to validate the estimate")
    ap.add_argument("--validate-reps", type=int, help="whole decodes per validated variant; the fastest counts")
    ap.add_argument("--clock", choices=CLOCKS, default="wall",
                    help="what every timing measures: wall time, or the process's CPU time (with one thread, the time "
                         "on a core of its own: for a machine shared with other work)")
    schedules.add_arguments(ap)
    args = common.fill_defaults(ap.parse_args(argv), QUICK, FULL)
    args.record_blocks = args.record_blocks or args.gen // args.block
    args.variants = ["dense", *(v for v in args.variants if v != "dense")]
    return args


@dataclasses.dataclass(frozen=True)
class Variant:
    """A decode policy: Fast-dLLM's cache (None, "prefix", "dual"), SureLock, threshold decoding."""

    name: str
    cache: str | None
    lock: bool
    threshold: bool

    @classmethod
    def of(cls, name: str) -> "Variant":
        parts = name.split("+")
        return cls(name, parts[0] if parts[0] in ("prefix", "dual") else None, "lock" in parts, "thr" in parts)

    @property
    def dense(self) -> bool:
        """Whether it runs the dense graph (every row, every pass)."""
        return self.cache is None and not self.lock

    @property
    def policy(self) -> str:
        return self.cache or "none"


# ----------------------------------------------------------------------------------------------
# recording
# ----------------------------------------------------------------------------------------------

def row_block_steps(unmask_step: torch.Tensor, prompt: int, block: int) -> list[int]:
    """Steps each row took in each block of a decode: from the block's first step (the batch's) to the row's last
    commit in it."""
    steps, start = [], 0
    for lo in range(prompt, unmask_step.shape[1], block):
        block_steps = unmask_step[:, lo:lo + block]
        steps += (block_steps.amax(1) - start + 1).tolist()
        start = int(block_steps.max()) + 1
    return steps


def policy_rows(cache, t: int, shape, prompt: int, block: int, steps_per_block: int) -> torch.Tensor:
    """[B, N]: the positions pass ``t`` of a decode in LLaDA's schedule computes by its cache policy, locks aside."""
    lo = prompt + t // steps_per_block * block
    rows = cache_rows(cache, t % steps_per_block, shape, lo, lo + block)
    return torch.ones(shape, dtype=torch.bool) if rows is None else rows


def lock_timing(stats, cache, prompt: int, block: int, source: str, eps: float, settings: dict) -> schedules.Schedule:
    """The lock timing of a locked decode in LLaDA's schedule, counted in each token's own computations (the
    passes that computed it): per generated token those from the first pass that saw it unmasked to the one whose
    lock rule locked it, per prompt token those up to that pass; None where it never locked. With a cache policy
    a token is not computed every pass (the prompt at block starts only, with "dual"), so passes would not carry
    over to a decode of other block counts; its computations do."""
    unmask, lock_step, passes = stats.unmask_step, stats.lock_state.lock_step, stats.forward_passes
    spb = passes // ((unmask.shape[1] - prompt) // block)
    computed = torch.stack([policy_rows(cache, t, unmask.shape, prompt, block, spb) & ~((lock_step >= 0) &
                                                                                        (lock_step < t))
                            for t in range(passes)])
    if computed.sum((1, 2)).tolist() != stats.active_counts:
        raise RuntimeError("the recorded decode's computed rows are not those of its policy and lock steps")
    before = torch.cat([torch.zeros_like(computed[:1], dtype=torch.long), computed.long().cumsum(0)])  # [passes + 1]
    locked = lock_step >= 0
    upto = before.gather(0, torch.where(locked, lock_step + 1, passes)[None])[0]  # computations up to the lock
    first = (unmask + 1).clamp(0, passes)
    since = upto - before.gather(0, first[None])[0]
    seen = (torch.arange(unmask.shape[1]) >= prompt) & (unmask + 1 < passes)
    gen = [int(c) if at else None for c, at in zip(since[seen].tolist(), locked[seen].tolist())]
    prompt_counts = [int(c) if at else None for c, at in zip(upto[:, :prompt].flatten().tolist(),
                                                                 locked[:, :prompt].flatten().tolist())]
    recorded = dict(batch=unmask.shape[0], seq=unmask.shape[1], prompt=prompt, passes=passes, cache=cache,
                    settings=settings, flops_ratio=stats.flops_ratio, mean_active_fraction=stats.mean_active_fraction)
    return schedules.Schedule(source, eps, gen, prompt_counts, recorded)


def record(args, variants: list[Variant]) -> dict:
    """Threshold profiles (relative steps per row and block) of the threshold variants and lock timings of the
    policies of the locked ones, from decodes of ``schedules.schedule_source(args)``."""
    model, ids, mask, settings, source = schedules.schedule_source(args)
    gen = settings["gen_length"]
    if gen % args.record_blocks:
        raise SystemExit(f"--record-blocks {args.record_blocks} does not divide the recorded decodes' gen {gen}")
    threshold_block = min(args.block, gen)
    opt = surelock_fx.optimize(model, backend="eager")
    lock = surelock_fx.LockConfig(kl_threshold=args.eps)

    def decode(cache, locked: bool, threshold, block: int):
        return surelock_fx.generate(opt, ids, attention_mask=mask, cache=cache, threshold=threshold,
                                    lock=lock if locked else None, **dict(settings, block_length=block)).stats

    P, lock_block = ids.shape[1], gen // args.record_blocks
    profiles = {v.name: [s / threshold_block for s in row_block_steps(
        decode(v.cache, v.lock, args.threshold, threshold_block).unmask_step, P, threshold_block)]
        for v in variants if v.threshold}
    policies = {v.policy: v.cache for v in variants if v.lock}
    timings = {policy: lock_timing(decode(cache, True, None, lock_block), cache, P, lock_block, source, args.eps,
                                   dict(settings, block_length=lock_block)) for policy, cache in policies.items()}
    return dict(source=source, prompts=ids.shape[0], settings=settings, threshold=args.threshold,
                threshold_block=threshold_block, lock_block=lock_block, profiles=profiles, timings=timings)


def expected_max(values: list[float], batch: int) -> float:
    """E[max of ``batch`` draws from ``values``] (with replacement)."""
    total, below, n = 0.0, 0, len(values)
    for value, count in sorted(collections.Counter(values).items()):
        total += value * (((below + count) / n) ** batch - (below / n) ** batch)
        below += count
    return total


def replay_steps(v: Variant, recorded: dict, batch: int, gen: int, block: int) -> int:
    """A variant's steps at batch ``batch``: gen without threshold, else per block the block length times the
    recorded expected largest relative steps of ``batch`` rows, rounded (at least 1, at most the block)."""
    if not v.threshold:
        return gen
    per_block = round(block * expected_max(recorded["profiles"][v.name], batch))
    return gen // block * min(block, max(1, per_block))


# ----------------------------------------------------------------------------------------------
# replaying
# ----------------------------------------------------------------------------------------------

class ReplaySchedule:
    """A ``runtime.LockSchedule`` replaying a recorded lock timing (``lock_timing``) in a decode of LLaDA's schedule
    with the cache policy ``cache``: a prompt token is skipped once it was computed a drawn number of times, the
    k-th generated token a row unmasks (in position order within a step) once it was computed a drawn number of
    times from the first pass that saw it unmasked. Draws by unmask rank make the rows a pass computes independent
    of which tokens the model commits. Keeps every mask it returns (``masks``)."""

    def __init__(self, schedule: schedules.Schedule, cache, batch: int, prompt: int, gen: int, block: int, steps: int,
                 mask_id: int, seed: int):
        rng = random.Random(seed)
        shape = (batch, prompt + gen)
        self.cache, self.prompt_length, self.block, self.mask_id = cache, prompt, block, mask_id
        self.steps_per_block = steps // (gen // block)
        self.prompt = torch.arange(prompt + gen).expand(shape) < prompt
        self.prompt_count = schedule.draw("prompt", shape, rng)
        self.lags = schedule.draw("gen", shape, rng)
        self.seen = self.prompt.clone()
        self.lag = torch.full(shape, schedules.NEVER)
        self.count = torch.zeros(batch, 1, dtype=torch.long)
        self.computed = torch.zeros(shape, dtype=torch.long)  # computations so far (generated: since seen unmasked)
        self.masks = []

    def __call__(self, step: int, x: torch.Tensor) -> torch.Tensor:
        newly = (x != self.mask_id) & ~self.seen
        rank = (self.count + newly.cumsum(1) - 1).clamp(min=0)
        self.lag = torch.where(newly, self.lags.gather(1, rank), self.lag)
        self.seen |= newly
        self.count += newly.sum(1, keepdim=True)
        locked = self.computed >= torch.where(self.prompt, self.prompt_count, self.lag)
        rows = policy_rows(self.cache, step, x.shape, self.prompt_length, self.block, self.steps_per_block)
        self.computed += rows & ~locked & self.seen
        self.masks.append(locked)
        return locked


def replay_schedule(bench, v: Variant, model, B: int, P: int, G: int, steps: int, seed: int) -> ReplaySchedule:
    """The ``ReplaySchedule`` of a locked variant's decode of ``steps`` steps by ``model`` (the same draws for
    every model)."""
    return ReplaySchedule(bench.recorded["timings"][v.policy], v.cache, B, P, G, bench.args.block, steps,
                          special_ids(model.config)[0], seed)


def random_prompt(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab - 8, (batch, length), generator=torch.Generator().manual_seed(seed))


def pass_rows(v: Variant, stats, masks: list, prompt: int, block: int, steps_per_block: int) -> dict:
    """Per pass of a replayed decode: the rows it computes (from the policy's rows and the replayed lock masks),
    the KL candidate rows (computed and unmasked, from pass 1, locked variants) and the rows the sampler reads."""
    unmask = stats.unmask_step
    computed, kl, live = [], [], []
    for t in range(stats.forward_passes):
        lo = prompt + t // steps_per_block * block
        rows = policy_rows(v.cache, t, unmask.shape, prompt, block, steps_per_block)
        if v.lock and t:
            rows = rows & ~masks[t]
        unmasked = unmask < t
        computed.append(int(rows.sum()))
        kl.append(int((rows & unmasked).sum()) if v.lock and t else 0)
        live.append(int((~unmasked[:, lo:lo + block]).sum()))
    return dict(computed=computed, kl=kl, live=live)


def replay(bench, v: Variant, B: int, P: int, G: int, seed: int) -> dict:
    """A real decode of the replay on the 'tiny' model: steps, passes and the rows of every pass."""
    steps = replay_steps(v, bench.recorded, B, G, bench.args.block)
    prompt = random_prompt(B, P, bench.replayer.config.vocab_size, seed)
    schedule = replay_schedule(bench, v, bench.replayer, B, P, G, steps, seed) if v.lock else None
    out = surelock_fx.generate(bench.replayer, prompt, gen_length=G, steps=steps, block_length=bench.args.block,
                               cache=v.cache, lock=bench.lock if v.lock else None, schedule=schedule)
    rows = pass_rows(v, out.stats, schedule.masks if schedule else [], P, bench.args.block,
                     steps // (G // bench.args.block))
    if rows["computed"] != out.stats.active_counts:
        raise RuntimeError(f"{v.name}: the rows counted for each pass are not those the runner computed")
    return dict(steps=steps, forward_passes=out.stats.forward_passes, **rows)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

def interp(value: float, xs: list, ys: list) -> float:
    """Piecewise linear through (xs, ys), xs ascending, extended linearly past the ends."""
    if len(xs) == 1:
        return ys[0]
    i = min(len(xs) - 1, max(1, bisect.bisect_left(xs, value)))
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (value - xs[i - 1]) / (xs[i] - xs[i - 1])


def row_points(fewest: int, batch: int, seq: int, k: int) -> list[int]:
    """``k`` rows-per-batch-row counts, geometric from ``fewest`` / batch to ``seq``."""
    lo = max(1, fewest // batch)
    if lo >= seq:
        return [seq]
    return sorted({round(lo * (seq / lo) ** (i / max(k - 1, 1))) for i in range(k)} | {lo, seq})


class Passes:
    """The single calls timed at one (B, N): dense pass; locked pass at r rows per batch row, a real runner pass
    (index, release, graph, lock update; ``schedules.Pinned``) whose computed rows are masked, so that none is a
    KL candidate; GEMMs alone; sampler step; KL."""

    def __init__(self, bench, B: int, N: int, P: int, kl_rows: int):
        self.bench, self.B, self.N, self.P = bench, B, N, P
        V = bench.model.config.vocab_size
        self.mask_id, self.eos, self.eot = special_ids(bench.model.config)
        self.ids = random_prompt(B, N, V, 0)
        self.pinned = schedules.Pinned(bench.opt, bench.lock)
        self.logits = torch.randn(max(B * bench.args.block, kl_rows), V)
        self.prev = torch.randn_like(self.logits)
        self.lse = log_sum_exp(self.prev)

    def dense(self, seq: int):
        self.bench.dense(self.ids[:, :seq])

    def locked(self, rows: int):
        """A runner pass computing the last ``rows`` positions of every batch row (its first call: all of them)."""
        skipped = (torch.arange(self.N) < self.N - rows).expand(self.B, self.N)
        self.pinned.locked = skipped
        self.pinned.runner(self.ids.masked_fill(~skipped, self.mask_id), None)

    def gemms(self, rows: int):
        self.bench.gemms(self.B * rows)

    def sampler(self, live: int):
        """The sampler's step with ``live`` masked rows per batch row (``schedules.sample_step``)."""
        x = self.ids.clone()
        x[:, self.P:self.P + live] = self.mask_id
        row = torch.full_like(x, -1)
        row[:, self.P:self.P + live] = torch.arange(self.B * live).view(self.B, live)
        schedules.sample_step(RowLogits(self.logits[:self.B * live], row), x, self.mask_id, self.eos, self.eot)

    def kl(self, rows: int):
        """The lock rule's KL of ``rows`` candidate rows, a chunk at a time as the runtime computes it."""
        new, prev, lse = self.logits[:rows], self.prev[:rows], self.lse[:rows]
        for part in torch.arange(rows).split(rows_per_chunk(new)):
            self.bench.opt.kl(new, part, prev, part, lse[part])


def timed(fn) -> tuple[object, dict]:
    """(what one call of ``fn`` returns, its wall and CPU seconds), in inference mode."""
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, dict(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)


def time_components(bench, B: int, N: int, P: int, decodes: dict) -> dict:
    """Times (the fastest of ``--reps``, interleaved) of every call an estimate interpolates in: locked pass and
    GEMMs at ``row_points`` (rows per batch row), dense pass, sampler at 1, block / 2, block masked rows per batch
    row, KL at 1 and the most candidate rows of any pass."""
    args = bench.args
    fewest = min(min(d["computed"]) for d in decodes.values())
    most_kl = max(max(d["kl"]) for d in decodes.values())
    calls = Passes(bench, B, N, P, most_kl)
    plan = dict(locked=row_points(fewest, B, N, args.points), gemms=row_points(fewest, B, N, args.points),
                sampler=sorted({1, max(1, args.block // 2), args.block}), kl=sorted({1, max(1, most_kl)}), dense=[N])
    times = {kind: {n: float("inf") for n in ns} for kind, ns in plan.items()}
    for rep in range(args.reps + 1):  # the first round warms up, untimed
        for kind, ns in plan.items():
            for n in ns:
                t = timed(functools.partial(getattr(calls, kind), n))[1][args.clock]
                if rep:
                    times[kind][n] = min(times[kind][n], t)
    return {kind: dict(rows=[n * (B if kind in ("locked", "gemms", "dense", "sampler") else 1) for n in ns],
                       time_s=[times[kind][n] for n in ns]) for kind, ns in plan.items()}


def estimate(v: Variant, rows: dict, timing: dict) -> dict:
    """A decode's time from its passes' rows and the timed calls (see the module docstring)."""

    def total(kind, counts):
        return sum(interp(c, timing[kind]["rows"], timing[kind]["time_s"]) for c in counts if c)

    graph = total("dense" if v.dense else "locked", rows["computed"])
    kl, sampler = total("kl", rows["kl"]), total("sampler", rows["live"])
    return dict(time_s=graph + kl + sampler, graph_s=graph, kl_s=kl, sampler_s=sampler,
                gemm_s=total("gemms", rows["computed"]))


# ----------------------------------------------------------------------------------------------
# one configuration, validation, targets
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Bench:
    """What every configuration of a run shares."""

    args: object
    model: torch.nn.Module  # the benchmark model
    opt: object  # its locked graph, eager
    dense: object  # its dense graph, eager
    gemms: object  # common.gemm_chain's run(rows)
    replayer: object  # the 'tiny' model's locked graph, eager: replays the decodes
    recorded: dict  # ``record``'s
    lock: surelock_fx.LockConfig


def variant_row(bench, v: Variant, decode: dict, est: dict, dense: dict, B: int, N: int, G: int) -> dict:
    """A variant's result: its replay, estimate, tokens/s, FLOPs and efficiencies against the dense sampler."""
    flops = bench.opt.flops
    dense_flops = G * flops.step(B * N, N)
    row = dict(decode, **est, flops=sum(flops.step(c, N) for c in decode["computed"]),
               tokens_per_s=B * G / est["time_s"])
    row["flops_ratio"] = row["flops"] / dense_flops
    row.update(common.efficiency(dense["time_s"], est["time_s"], dense_flops, row["flops"]))
    row["gemm_efficiency"] = dense["gemm_s"] / est["gemm_s"] / row["ideal_speedup"]
    row["gemm_share"] = est["gemm_s"] / est["time_s"]  # the decode's speed against its GEMMs alone
    return row


def configuration(bench, B: int, P: int, G: int, names: list[str]) -> dict:
    """The result of batch size B and prompt length P: every variant's replay, estimate and figures."""
    N, seed = P + G, bench.args.seed * 1000 + 7 * B + P + G
    variants = [Variant.of(n) for n in names]
    decodes = {v.name: replay(bench, v, B, P, G, seed) for v in variants}
    timing = time_components(bench, B, N, P, decodes)
    estimates = {v.name: estimate(v, decodes[v.name], timing) for v in variants}
    return dict(batch=B, prompt=P, gen_length=G, seq=N, seed=seed, timing=timing,
                variants={v.name: variant_row(bench, v, decodes[v.name], estimates[v.name], estimates["dense"], B, N, G)
                          for v in variants})


def whole_decode(bench, v: Variant, B: int, P: int, G: int, seed: int, steps: int):
    """A whole ``generate`` of the benchmark model replaying the configuration's draws (its stats)."""
    prompt = random_prompt(B, P, bench.model.config.vocab_size, seed)
    kw = dict(gen_length=G, steps=steps, block_length=bench.args.block)
    if v.dense:
        return surelock_fx.generate(bench.dense, prompt, **kw).stats
    schedule = replay_schedule(bench, v, bench.model, B, P, G, steps, seed)
    return surelock_fx.generate(bench.opt, prompt, cache=v.cache, lock=bench.lock if v.lock else None,
                                schedule=schedule, **kw).stats


def validation(bench) -> dict:
    """Dense and dual+lock at ``--validate``: the estimate against whole decodes (interleaved, the fastest), on the
    ``--clock`` it was timed by; the wall and CPU time of both."""
    B, P, G = bench.args.validate
    row = configuration(bench, B, P, G, list(VALIDATED))
    runs = {name: [] for name in VALIDATED}
    for _ in range(bench.args.validate_reps):
        for name in VALIDATED:
            r = row["variants"][name]
            stats, times = timed(functools.partial(whole_decode, bench, Variant.of(name), B, P, G, row["seed"],
                                                   r["steps"]))
            counts = stats.active_counts or [B * (P + G)] * stats.forward_passes
            runs[name].append(dict(times, rows_match=counts == r["computed"]))
    for name in VALIDATED:
        r = row["variants"][name]
        r.update({f"measured_{clock}_s": min(m[clock] for m in runs[name]) for clock in CLOCKS},
                 rows_match=all(m["rows_match"] for m in runs[name]))
        r["estimator_error"] = r["time_s"] / r[f"measured_{bench.args.clock}_s"] - 1
    dense, locked = (row["variants"][name] for name in VALIDATED)
    measured = f"measured_{bench.args.clock}_s"
    row["speedup_error"] = locked[measured] / dense[measured] * dense["time_s"] / locked["time_s"] - 1
    return row


def target_prompt(results: list[dict]) -> int:
    prompts = {r["prompt"] for r in results}
    return TARGET_PROMPT if TARGET_PROMPT in prompts else max(prompts)


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets per configuration, with the numbers."""
    out = []
    for r in results:
        vs = r["variants"]
        for suffix in ("", "+thr"):
            dual, both = vs.get("dual" + suffix), vs.get("dual+lock" + suffix)
            if r["prompt"] == target_prompt(results) and dual and both:
                flops, tps = both["flops"] / dual["flops"], both["tokens_per_s"] / dual["tokens_per_s"]
                out.append(dict(target=f"dual+lock{suffix} vs dual{suffix}: FLOPs <= 0.5x and tokens/s >= 1.6x",
                                batch=r["batch"], prompt=r["prompt"], flops_ratio=flops, tokens_per_s_ratio=tps,
                                met=flops <= 0.5 and tps >= 1.6))
        if "dual+lock+thr" in vs:
            ratio = vs["dual+lock+thr"]["tokens_per_s"] / vs["dense"]["tokens_per_s"]
            out.append(dict(target="dual+lock+thr >= 10x the tokens/s of the dense LLaDA sampler", batch=r["batch"],
                            prompt=r["prompt"], tokens_per_s_ratio=ratio, met=ratio >= 10))
    return out


# ----------------------------------------------------------------------------------------------
# run, plot
# ----------------------------------------------------------------------------------------------

def build(args) -> Bench:
    variants = [Variant.of(n) for n in args.variants]
    recorded = record(args, variants)
    model = common.random_model(args.preset, seed=args.seed)
    replayer = surelock_fx.optimize(common.random_model("tiny", seed=args.seed + 1), backend="eager")
    B, P, G = args.validate
    gemms, _ = common.gemm_chain(model, max(args.batches + [B]) * (max(args.prompts + [P]) + max(args.gen, G)))
    return Bench(args, model, surelock_fx.optimize(model, backend="eager"), common.compiled_dense(model, "eager"),
                 gemms, replayer, recorded, surelock_fx.LockConfig(kl_threshold=args.eps))


def run(args) -> dict:
    common.setup(args)
    machine = common.machine_info(args.malloc)
    configs = [(B, P) for P in args.prompts for B in args.batches]
    bar = common.progress(total=len(configs) + 2, desc=NAME, disable=args.no_progress)
    bar.set_postfix_str("record, build")
    bench = build(args)
    bar.update()
    results = []
    for B, P in configs:
        bar.set_postfix_str(f"B={B} P={P}")
        results.append(configuration(bench, B, P, args.gen, args.variants))
        bar.update()
    bar.set_postfix_str("validate")
    checked = validation(bench)
    bar.update()
    bar.close()
    return dict(benchmark=NAME, machine=machine, quick=args.quick, settings=settings(args), published=PUBLISHED,
                model=common.describe_model(bench.model), recorded=bench.recorded, results=results, validation=checked,
                targets=targets(results))


def settings(args) -> dict:
    return dict(preset=args.preset, gen=args.gen, block=args.block, prompts=args.prompts, batches=args.batches,
                variants=args.variants, threshold=args.threshold, eps=args.eps, record_blocks=args.record_blocks,
                points=args.points, reps=args.reps, validate=args.validate, validate_reps=args.validate_reps,
                clock=args.clock,
                threads=torch.get_num_threads(), replay_model="tiny (random weights), eager",
                locked_backend="eager", dense_baseline="common.compiled_dense(model, 'eager')",
                sampler="LLaDA's, temperature 0, low_confidence, even per-step schedule (threshold variants: the "
                        "recorded step count)")


def plot(result: dict, out_dir: Path) -> list[Path]:
    """Tokens/s of every policy, one group per prompt length, one panel per batch size; a policy's color is its
    cache and lock, hatched with threshold decoding."""
    plt = common.plt()
    rows, names = result["results"], result["settings"]["variants"]
    batches, prompts = sorted({r["batch"] for r in rows}), sorted({r["prompt"] for r in rows})
    bases = list(dict.fromkeys(n.removesuffix("+thr") for n in names))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches) + 1.5, 4.2), squeeze=False)
    width = 0.8 / len(names)
    for ax, B in zip(axes[0], batches):
        by_prompt = {r["prompt"]: r for r in rows if r["batch"] == B}
        for i, name in enumerate(names):
            shown = [P for P in prompts if P in by_prompt]
            ax.bar([prompts.index(P) + (i - (len(names) - 1) / 2) * width for P in shown],
                   [by_prompt[P]["variants"][name]["tokens_per_s"] for P in shown], width, label=name,
                   color=plt.get_cmap("tab10")(bases.index(name.removesuffix("+thr"))),
                   hatch="//" if name.endswith("+thr") else None, edgecolor="white")
        ax.set(yscale="log", xticks=range(len(prompts)), xticklabels=[f"P={P}" for P in prompts],
               ylabel="tokens/s (estimated)", title=f"B={B}, gen {result['settings']['gen']}")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return [common.save_figure(fig, out_dir, f"{NAME}_tokens_per_s.png")]


def main(argv=None):
    result, path = common.run_and_save(NAME, parse_args(argv), run, plot)
    for r in result["results"]:
        print(f"B={r['batch']} P={r['prompt']}: " + "  ".join(
            f"{n} {v['tokens_per_s']:.2f} tok/s ({v['flops_ratio']:.3f})" for n, v in r["variants"].items()))
    for name, v in result["validation"]["variants"].items():
        print(f"validation {name}: estimate {v['time_s']:.2f}s ({100 * v['estimator_error']:+.1f}%), whole decode "
              f"wall {v['measured_wall_s']:.2f}s, CPU {v['measured_cpu_s']:.2f}s; rows match: {v['rows_match']}")
    print(f"validation speedup error: {100 * result['validation']['speedup_error']:+.1f}%")
    for t in result["targets"]:
        print(f"target {t['target']} (B={t['batch']}, P={t['prompt']}): {'met' if t['met'] else 'NOT met'}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
