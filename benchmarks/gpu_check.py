"""GPU readiness check: locked decoding's correctness on CUDA, and what a LLaDA-8B-shaped model costs there.

    python benchmarks/gpu_check.py --out DIR              # on a CUDA GPU: at most about 6 minutes
    python benchmarks/gpu_check.py --dry-run --out DIR    # on a CPU, tiny shapes: under a minute

Needs a CUDA GPU (H100/H200 class), PyTorch with CUDA and Triton, and this package installed
(``pip install --no-deps --no-build-isolation -e .``); it installs and downloads nothing. After
``--budget-s`` seconds of its own time (default 330; imports add ~10 s) the parts and measurements not yet
started are skipped and recorded as skipped, as is a part that would start with less time left than it
needs (``NEEDS_S``). ``gpu_check.json`` and ``gpu_check.md`` are rewritten after every part, so a run that
is cut off keeps what it measured. Parts, in order:

1. ``correctness``: the shipped tiny model (``surelock_fx/assets/tiny-tasks``) decodes ``--problems``
   problems of every task, locked (``tasks.DEFAULT_DECODE``, default ``LockConfig``). The eager and
   inductor backends on CUDA in float32 must decode the CPU eager backend's tokens exactly; bfloat16 on
   CUDA must agree with float32 on CUDA on at least ``BF16_AGREEMENT`` of the generated tokens.
2. ``cuda_tests``: the tests that skip without CUDA (``CUDA_TESTS``) in a pytest subprocess: outcome and
   skip reasons (they skip without torch-tensorrt too).
3. ``steps_eager``, later ``steps_inductor``: one forward pass of a LLaDA-8B-shaped model (``LLADA_8B``:
   d_model 4096, 32 heads, mlp 12288, vocab 126464; bfloat16, seeded random weights made on the GPU) with
   ``--layers`` of its 32 layers, dense against locked at M/N in {1, 0.5, 0.25, 0.1}, B in {1, 8},
   N in {256, 1024}. Dense: the backend's pipeline without the locking rewrite (``Dense``); locked:
   ``OptimizedModel.forward`` on ``runtime.plan_pass``'s active index of M random unlocked rows per batch
   row, over zero caches of all N keys. CUDA events around each call, warm-up calls first, median of
   ``--reps`` (perf_counter in a dry run).
4. ``decode``: one whole decode per B in {1, 8} (random prompt of 64 tokens, gen 256, steps 256, block 32),
   dense against locked on ``--decode-backend``; the locked decode replays ``LagSchedule`` through
   ``surelock_fx.generate(schedule=...)``. Each variant decodes three times: counting host syncs
   (``torch.cuda.set_sync_debug_mode("warn")``, its warnings recorded), timed (tokens/s), and under a
   torch.profiler CUDA trace: the GPU's idle share (1 - busy / wall, busy the union of its kernel and copy
   intervals) is the time it waited on the host, the upper bound of what the host syncs cost.

Beside every time: its roofline at ``PEAK_FLOPS`` and ``PEAK_BYTES_PER_S``: the time the pass's FLOPs
(``signature.FlopModel``: GEMMs, LM head included) take alone, the time to read every weight once
(``common.describe_model``'s ``streamed_weight_bytes``), the bound (the larger) and the measured time over it.
Times are of ``--layers`` layers plus embedding and LM head; per-layer costs scale to LLaDA-8B's 32 layers,
the LM head's do not, and no 32-layer time is measured. ``markdown(result)`` builds ``gpu_check.md`` from the JSON.
"""
from __future__ import annotations

import argparse
import functools
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import surelock_fx  # noqa: E402
from surelock_fx.backends import get_backend  # noqa: E402
from surelock_fx.capture import capture  # noqa: E402
from surelock_fx.models import load_model, random_llada  # noqa: E402
from surelock_fx.runtime import plan_pass  # noqa: E402
from surelock_fx.signature import cache_specs  # noqa: E402
from surelock_fx.tasks import DEFAULT_DECODE, TASKS, default_model_dir, make_problems  # noqa: E402
from surelock_fx.text import encode_batch, load_tokenizer  # noqa: E402

