"""End-to-end decoding, dense vs locked, with the lock schedule of real decodes.

    python benchmarks/decode_e2e.py [--quick] [--out DIR] [--schedule-model DIR]

1. **Record a lock schedule.** Locked decodes (``LockConfig(kl_threshold=--eps)``) of a small
   model: the trained checkpoint of ``--schedule-model`` or the one shipped with the package
   (``surelock_fx.tasks``) on its task prompts, else a random-weight model on random prompts (the
   JSON says which). Recorded: for every generated token, the number of steps from the first pass
   that saw it unmasked to the first pass that skipped it (its lock lag; "never" if it did not lock
   before the end), and for every prompt token the pass from which it was skipped.
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
   locking rewrite, ``common.compiled_dense``: eager with packed linear weights, inductor with frozen
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
model (``speedup_vs_plain_<backend>``). ``padded_flops_ratio`` is, per backend (the timed ones, ONNX Runtime and
TensorRT), the FLOPs ratio of what its locked graph computes: attention runs B x M queries, every batch row as many as the one with the most
active rows; the projections, FFN and LM head run the active rows only on steps that run packed across the
batch (passes.pack_rows: eager every step, inductor and ONNX Runtime where ``runtime.runs_packed``,
TensorRT never; ``packed_steps``), else B x M rows.
``gemm_efficiency`` is the same efficiency for the model's GEMMs alone (``common.gemm_chain``, timed at
each sampled step at the eager graph's active rows and at the dense rows, interpolated alike): the bound the
weights' memory traffic and few-row GEMMs set to the decode's, before attention, sampler and bookkeeping.
Writes ``decode_e2e.json`` and ``decode_e2e_*.png``.
"""
from __future__ import annotations

import dataclasses
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
import surelock_fx  # noqa: E402
from surelock_fx.lock import active_index  # noqa: E402
from surelock_fx.optimize import FORMS  # noqa: E402
from surelock_fx.runtime import FULL_FROM, runs_packed  # noqa: E402
from surelock_fx.sampler import DecodeStats, model_forward, select_topk, special_ids, step_candidates  # noqa: E402

NAME = "decode_e2e"
NEVER = 1 << 30  # "does not lock" / "not unmasked yet"
BACKENDS = ("eager", "inductor", "onnxruntime")
VARIANTS = ("dense/plain", *(f"{kind}/{b}" for kind in ("dense", "locked") for b in BACKENDS))
FULL = dict(preset="e2e", batches=[1, 2, 4, 8], gens=[64, 256, 1024], prompt=64, bucket=1, samples=12,
            exact=["1x64", "2x64", "4x64", "8x64"], exact_reps=3, variants=list(VARIANTS))
QUICK = dict(preset="small", batches=[1], gens=[32, 64], prompt=16, bucket=8, samples=4, exact=[], exact_reps=1,
             variants=list(VARIANTS))


def parse_args(argv=None):
    ap = common.base_parser(__doc__)
    ap.add_argument("--preset", choices=sorted(common.PRESETS), help="benchmark model (default e2e; small with --quick)")
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
    ap.add_argument("--eps", type=float, default=5e-3, help="kl_threshold of the recorded and replayed decodes")
    ap.add_argument("--schedule-model", type=Path, default=None,
                    help="trained checkpoint directory (config.json, model.safetensors, tokenizer) to record the "
                         "schedule from; default: the shipped checkpoint if present; 'random': a random-weight model")
    args = ap.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------------------------
# recording a lock schedule
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Schedule:
    """Lock timing of real decodes: per generated token the lag (steps from the first pass that saw it
    unmasked to the first pass that skipped it; None = never locked), per prompt token the pass from
    which it was skipped (None = never)."""

    source: str
    eps: float
    gen_lags: list
    prompt_lock_steps: list
    recorded: dict

    def draw(self, kind: str, shape, rng: random.Random) -> torch.Tensor:
        values = self.gen_lags if kind == "gen" else self.prompt_lock_steps
        values = [NEVER if v is None else int(v) for v in values] or [NEVER]
        return torch.tensor([rng.choice(values) for _ in range(math.prod(shape))], dtype=torch.long).view(shape)


