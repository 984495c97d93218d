"""Lock schedules of real decodes, recorded and replayed: what ``decode_e2e`` and ``overhead`` share.

``record_schedule`` runs locked decodes of a small model and records when each token locked (a
``Schedule``, read from the decode's ``DecodeStats``); ``draw_decode`` draws from it a ``Plan``, the lock
step of every position of a benchmark decode, which a ``runtime.LockSchedule`` makes a runner skip, whatever
the benchmark's random model predicts: ``Replay`` in whole decodes (``generate(..., schedule=...)``),
``Pinned`` in single passes, each in the state of the pass it stands for (``step_input``). ``pass_plans``
gives what a runner of each backend's forms computes in every pass of a replayed decode
(``runtime.plan_pass``).

The scripts import this module as ``schedules`` (they put ``benchmarks/`` on ``sys.path``).
"""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Iterator

import torch

import surelock_fx
from surelock_fx.backends import BACKENDS
from surelock_fx.decoding import DecodeStats
from surelock_fx.runtime import PACK_FROM, PassPlan, plan_pass
from surelock_fx.sampler import select_topk, step_candidates

import common

NEVER = 1 << 30  # "does not lock" / "not unmasked yet"


def add_arguments(ap) -> None:
    """The options of the recorded schedule: ``--eps`` and ``--schedule-model``."""
    ap.add_argument("--eps", type=float, default=5e-3, help="kl_threshold of the recorded and replayed decodes")
    ap.add_argument("--schedule-model", type=Path, default=None,
                    help="trained checkpoint directory (config.json, model.safetensors, tokenizer) to record the "
                         "schedule from; default: the shipped checkpoint if present; 'random': a random-weight model")


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


def lock_timings(stats: DecodeStats, prompt: int) -> tuple[list, list]:
    """(lock lag of every generated position a pass saw unmasked, lock pass of every prompt position), None
    where it never locked, of a locked decode of one pass per step after a ``prompt`` tokens long prompt. A
    position committed at step s (``DecodeStats.unmask_step``) is seen unmasked from pass s + 1; one that pass
    t's lock rule locked (``LockState.lock_step``) is skipped from pass t + 1."""
    lock_step = stats.lock_state.lock_step
    skipped_from = torch.where(lock_step >= 0, lock_step + 1, NEVER)
    seen_from = stats.unmask_step + 1
    generated = torch.arange(lock_step.shape[1], device=lock_step.device) >= prompt
    seen = generated & (stats.unmask_step >= 0) & (seen_from < stats.forward_passes)
    gen_lags = [None if at >= NEVER else at - first
                for first, at in zip(seen_from[seen].tolist(), skipped_from[seen].tolist())]
    prompt_steps = [None if at >= NEVER else at for at in skipped_from[:, :prompt].flatten().tolist()]
    return gen_lags, prompt_steps


def schedule_model_dir(arg) -> Path | None:
    """The checkpoint to record from: ``--schedule-model``, else the shipped one if present; None: a random model."""
    if arg is not None:
        return None if str(arg) == "random" else Path(arg)
    try:
        from surelock_fx.tasks import default_model_dir
    except ImportError:
        return None
    return default_model_dir() if (default_model_dir() / "config.json").exists() else None


def trained_source(path: Path, args):
    """``schedule_source`` of a trained checkpoint: its model on the synthetic tasks' prompts."""
    from surelock_fx.models import load_model
    from surelock_fx.tasks import DEFAULT_DECODE, TASKS, make_problems
    from surelock_fx.text import encode_batch, load_tokenizer

    n = 4 if args.quick else 16
    problems = [p for task in TASKS for p, _ in make_problems(task, n, seed=args.seed + 12345)]
    ids, mask = encode_batch(load_tokenizer(path), problems)
    trained, log = "", path / "training_log.json"
    if log.exists():
        info = common.read_json(log)
        trained = f", trained {info.get('steps')} steps, task accuracy {info.get('final_accuracy')}"
    description = f"trained checkpoint {path}{trained}; {len(problems)} task prompts"
    return load_model(path), ids, mask, dict(DEFAULT_DECODE), description