import common  # noqa: E402

NAME = "gpu_check"
PARTS = ("correctness", "cuda_tests", "steps_eager", "decode", "steps_inductor")
# An H100/H200-class card: dense bfloat16 tensor-core FLOP/s and HBM bytes/s.
PEAK_FLOPS = 790e12
PEAK_BYTES_PER_S = 4.3e12
LLADA_8B = dict(d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=12288, vocab_size=126464)
FULL_LAYERS = LLADA_8B["n_layers"]
DTYPE = torch.bfloat16
# bfloat16 keeps 8 significant bits: logits move by ~0.4%, which flips a token only where two candidates
# nearly tie, but a flipped token changes the rest of its row (later steps condition on it). 0.95 leaves room
# for one or two such rows in 32; a real fault (a wrong cast, a cache row written wrong) costs far more.
BF16_AGREEMENT = 0.95
# The tests that skip without CUDA (grep -rn cuda tests/): test_export.py's TensorRT tests. The ini's addopts
# are cleared: the GPU image need not have pytest-xdist.
CUDA_TESTS = ("tests/test_export.py", "-k", "tensorrt")
# Seconds a part (or a measurement group) needs left to start; "compile": inductor's first call at a new B.
NEEDS_S = dict(correctness=60, cuda_tests=40, steps_eager=30, decode=40, steps_inductor=90, group=5, compile=60,
               variant=20)
NEVER = 1 << 30
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's warning in sync debug mode "warn"
FULL = dict(batches=[1, 8], seqs=[256, 1024], fractions=[1.0, 0.5, 0.25, 0.1], reps=5, warmup=2, problems=8,
            prompt=64, gen=256, block=32)
DRY = dict(FULL, batches=[1, 2], seqs=[16, 32], reps=2, warmup=1, problems=1, prompt=8, gen=16, block=16)
DRY_RUN_NOTE = ("on the CPU: the 'tiny' preset, perf_counter timers, no sync count or GPU trace; the device is "
                "the CPU, so the eager check compares the CPU eager decode with itself and the bfloat16 check is CPU "
                "bfloat16 against CPU float32; inductor is skipped")