class Recorder:
    """Wraps a runner; records when each position was first seen unmasked and when it was first skipped."""

    def __init__(self, inner, mask_id: int):
        self.inner, self.mask_id, self.calls = inner, mask_id, 0
        self.first_unmasked = self.lock_call = self.prompt = None

    def __call__(self, x, attention_mask):
        if self.first_unmasked is None:
            self.prompt = x != self.mask_id
            self.first_unmasked = torch.where(self.prompt, 0, NEVER)
            self.lock_call = torch.full_like(x, NEVER)
        unmasked = x != self.mask_id
        self.first_unmasked[unmasked & (self.first_unmasked == NEVER)] = self.calls
        logits = self.inner(x, attention_mask)
        self.lock_call[self.inner.state.locked & (self.lock_call == NEVER)] = self.calls + 1
        self.calls += 1
        return logits


class _Wrapped:
    """What ``generate`` needs of a model: ``config`` and ``decode_runner(lock, stats)``."""

    def __init__(self, opt, wrap):
        self.config, self.opt, self.wrap = opt.config, opt, wrap

    def decode_runner(self, lock, stats):
        return self.wrap(self.opt.decode_runner(lock, stats))


def schedule_source(args):
    """(model, prompts [B, P], attention_mask, decode settings, description) to record from."""
    path = args.schedule_model
    if path is not None and str(path) == "random":
        path = None
    elif path is None:
        try:
            from surelock_fx.tasks import default_model_dir

            if (default_model_dir() / "config.json").exists():
                path = default_model_dir()
        except ImportError:
            pass
    if path is not None:
        from surelock_fx.cli import load_tokenizer
        from surelock_fx.evaluate import encode_batch
        from surelock_fx.models import load_model
        from surelock_fx.tasks import DEFAULT_DECODE, TASKS, make_problems

        model = load_model(path)
        tok = load_tokenizer(Path(path))
        n = 4 if args.quick else 16
        problems = [p for task in TASKS for p, _ in make_problems(task, n, seed=args.seed + 12345)]
        ids, mask = encode_batch(tok, problems)
        settings = {k: v for k, v in DEFAULT_DECODE.items()}
        trained = ""
        log = Path(path) / "training_log.json"
        if log.exists():
            info = common.read_json(log)
            trained = f", trained {info.get('steps')} steps, task accuracy {info.get('final_accuracy')}"
        return model, ids, mask, settings, f"trained checkpoint {path}{trained}; {len(problems)} task prompts"
    # Fallback: a random-weight model. The 'tiny' one locks tokens a few steps after they are unmasked, as
    # trained models do; wider random models (e.g. 'small') hardly ever reach the KL threshold.
    preset = "tiny"
    model = common.random_model(preset, seed=args.seed + 1)
    V = model.config.vocab_size
    n, P = (4, 16) if args.quick else (16, 16)
    ids = torch.randint(0, V - 8, (n, P), generator=torch.Generator().manual_seed(args.seed))
    settings = dict(gen_length=32, steps=32, block_length=32, temperature=0.0, remasking="low_confidence")
    return model, ids, None, settings, f"random-weight '{preset}' model on {n} random prompts (no trained checkpoint found)"


def record_schedule(args) -> Schedule:
    model, ids, mask, settings, source = schedule_source(args)
    opt = surelock_fx.optimize(model, backend="eager")
    mask_id = special_ids(model.config)[0]
    recorders = []

    def wrap(runner):
        recorders.append(Recorder(runner, mask_id))
        return recorders[-1]

    out = surelock_fx.generate(_Wrapped(opt, wrap), ids, attention_mask=mask,
                               lock=surelock_fx.LockConfig(kl_threshold=args.eps), **settings)
    rec = recorders[0]
    gen_lags, prompt_steps = [], []
    for b in range(ids.shape[0]):
        for i in range(rec.prompt.shape[1]):
            locked_at = int(rec.lock_call[b, i])
            if rec.prompt[b, i]:
                prompt_steps.append(None if locked_at >= NEVER else locked_at)
            elif int(rec.first_unmasked[b, i]) < NEVER:
                gen_lags.append(None if locked_at >= NEVER else locked_at - int(rec.first_unmasked[b, i]))
    stats = out.stats
    N = rec.prompt.shape[1]
    recorded = dict(batch=ids.shape[0], seq=N, prompt=ids.shape[1], settings=settings, flops_ratio=stats.flops_ratio,
                    mean_active_fraction=stats.mean_active_fraction,
                    active_fraction_curve=[a / (ids.shape[0] * N) for a in stats.active_counts])
    return Schedule(source, args.eps, gen_lags, prompt_steps, recorded)