def random_source(args):
    """``schedule_source`` without a checkpoint: the random-weight 'tiny' model on random prompts. It locks
    tokens a few steps after they are unmasked, as trained models do; wider random models (e.g. 'small')
    hardly ever reach the KL threshold."""
    model = common.random_model("tiny", seed=args.seed + 1)
    n, P = (4, 16) if args.quick else (16, 16)
    ids = torch.randint(0, model.config.vocab_size - 8, (n, P), generator=torch.Generator().manual_seed(args.seed))
    settings = dict(gen_length=32, steps=32, block_length=32, temperature=0.0, remasking="low_confidence")
    return model, ids, None, settings, f"random-weight 'tiny' model on {n} random prompts (no trained checkpoint found)"


def schedule_source(args):
    """(model, prompts [B, P], attention_mask, decode settings, description) to record from."""
    path = schedule_model_dir(args.schedule_model)
    return random_source(args) if path is None else trained_source(path, args)


def record_schedule(args) -> Schedule:
    """The lock timing of locked decodes (``kl_threshold=args.eps``) of ``schedule_source(args)``."""
    model, ids, mask, settings, source = schedule_source(args)
    stats = surelock_fx.generate(surelock_fx.optimize(model, backend="eager"), ids, attention_mask=mask,
                                 lock=surelock_fx.LockConfig(kl_threshold=args.eps), **settings).stats
    gen_lags, prompt_steps = lock_timings(stats, ids.shape[1])
    B, N = stats.unmask_step.shape
    recorded = dict(batch=B, seq=N, prompt=ids.shape[1], settings=settings, flops_ratio=stats.flops_ratio,
                    mean_active_fraction=stats.mean_active_fraction,
                    active_fraction_curve=[a / (B * N) for a in stats.active_counts])
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


def draw_decode(schedule: Schedule, batch: int, prompt: int, gen_length: int, mask_id: int, vocab_size: int,
                gen: torch.Generator, seed: int) -> tuple[torch.Tensor, Plan, torch.Tensor]:
    """A decode to replay: its first input x0 [B, P + G] (random prompt tokens from ``gen``, then masks), its
    ``Plan`` (seeded with ``seed``) and ``order`` [B, G] (from ``gen``): it unmasks position order[:, k] at step k."""
    x0 = torch.full((batch, prompt + gen_length), mask_id, dtype=torch.long)
    x0[:, :prompt] = torch.randint(0, vocab_size - 8, (batch, prompt), generator=gen)
    plan = Plan.make(schedule, x0 != mask_id, seed)
    order = torch.stack([prompt + torch.randperm(gen_length, generator=gen) for _ in range(batch)])
    return x0, plan, order


class Replay:
    """A ``runtime.LockSchedule`` replaying ``plan`` in a whole decode: pass t skips the rows the plan locks at
    t, given the pass at which each generated row was first seen unmasked. One decode per object."""

    def __init__(self, plan: Plan, mask_id: int):
        self.plan, self.mask_id = plan, mask_id
        self.first_unmasked = torch.where(plan.prompt, 0, NEVER)

    def __call__(self, step: int, x: torch.Tensor) -> torch.Tensor:
        self.first_unmasked[(x != self.mask_id) & (self.first_unmasked == NEVER)] = step
        return self.plan.locked(self.first_unmasked, step)