DRY_RUN_INDUCTOR = "dry run: an inductor compile takes ~30 s a graph on a CPU (the GPU run covers it)"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="directory for gpu_check.json and .md")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU with tiny shapes (no CUDA needed)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="seconds after which what is left is skipped")
    ap.add_argument("--layers", type=int, default=8, help=f"layers of the LLaDA-8B-shaped model (of {FULL_LAYERS})")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default: all)")
    ap.add_argument("--reps", type=int, help="timed calls per pass measurement (default 5; 2 in a dry run)")
    ap.add_argument("--problems", type=int, help="problems per task in the correctness check (default 8; 1 dry)")
    ap.add_argument("--decode-backend", choices=["eager", "inductor"], default="eager")
    ap.add_argument("--lock-lag", type=int, default=4, help="LagSchedule: passes from unmasked to locked")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CPU reference decode)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    ap.set_defaults(malloc_defaults=False)  # common.setup's glibc malloc settings, as the other benchmarks
    args = ap.parse_args(argv)
    for key, value in (DRY if args.dry_run else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------------------------
# the run: budget, parts, output
# ----------------------------------------------------------------------------------------------

class Check:
    """One run: its settings, device, budget, models and the result being built."""

    def __init__(self, args):
        self.args, self.start = args, time.perf_counter()
        self.cuda = not args.dry_run
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.models = Models(args, self.device)
        self.result = dict(benchmark=NAME, machine=dict(common.machine_info(args.malloc), gpu=gpu_info(self.cuda)),
                           settings=settings(args), parts={}, skipped=[])

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def no_time(self, needs: float) -> str | None:
        """Why something needing ``needs`` seconds cannot start now; None if it can."""
        left = self.left()
        budget = self.args.budget_s
        return None if left >= needs else f"budget: {max(left, 0):.0f} of {budget:.0f} s left, needs ~{needs} s"

    def skip_reason(self, name: str) -> str | None:
        """Why part ``name`` does not run; None if it does."""
        if name not in self.args.parts:
            return "not in --parts"
        if self.args.dry_run and name == "steps_inductor":
            return DRY_RUN_INDUCTOR
        return self.no_time(NEEDS_S[name])

    def times(self, fn) -> list[float]:
        """Seconds of ``--reps`` calls of ``fn`` after ``warmup`` ones: CUDA events, perf_counter in a dry run."""
        if not self.cuda:
            return common.time_calls(fn, self.args.reps, self.args.warmup)
        return cuda_times(fn, self.args.reps, self.args.warmup)

    def run_part(self, name: str, fn) -> None:
        """Run part ``name`` (``fn(check) -> dict``) if it is asked for and fits the budget; record it, save."""
        reason = self.skip_reason(name)
        start = time.perf_counter()
        if reason:
            part = dict(status="skipped", reason=reason)
        else:
            try:
                part = dict(status="ok", **fn(self))
            except Exception as err:  # a one-shot GPU run records the failure and goes on to the next part
                part = dict(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        self.result["parts"][name] = dict(part, seconds=time.perf_counter() - start)
        self.save()

    def save(self) -> None:
        result = self.result
        result["elapsed_s"] = time.perf_counter() - self.start
        result["skipped"] = skipped_items(result["parts"])
        path = common.write_json(self.args.out / f"{NAME}.json", result)
        (self.args.out / f"{NAME}.md").write_text(markdown(common.read_json(path)))


def skipped_items(parts: dict) -> list[dict]:
    """Every part and measurement skipped, with why."""
    items = []
    for name, part in parts.items():
        if part["status"] == "skipped":
            items.append(dict(part=name, reason=part["reason"]))
        items += [dict(part=name, **item) for item in part.get("skipped", [])]
    return items


def gpu_info(cuda: bool) -> dict | None:
    if not cuda:
        return None
    props = torch.cuda.get_device_properties(0)
    return dict(name=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                memory_gib=round(props.total_memory / 2**30, 1), cuda_version=torch.version.cuda,
                device_count=torch.cuda.device_count())


def settings(args) -> dict:
    return dict(
        dry_run=args.dry_run, note=DRY_RUN_NOTE if args.dry_run else None, budget_s=args.budget_s,
        parts=args.parts, dtype=str(DTYPE).removeprefix("torch."), layers=model_sizes(args)["n_layers"],
        full_layers=FULL_LAYERS, model=model_description(args),
        batches=args.batches, seqs=args.seqs, fractions=args.fractions, reps=args.reps, warmup=args.warmup,
        problems_per_task=args.problems, bf16_agreement=BF16_AGREEMENT, cuda_tests=" ".join(CUDA_TESTS),
        decode=dict(backend=args.decode_backend, prompt=args.prompt, gen_length=args.gen, steps=args.gen,
                    block_length=args.block, lock_lag=args.lock_lag, temperature=0.0, remasking="low_confidence"),
        roofline=dict(peak_flops=PEAK_FLOPS, peak_bytes_per_s=PEAK_BYTES_PER_S),
        scaling=(f"times are of {model_sizes(args)['n_layers']} of LLaDA-8B's {FULL_LAYERS} layers plus the embedding "
                 "and the LM head: per-layer costs scale with the layer count, the LM head's do not; no "
                 f"{FULL_LAYERS}-layer time is measured"),
        timing="CUDA events around each call after warm-up calls, median of the reps" if not args.dry_run
        else "perf_counter around each call after warm-up calls, median of the reps",
        dense="the backend's pipeline without the locking rewrite: get_backend(b).compile(capture(model))",
        locked="OptimizedModel.forward on runtime.plan_pass's active index of M random unlocked rows per batch row "
               "(eager: its packed form, after pack_index's one device sync, which a decode's runner avoids)",
        schedule="LagSchedule: the prompt locked from pass 1, each generated token --lock-lag passes after the "
                 "first pass that saw it unmasked",
        syncs="torch.cuda.set_sync_debug_mode('warn') over a whole decode, its warnings counted, per step",
        idle="1 - GPU busy / wall of a decode under a torch.profiler CUDA trace; busy: the union of its kernel, "
             "copy and memset intervals; an upper bound on the time lost to host syncs")


def model_sizes(args) -> dict:
    return dict(common.PRESETS["tiny"]) if args.dry_run else dict(LLADA_8B, n_layers=args.layers)


def model_description(args) -> str:
    sizes = model_sizes(args)
    shape = ", ".join(f"{k} {v}" for k, v in sizes.items() if k != "n_layers")
    layers = f"{sizes['n_layers']} layers" if args.dry_run else f"{sizes['n_layers']} of its {FULL_LAYERS} layers"
    name = "the 'tiny' preset" if args.dry_run else "LLaDA-8B-shaped"
    return f"{name} ({shape}), {layers}, {str(DTYPE).removeprefix('torch.')}, random weights"


# ----------------------------------------------------------------------------------------------
# timing, syncs, GPU trace
# ----------------------------------------------------------------------------------------------

def cuda_times(fn, reps: int, warmup: int) -> list[float]:
    """Seconds of ``reps`` calls of ``fn`` between CUDA events, after ``warmup`` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return times


def wall(fn, cuda: bool):
    """(seconds, result) of ``fn()``, the device synchronized before and after."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def count_syncs(fn):
    """(result, host syncs) of ``fn()``: torch's warnings in sync debug mode "warn"."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum(SYNC_WARNING in str(w.message) for w in caught)


def busy_seconds(intervals) -> float:
    """Seconds covered by the union of (start_ns, end_ns) intervals."""
    busy, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            busy, reach = busy + end - start, end
        elif end > reach:
            busy, reach = busy + end - reach, end
    return busy / 1e9


def traced(fn):
    """(wall seconds, GPU busy seconds) of ``fn()`` under a torch.profiler CUDA trace."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        seconds, _ = wall(fn, cuda=True)
    events = prof.profiler.kineto_results.events()
    return seconds, busy_seconds((e.start_ns(), e.end_ns()) for e in events if e.device_type() == DeviceType.CUDA)


def roofline(seconds: float, flops: float, weight_bytes: float) -> dict:
    """A pass's time against its bound: its FLOPs at PEAK_FLOPS, or reading every weight once at
    PEAK_BYTES_PER_S, whichever takes longer."""
    flops_s, weights_s = flops / PEAK_FLOPS, weight_bytes / PEAK_BYTES_PER_S
    bound = max(flops_s, weights_s)
    return dict(flops_s=flops_s, weights_s=weights_s, bound_s=bound,
                bound="compute" if flops_s >= weights_s else "memory", time_over_bound=seconds / bound)


def decode_roofline(seconds: float, flops_model, rows: list[int], seq: int, weight_bytes: float) -> dict:
    """A decode's time against the sum of its passes' bounds (``roofline``; pass t computes ``rows[t]`` rows
    over ``seq`` keys); the sampler's work is in the time, not in the bound."""
    passes = [roofline(0.0, flops_model.step(r, seq), weight_bytes) for r in rows]
    bound = sum(p["bound_s"] for p in passes)
    return dict(flops_s=sum(p["flops_s"] for p in passes), weights_s=sum(p["weights_s"] for p in passes),
                bound_s=bound, memory_bound_passes=sum(p["bound"] == "memory" for p in passes),
                time_over_bound=seconds / bound)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------

class Dense:
    """A dense baseline called as a plain model, ``dense(input_ids) -> logits``: what ``common.DenseGraph`` runs
    (``graph``: the captured model compiled by a backend), with its positions on the input's device."""

    def __init__(self, config, graph):
        self.config, self.graph = config, graph

    def __call__(self, input_ids, attention_mask=None):
        common.check_no_mask(attention_mask)
        B, N = input_ids.shape
        return self.graph(input_ids, torch.arange(N, device=input_ids.device).expand(B, N))


class Models:
    """The timing parts' LLaDA-8B-shaped model (``model_sizes``, bfloat16, random weights made on the device),
    its dense baseline and its optimized model per backend, each built on first use."""

    def __init__(self, args, device):
        self.args, self.device = args, device

    @functools.cached_property
    def model(self):
        config = common.model_config(model_sizes(self.args))
        return random_llada(config, self.args.seed, device=self.device).to(DTYPE)

    @functools.cached_property
    def captured(self):
        return capture(self.model)

    @functools.cached_property
    def weight_bytes(self) -> int:
        return common.describe_model(self.model)["streamed_weight_bytes"]

    @functools.cache
    def dense(self, backend: str) -> Dense:
        return Dense(self.model.config, get_backend(backend).compile(self.captured))

    @functools.cache
    def optimized(self, backend: str):
        return surelock_fx.optimize(self.model, backend)


# ----------------------------------------------------------------------------------------------
# 1. correctness on the shipped model
# ----------------------------------------------------------------------------------------------

def correctness(check: Check) -> dict:
    """Locked decodes of the task prompts: CUDA float32 per backend == CPU eager; CUDA bfloat16 ~ CUDA float32."""
    path = default_model_dir()
    problems = [p for task in TASKS for p, _ in make_problems(task, check.args.problems, seed=check.args.seed)]
    ids, mask = encode_batch(load_tokenizer(path), problems)

    @functools.cache
    def decoded(device: str, dtype: torch.dtype, backend: str) -> dict:
        opt = surelock_fx.optimize(load_model(path, dtype=dtype, device=device), backend)
        out = surelock_fx.generate(opt, ids.to(device), attention_mask=mask.to(device), lock=surelock_fx.LockConfig(),
                                   **DEFAULT_DECODE)
        return dict(tokens=out.tokens[:, ids.shape[1]:].cpu(), flops_ratio=out.stats.flops_ratio,
                    name=f"{backend} {device} {str(dtype).removeprefix('torch.')}")

    def compare(got, want, threshold: float) -> dict:
        agreement = (got["tokens"] == want["tokens"]).float().mean().item()
        return dict(decode=got["name"], reference=want["name"], agreement=agreement, threshold=threshold,
                    passed=agreement >= threshold, flops_ratio=got["flops_ratio"],
                    reference_flops_ratio=want["flops_ratio"])

    device = check.device.type
    reference = decoded("cpu", torch.float32, "eager")
    backends = ["eager"] if check.args.dry_run else ["eager", "inductor"]
    checks = [compare(decoded(device, torch.float32, b), reference, 1.0) for b in backends]
    checks.append(compare(decoded(device, DTYPE, "eager"), decoded(device, torch.float32, "eager"), BF16_AGREEMENT))
    skipped = [dict(item="inductor decode", reason=DRY_RUN_INDUCTOR)] if check.args.dry_run else []
    return dict(prompts=len(problems), checks=checks, passed=all(c["passed"] for c in checks), skipped=skipped)


# ----------------------------------------------------------------------------------------------
# 2. the tests that need CUDA
# ----------------------------------------------------------------------------------------------

def cuda_tests(check: Check) -> dict:
    command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS]
    done = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True, timeout=max(check.left(), 30))
    return dict(command=" ".join(["python", *command[1:]]), returncode=done.returncode, passed=done.returncode == 0,
                **pytest_outcome(done.stdout), tail=done.stdout.splitlines()[-15:] + done.stderr.splitlines()[-5:])