# ----------------------------------------------------------------------------------------------
# replaying it
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """Per position of one decode: prompt lock step (prompt rows) and lock lag (generated rows)."""

    prompt: torch.Tensor  # [B, N] bool
    prompt_step: torch.Tensor  # [B, N]
    lag: torch.Tensor  # [B, N]

    @classmethod
    def make(cls, schedule: Schedule, prompt: torch.Tensor, seed: int) -> "Plan":
        rng = random.Random(seed)
        return cls(prompt, schedule.draw("prompt", prompt.shape, rng), schedule.draw("gen", prompt.shape, rng))

    def locked(self, first_unmasked: torch.Tensor, call: int) -> torch.Tensor:
        """Rows skipped by pass ``call`` given when each generated row was first seen unmasked."""
        gen = (first_unmasked < NEVER) & (first_unmasked + self.lag <= call)
        return torch.where(self.prompt, self.prompt_step <= call, gen)


class ReplayRunner:
    """Wraps a locked runner: before each pass, sets its lock mask from the plan."""

    def __init__(self, inner, plan: Plan, mask_id: int):
        self.inner, self.plan, self.mask_id, self.calls = inner, plan, mask_id, 0
        self.first_unmasked = None

    @property
    def state(self):
        return self.inner.state

    def __call__(self, x, attention_mask):
        if self.first_unmasked is None:
            self.first_unmasked = torch.where(self.plan.prompt, 0, NEVER)
        newly = (x != self.mask_id) & (self.first_unmasked == NEVER)
        self.first_unmasked[newly] = self.calls
        if self.inner.state is not None:
            self.inner.state.locked = self.plan.locked(self.first_unmasked, self.calls)
        self.calls += 1
        return self.inner(x, attention_mask)


def replay_counts(plan: Plan, order: torch.Tensor, steps: int, bucket: int) -> tuple[list[int], list[int]]:
    """(active rows summed over the batch, unpadded; the graph's M after bucketing) of every pass of a
    decode that unmasks generated position ``order[:, k]`` at step k."""
    counts, widths = [], []
    for t in range(steps):
        locked = plan.locked(state_at(plan, order, t)[1], t)
        counts.append(int((~locked).sum()))
        widths.append(active_index(locked, bucket, FULL_FROM)[0].shape[1])
    return counts, widths


def state_at(plan: Plan, order: torch.Tensor, call: int):
    """(unmasked [B, N], first_unmasked [B, N]) before pass ``call`` when generated position order[:, k]
    is unmasked at step k (seen unmasked from pass k + 1)."""
    B, N = plan.prompt.shape
    first = torch.where(plan.prompt, 0, NEVER)
    k = min(call, order.shape[1])
    if k:
        steps = torch.arange(1, k + 1).expand(B, k)
        first = first.scatter(1, order[:, :k], steps)
    return first < NEVER, first


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


def decode_step(forward, x: torch.Tensor, mask_id: int, eos, eot) -> torch.Tensor:
    """One step of the sampler's loop (one block spanning the whole answer, one token per step)."""
    mask_index = x == mask_id
    logits = forward(x, None)
    x0, confidence = step_candidates(logits, x, mask_index, x.shape[1], mask_id=mask_id, temperature=0.0,
                                     remasking="low_confidence",
                                     eos=eos, eot=eot, logits_eos_inf=False, confidence_eos_eot_inf=False,
                                     generator=None)
    transfer = select_topk(confidence, torch.ones(x.shape[0], dtype=torch.long))
    return torch.where(transfer, x0, x)


def sample_points(steps: int, k: int) -> list[int]:
    """Step 0, and k - 1 steps evenly spaced over 1 .. steps - 1: the first pass (full width, the
    runner's allocations) is like no other, so its time must not be interpolated over later steps."""
    if steps == 1:
        return [0]
    rest = max(1, min(k, steps) - 1)
    return sorted({0} | {1 + round(i * (steps - 2) / max(rest - 1, 1)) for i in range(rest)})


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