class Pinned:
    """A decode runner of ``opt`` (``runner``) for single passes of a replayed decode, each standing for a pass
    t of it, whatever the runner's own pass count: this object is its ``runtime.LockSchedule``, which makes
    every pass after the runner's first skip the rows ``locked``, set to pass t's lock mask (``step_input``)
    before the pass. ``restart`` makes a fresh runner (fresh lock state and caches), whose first pass computes
    every row, as pass 0 of a decode does. ``pack_from``: ``OptimizedModel.decode_runner``'s (0: every pass
    packed where the model has both forms, inf: none)."""

    def __init__(self, opt, lock, pack_from: float = PACK_FROM):
        self.opt, self.lock, self.pack_from = opt, lock, pack_from
        self.locked: torch.Tensor | None = None
        self.restart()

    def restart(self) -> None:
        self.runner = self.opt.decode_runner(self.lock, DecodeStats(), schedule=self, pack_from=self.pack_from)

    def __call__(self, step: int, x: torch.Tensor) -> torch.Tensor:
        return self.locked


def both_forms(opt) -> bool:
    """Whether the optimized model ``opt`` runs both forms of its locked graph, padded and packed."""
    return opt.forms.padded is not None and opt.forms.packed is not None


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


def step_input(plan: Plan, order: torch.Tensor, x0: torch.Tensor, tokens: torch.Tensor, call: int):
    """(input [B, N], locked rows [B, N]) of pass ``call``: ``x0`` with ``tokens`` at the generated positions
    unmasked so far."""
    unmasked, first = state_at(plan, order, call)
    return torch.where(unmasked & ~plan.prompt, tokens, x0), plan.locked(first, call)


def replay_locks(plan: Plan, order: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The lock mask [B, N] of every pass of a decode that unmasks generated position ``order[:, k]`` at step k."""
    return [plan.locked(state_at(plan, order, t)[1], t) for t in range(steps)]


def pass_plans(locks: list[torch.Tensor], bucket: int, backend: str | None = None) -> Iterator[PassPlan]:
    """The ``runtime.PassPlan`` of every pass of ``locks`` as a runner with this ``bucket`` plans it, with the
    forms ``backend`` builds (``BACKENDS[backend].padded/.packed``; None: the padded form only, which gives
    the active counts and M as any form does)."""
    cls = None if backend is None else BACKENDS[backend]
    forms = {} if cls is None else dict(padded=cls.padded, packed=cls.packed)
    return (plan_pass(locked, bucket, **forms) for locked in locks)


def replay_counts(locks: list[torch.Tensor], bucket: int) -> tuple[list[int], list[int]]:
    """(active rows summed over the batch, unpadded; the graph's M after bucketing) of every pass of ``locks``."""
    plans = [(p.real, p.index.shape[1]) for p in pass_plans(locks, bucket)]
    return [real for real, _ in plans], [width for _, width in plans]


def decided(x: torch.Tensor, positions: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``x`` with token 0 at the masked ones of ``positions`` [B, N]: a state in which they are decided."""
    return x.masked_fill(positions & (x == mask_id), 0)


def sample_step(logits, x: torch.Tensor, mask_id: int, eos, eot) -> torch.Tensor:
    """The sampler's work of one step on the pass's ``logits`` (one block spanning the whole answer, one token
    per step): ``x`` with its next token unmasked."""
    x0, confidence = step_candidates(logits, x, x == mask_id, x.shape[1], mask_id=mask_id, temperature=0.0,
                                     remasking="low_confidence", eos=eos, eot=eot, logits_eos_inf=False,
                                     confidence_eos_eot_inf=False, generator=None)
    return torch.where(select_topk(confidence, torch.ones(x.shape[0], dtype=torch.long)), x0, x)


def decode_step(forward, x: torch.Tensor, mask_id: int, eos, eot) -> torch.Tensor:
    """One step of the sampler's loop: a pass of ``forward``, then ``sample_step``."""
    return sample_step(forward(x, None), x, mask_id, eos, eot)


def sample_points(steps: int, k: int) -> list[int]:
    """Step 0, and k - 1 steps evenly spaced over 1 .. steps - 1: the first pass (full width, the
    runner's allocations) is like no other, so its time must not be interpolated over later steps."""
    if steps == 1:
        return [0]
    rest = max(1, min(k, steps) - 1)
    return sorted({0} | {1 + round(i * (steps - 2) / max(rest - 1, 1)) for i in range(rest)})