def pytest_outcome(stdout: str) -> dict:
    """pytest's summary line, its counts ({"passed": 6, "skipped": 1, ...}) and the -rs skip reasons."""
    lines = stdout.splitlines()
    summary = next((line.strip("= ") for line in reversed(lines)
                    if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line)), "")
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary.split(" in ")[0])}
    skips = [line.removeprefix("SKIPPED ") for line in lines if line.startswith("SKIPPED")]
    return dict(summary=summary, counts=counts, skips=skips)


# ----------------------------------------------------------------------------------------------
# 3. one pass, dense vs locked
# ----------------------------------------------------------------------------------------------

def steps(check: Check, backend: str) -> dict:
    """Pass latency of dense and locked over the (B, N, M/N) grid on one backend."""
    args, models = check.args, check.models
    opt, dense = models.optimized(backend), models.dense(backend)
    grid = [(B, N) for B in args.batches for N in args.seqs]
    rows, skipped, compiled_batches = [], [], set()
    bar = common.progress(total=len(grid), desc=f"passes {backend}", disable=args.no_progress)
    with common.count_compilations() as compilations:
        for B, N in grid:
            first = backend == "inductor" and B not in compiled_batches  # dynamo specializes B = 1
            reason = check.no_time(NEEDS_S["compile"] if first else NEEDS_S["group"])
            if reason:
                skipped.append(dict(item=f"{backend} B={B} N={N}", reason=reason))
            else:
                rows += step_group(check, opt, dense, B, N)
                compiled_batches.add(B)
            bar.update()
    bar.close()
    return dict(backend=backend, results=rows, skipped=skipped, compilations=compilations,
                optimize_seconds=opt.compile_seconds, model=common.describe_model(models.model))