def decided(x: torch.Tensor, positions: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``x`` with token 0 at the masked ones of ``positions`` [B, N]: a state in which they are decided."""
    return x.masked_fill(positions & (x == mask_id), 0)


def warm_up(variants: dict, plan: Plan, x0: torch.Tensor, order: torch.Tensor, steps: int, lock, mask_id, eos, eot):
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
                    decode_step(model_forward(v.model), x, mask_id, eos, eot)
                continue
            if v.backend == "inductor":
                V = v.model.config.vocab_size
                # (rows of the new logits, of the previous ones, candidates): dynamo specialises sizes of 1
                for rows, prev_rows, count in ((3, 4, 2), (3, 4, 1), (1, 4, 1), (3, 1, 1), (1, 1, 1)):
                    v.model.kl(torch.zeros(rows, V), torch.arange(count), torch.zeros(prev_rows, V),
                               torch.arange(count), torch.zeros(count))
            if not all(FORMS[v.backend]):
                continue
            for pack_from in (float("inf"), 0.0):  # no pass packed, then every pass
                runner = v.model.decode_runner(lock, DecodeStats())
                runner.pack_from = pack_from
                decode_step(runner, x, mask_id, eos, eot)
                t = steps // 2
                unmasked, first = state_at(plan, order, t)
                runner.state.locked = plan.locked(first, t)
                decode_step(runner, decided(x, unmasked, mask_id), mask_id, eos, eot)
                runner.state.locked = torch.ones_like(runner.state.locked)
                runner.state.locked[:, -1] = False  # every other position decided, as locked ones are
                decode_step(runner, decided(x, runner.state.locked, mask_id), mask_id, eos, eot)


def sampled_decode(variants: dict, plan: Plan, x0: torch.Tensor, order: torch.Tensor, steps: int, k: int,
                   lock, mask_id, eos, eot, gemms, counts: list[int]) -> dict:
    """Estimated decode time per variant from K timed steps (see the module docstring). Pass 0 is
    always sampled and, for locked variants, is the runner's real first pass (allocations included).
    At each sampled step the model's GEMMs alone (``common.gemm_chain``) are timed too, at the rows
    of the locked graph (``counts``: the active rows, packed) and of the dense one."""
    points = sample_points(steps, k)
    B, N = x0.shape
    V = next(iter(variants.values())).model.config.vocab_size
    tokens = torch.randint(0, V - 8, x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        x0 = x0.clone()  # every step works on inference-mode tensors, as generate() does after its first step
    runners = {name: v.model.decode_runner(lock, DecodeStats()) if v.kind == "locked" else model_forward(v.model)
               for name, v in variants.items()}
    times = {name: [] for name in variants}
    gemm_times = {"dense": [], "locked": []}
    with torch.inference_mode():
        for t in points:
            unmasked, first = state_at(plan, order, t)
            x = torch.where(unmasked & ~plan.prompt, tokens, x0)
            for name, v in variants.items():
                fwd = runners[name]
                if v.kind == "locked" and t > 0:
                    fwd.state.locked = plan.locked(first, t)
                times[name] += common.time_calls(lambda: decode_step(fwd, x, mask_id, eos, eot), reps=1, warmup=0)
            for kind, rows in (("dense", B * N), ("locked", max(counts[t], 1))):
                gemm_times[kind] += common.time_calls(lambda: gemms(rows), reps=1, warmup=int(t == 0))
    return dict(points=points, step_times_s=times, gemm_step_times_s=gemm_times,
                time_s={name: interpolated_total(points, ts, steps, counts if name.startswith("locked") else None)
                        for name, ts in times.items()},
                gemm_time_s={kind: interpolated_total(points, ts, steps, counts if kind == "locked" else None)
                             for kind, ts in gemm_times.items()})


def exact_decode(variant: Variant, schedule: Schedule, prompt: torch.Tensor, G: int, lock, seed: int, mask_id) -> dict:
    """A whole ``generate`` call (the replayed schedule for locked variants)."""
    N = prompt.shape[1] + G
    plan_prompt = torch.zeros(prompt.shape[0], N, dtype=torch.bool)
    plan_prompt[:, : prompt.shape[1]] = True
    plan = Plan.make(schedule, plan_prompt, seed)
    kw = dict(gen_length=G, steps=G, block_length=G, temperature=0.0, remasking="low_confidence")
    if variant.kind == "locked":
        model = _Wrapped(variant.model, lambda runner: ReplayRunner(runner, plan, mask_id))
        out = surelock_fx.generate(model, prompt, lock=lock, **kw)
    else:
        out = surelock_fx.generate(variant.model, prompt, **kw)
    s = out.stats
    return dict(time_s=s.wall_time_s, active_counts=s.active_counts, flops_dense=s.flops_dense, flops_locked=s.flops_locked,
                packed_passes=s.packed_passes)


def run(args) -> dict:
    common.setup(args)
    machine = common.machine_info(args.malloc)  # at the start: its load average is the start's
    bar = common.progress(total=2, desc=f"{NAME}: record schedule", disable=args.no_progress)
    schedule = record_schedule(args)
    bar.update(2)
    bar.close()
    model = common.random_model(args.preset, seed=args.seed)
    mask_id, eos, eot = special_ids(model.config)
    variants = build_variants(model, args.variants, args.bucket)
    lock = surelock_fx.LockConfig(kl_threshold=args.eps)
    configs = [(B, G) for G in args.gens for B in args.batches]
    results = []
    bar = common.progress(total=len(configs), desc=NAME, disable=args.no_progress)
    flops = next((v.model.flops for v in variants.values() if v.kind == "locked"), None) \
        or surelock_fx.optimize(model).flops
    gen = torch.Generator().manual_seed(args.seed)
    gemms, _ = common.gemm_chain(model, max(args.batches) * (args.prompt + max(args.gens)))
    for B, G in configs:
        P, N = args.prompt, args.prompt + G
        label = f"{B}x{G}"
        bar.set_postfix_str(f"B={B} G={G}")
        prompt = torch.randint(0, model.config.vocab_size - 8, (B, P), generator=gen)
        x0 = torch.full((B, N), mask_id, dtype=torch.long)
        x0[:, :P] = prompt
        seed = args.seed * 1000 + B * 7 + G
        plan = Plan.make(schedule, x0 != mask_id, seed)
        order = torch.stack([P + torch.randperm(G, generator=gen) for _ in range(B)])
        counts, widths = replay_counts(plan, order, G, args.bucket)
        flops_dense = sum(flops.step(B * N, N) for _ in counts)
        flops_locked = sum(flops.step(a, N) for a in counts)
        row = dict(batch=B, gen_length=G, prompt=P, seq=N, steps=G, mode="exact" if label in args.exact else "sampled",
                   flops_dense=flops_dense, flops_locked=flops_locked, flops_ratio=flops_locked / flops_dense,
                   active_fraction_curve=[c / (B * N) for c in counts], graph_widths=sorted(set(widths)))
        packed = {b: [runs_packed(forms, B * w, c) for c, w in zip(counts, widths)] for b, forms in FORMS.items()}
        row["packed_steps"] = {b: sum(p) for b, p in packed.items()}
        row["padded_flops_ratio"] = {
            b: sum(flops.step(c if p else B * w, N, queries=B * w) for c, w, p in zip(counts, widths, packed[b]))
            / flops_dense for b in packed}
        backends = [b for b in BACKENDS if f"locked/{b}" in variants]
        row["ideal_speedup"] = {b: flops_dense / flops_locked for b in backends}
        with common.count_compilations() as compiles:
            warm_up(variants, plan, x0, order, G, lock, mask_id, eos, eot)
        row["compilations_warmup"] = compiles
        with common.count_compilations() as compiles:
            sampled = sampled_decode(variants, plan, x0, order, G, args.samples, lock, mask_id, eos, eot, gemms, counts)
            times = dict(sampled["time_s"])
            row["sampled"] = sampled
            gemm = sampled["gemm_time_s"]
            row["gemm_efficiency"] = gemm["dense"] / gemm["locked"] * flops_locked / flops_dense
            if row["mode"] == "exact":
                runs = [{name: exact_decode(v, schedule, prompt, G, lock, seed, mask_id) for name, v in variants.items()}
                        for _ in range(args.exact_reps)]  # interleaved: every variant once per repetition
                exact = {name: dict(min((run[name] for run in runs), key=lambda e: e["time_s"]),
                                    times_s=[run[name]["time_s"] for run in runs]) for name in variants}
                row["exact"] = exact
                row["estimator_error"] = {k: sampled["time_s"][k] / exact[k]["time_s"] - 1 for k in exact}
                times = {k: e["time_s"] for k, e in exact.items()}
                for b in backends:  # the runner's own FLOP accounting of the decode it ran
                    e = exact.get(f"locked/{b}")
                    if e:
                        row["ideal_speedup"][b] = e["flops_dense"] / e["flops_locked"]
        row["compilations_timed"] = compiles
        row["time_s"] = times
        row["tokens_per_s"] = {k: B * G / t for k, t in times.items()}
        for b in backends:
            d, l = times.get(f"dense/{b}"), times.get(f"locked/{b}")
            if d and l:
                row[f"speedup_{b}"] = d / l
                row[f"efficiency_{b}"] = d / l / row["ideal_speedup"][b]
            if times.get("dense/plain") and l:
                row[f"speedup_vs_plain_{b}"] = times["dense/plain"] / l
        results.append(row)
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