def random_locked(B: int, N: int, M: int, gen: torch.Generator) -> torch.Tensor:
    """A lock mask [B, N] leaving M random rows of each batch row unlocked."""
    locked = torch.ones(B, N, dtype=torch.bool)
    for b in range(B):
        locked[b, torch.randperm(N, generator=gen)[:M]] = False
    return locked


def step_group(check: Check, opt, dense: Dense, B: int, N: int) -> list[dict]:
    """Dense and every M/N at one (B, N): times, FLOPs, efficiency, rooflines."""
    device, weights = check.device, check.models.weight_bytes
    gen = torch.Generator().manual_seed(check.args.seed + B * N)
    ids = torch.randint(0, opt.config.vocab_size - 8, (B, N), generator=gen).to(device)
    positions = torch.arange(N, device=device).expand(B, N)
    key_mask = torch.ones(B, N, dtype=torch.bool, device=device)
    caches = [torch.zeros(B, s.heads, N + 1, s.head_dim, dtype=s.dtype, device=device)
              for s in cache_specs(opt.graph_module)]
    t_dense = statistics.median(check.times(lambda: dense.graph(ids, positions)))
    flops_dense = opt.flops.step(B * N, N)
    rows = []
    for fraction in check.args.fractions:
        M = max(1, round(fraction * N))
        plan = plan_pass(random_locked(B, N, M, gen).to(device))
        t_locked = statistics.median(check.times(lambda: opt(ids, positions, plan.index, key_mask, *caches)))
        flops_locked = plan.flops(opt.flops)
        rows.append(dict(backend=opt.backend, batch=B, seq=N, fraction=fraction, active_rows=M, t_dense_s=t_dense,
                         t_locked_s=t_locked, flops_dense=flops_dense, flops_locked=flops_locked,
                         **common.efficiency(t_dense, t_locked, flops_dense, flops_locked),
                         roofline_dense=roofline(t_dense, flops_dense, weights),
                         roofline_locked=roofline(t_locked, flops_locked, weights)))
    return rows


# ----------------------------------------------------------------------------------------------
# 4. whole decodes
# ----------------------------------------------------------------------------------------------

class LagSchedule:
    """A ``runtime.LockSchedule``: the prompt locked from pass 1, each generated token ``lag`` (>= 1) passes after
    the first pass that saw it unmasked, which cached its committed token's K/V. No host syncs of its own."""

    def __init__(self, mask_id: int, lag: int):
        self.mask_id, self.lag, self.seen = mask_id, lag, None

    def __call__(self, step: int, x: torch.Tensor) -> torch.Tensor:
        unmasked = x != self.mask_id
        if self.seen is None:
            self.seen = torch.where(unmasked, 1 - self.lag, NEVER)
        self.seen = torch.where(unmasked & (self.seen == NEVER), step, self.seen)
        return self.seen + self.lag <= step


def decode(check: Check) -> dict:
    """Dense and locked whole decodes per B: tokens/s, syncs per step, GPU idle share, roofline."""
    args, models, backend = check.args, check.models, check.args.decode_backend
    variants = dict(dense=models.dense(backend), locked=models.optimized(backend))
    rows, skipped = [], []
    jobs = [(B, name) for B in args.batches for name in variants]
    for B, name in common.progress(jobs, desc="decodes", disable=args.no_progress):
        reason = check.no_time(NEEDS_S["variant"])
        if reason:
            skipped.append(dict(item=f"{name} B={B}", reason=reason))
            continue
        prompt = torch.randint(0, models.model.config.vocab_size - 8, (B, args.prompt),
                               generator=torch.Generator().manual_seed(args.seed + B)).to(check.device)
        rows.append(decode_variant(check, name, variants[name], prompt))
    for row in rows:
        dense = next((r for r in rows if r["variant"] == "dense" and r["batch"] == row["batch"]), None)
        row["speedup"] = dense["wall_s"] / row["wall_s"] if dense else None
    return dict(backend=backend, results=rows, skipped=skipped)


def decode_variant(check: Check, name: str, model, prompt: torch.Tensor) -> dict:
    """Three decodes of one variant: syncs counted (also the warm-up), timed, traced."""
    args, cuda = check.args, check.cuda
    mask_id = model.config.mask_token_id

    def run():
        locking = {}
        if name == "locked":
            locking = dict(lock=surelock_fx.LockConfig(), schedule=LagSchedule(mask_id, args.lock_lag))
        return surelock_fx.generate(model, prompt, gen_length=args.gen, steps=args.gen, block_length=args.block,
                                    **locking)

    out, syncs = count_syncs(run) if cuda else (run(), None)
    seconds, _ = wall(run, cuda)
    traced_s = busy_s = trace_error = None
    try:
        traced_s, busy_s = traced(run) if cuda else (None, None)
    except RuntimeError as err:  # a profiler the machine refuses costs the idle share only
        trace_error = f"{type(err).__name__}: {err}"
    B, N = prompt.shape[0], prompt.shape[1] + args.gen
    steps = out.stats.steps
    rows = out.stats.active_counts if name == "locked" else [B * N] * steps
    flops_model = check.models.optimized(args.decode_backend).flops
    return dict(variant=name, batch=B, seq=N, steps=steps, wall_s=seconds, tokens_per_s=B * args.gen / seconds,
                syncs=syncs, syncs_per_step=None if syncs is None else syncs / steps,
                syncs_label="torch sync debug mode 'warn'" if cuda else "not counted: dry run on the CPU",
                traced_wall_s=traced_s, gpu_busy_s=busy_s, trace_error=trace_error,
                idle_share=None if busy_s is None else max(0.0, 1 - busy_s / traced_s),
                flops=sum(flops_model.step(r, N) for r in rows), flops_ratio=out.stats.flops_ratio,
                mean_active_fraction=sum(rows) / (B * N * steps),
                roofline=decode_roofline(seconds, flops_model, rows, N, check.models.weight_bytes))


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(common.fmt(v) for v in row) + " |" for row in rows]


def _status(part: dict | None) -> list[str]:
    """A line saying why a part has no results (not run, skipped, failed); none if it ran."""
    if part is None:
        return ["not run."]
    if part["status"] == "skipped":
        return [f"skipped: {part['reason']}."]
    if part["status"] == "error":
        return [f"failed: `{part['error'].splitlines()[0]}` (traceback in gpu_check.json)."]
    return []


def _correctness_md(part: dict | None) -> list[str]:
    lines = ["### Correctness (shipped tiny model, locked decodes)", ""] + _status(part)
    if part and part["status"] == "ok":
        rows = [[c["decode"], c["reference"], f"{c['agreement']:.4f}", f"{c['threshold']:.2f}",
                 common.fmt(c["flops_ratio"], 3), "pass" if c["passed"] else "FAIL"] for c in part["checks"]]
        lines += _table(["decode", "reference", "token agreement", "threshold", "FLOPs ratio", "result"], rows)
        lines += ["", f"{part['prompts']} prompts; agreement over the generated tokens."]
    return lines


def _tests_md(part: dict | None) -> list[str]:
    lines = ["### Tests that need CUDA", ""] + _status(part)
    if part and part["status"] == "ok":
        lines += [f"`{part['command']}`: {part['summary'] or 'no summary'} (exit status {part['returncode']})."]
        lines += [f"- skipped: {s}" for s in part["skips"]]
    return lines


def _steps_md(parts: dict) -> list[str]:
    lines = ["### One forward pass, dense vs locked", ""]
    rows = []
    for backend in ("eager", "inductor"):
        part = parts.get(f"steps_{backend}")
        lines += [f"{backend}: {line}" for line in _status(part)]
        rows += part["results"] if part and part["status"] == "ok" else []
    header = ["backend", "B", "N", "M/N", "dense ms", "locked ms", "speedup", "ideal", "dense bound ms",
              "locked bound ms", "dense / bound", "locked / bound"]
    lines += [""] + _table(header, [[r["backend"], r["batch"], r["seq"], r["fraction"], _ms(r["t_dense_s"]),
                                     _ms(r["t_locked_s"]), r["speedup"], r["ideal_speedup"],
                                     _ms(r["roofline_dense"]["bound_s"]), _ms(r["roofline_locked"]["bound_s"]),
                                     r["roofline_dense"]["time_over_bound"], r["roofline_locked"]["time_over_bound"]]
                                    for r in rows])
    return lines


def _decode_md(part: dict | None, settings: dict) -> list[str]:
    d = settings["decode"]
    lines = [f"### Whole decode ({d['backend']}; prompt {d['prompt']}, gen {d['gen_length']}, steps {d['steps']}, "
             f"block {d['block_length']}; locked: {settings['schedule']}, lag {d['lock_lag']})", ""] + _status(part)
    if part and part["status"] == "ok":
        rows = [[r["batch"], r["variant"], f"{r['wall_s']:.4g}", f"{r['tokens_per_s']:.1f}", r["speedup"],
                 r["mean_active_fraction"], r["syncs_per_step"], r["idle_share"], f"{r['roofline']['bound_s']:.4g}",
                 r["roofline"]["time_over_bound"]] for r in part["results"]]
        lines += _table(["B", "variant", "s", "tokens/s", "speedup", "active fraction", "syncs/step",
                         "GPU idle share", "bound s", "time / bound"], rows)
        lines += ["", f"Syncs: {settings['syncs']}. Idle share: {settings['idle']}."]
    return lines


def markdown(result: dict) -> str:
    """The markdown report of a gpu_check JSON (``gpu_check.md``; a section of BENCHMARKS.md)."""
    m, s, parts = result["machine"], result["settings"], result["parts"]
    gpu = m["gpu"]["name"] if m.get("gpu") else f"no GPU ({m['cpu_model']})"
    roof = s["roofline"]
    lines = ["## GPU check", "",
             f"{gpu}; torch {m['torch_version']}, commit {m['git_commit']}; {m['date']}; "
             f"{result['elapsed_s']:.0f} s of a {s['budget_s']:.0f} s budget.", ""]
    lines += [f"Dry run: {s['note']}.", ""] if s["dry_run"] else []
    lines += [f"Model: {s['model']}. Scaling: {s['scaling']}. Roofline: {roof['peak_flops'] / 1e12:.0f} TFLOP/s, "
              f"{roof['peak_bytes_per_s'] / 1e12:.1f} TB/s; bound = max(FLOPs time, time to read every weight once). "
              f"Timing: {s['timing']}.", ""]
    lines += _correctness_md(parts.get("correctness")) + [""] + _tests_md(parts.get("cuda_tests")) + [""]
    lines += _steps_md(parts) + [""] + _decode_md(parts.get("decode"), s) + ["", "### Skipped", ""]
    lines += [f"- {item['part']}{' ' + item['item'] if 'item' in item else ''}: {item['reason']}"
              for item in result["skipped"]] or ["nothing."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    common.setup(args)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --dry-run to check the script on a CPU")
    check = Check(args)
    check.run_part("correctness", correctness)
    check.run_part("cuda_tests", cuda_tests)
    check.run_part("steps_eager", lambda c: steps(c, "eager"))
    check.run_part("decode", decode)
    check.run_part("steps_inductor", lambda c: steps(c, "inductor"))
    print(f"wrote {args.out / (NAME + '.json')} and {NAME}.md; skipped: {len(check.result['skipped'])}")
    return check.result


if __name__ == "__main__":
    main()
