"""Quality of locking and cache policies: decode the same problems densely and with each setting, compare
answers, FLOPs and time."""
from __future__ import annotations

import dataclasses
import time

import torch
from tqdm.auto import tqdm

from . import infill, tasks
from .lock import LockConfig
from .sampler import generate
from .text import decode_answer, encode_batch


@dataclasses.dataclass
class DecodeRun:
    """Answers and per-batch results of decoding a list of problems with one setting."""

    answers: list[str]
    generated: list[torch.Tensor]  # [gen_length] token ids per problem
    stats: list  # DecodeStats per batch
    wall_time_s: float


def decode_problems(model, tokenizer, prompts: list[str], *, batch_size: int, lock=None, cache=None,
                    desc="decoding", progress: bool = True, **decode) -> DecodeRun:
    """Decode every prompt (batched) and return the decoded answers."""
    config = model.config
    stops = (config.eos_token_id, getattr(config, "eot_token_id", None))
    answers, generated, stats = [], [], []
    wall = 0.0
    for lo in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress):
        ids, mask = encode_batch(tokenizer, prompts[lo:lo + batch_size])
        start = time.perf_counter()
        out = generate(model, ids, attention_mask=mask, lock=lock, cache=cache, **decode)
        wall += time.perf_counter() - start
        for row in out.tokens[:, ids.shape[1]:]:
            generated.append(row)
            answers.append(decode_answer(tokenizer, row.tolist(), stops))
        stats.append(out.stats)
    return DecodeRun(answers, generated, stats, wall)


def accuracy(answers: list[str], expected: list[str]) -> float:
    """The fraction of answers equal to the expected ones, surrounding whitespace ignored."""
    return sum(a.strip() == e.strip() for a, e in zip(answers, expected)) / max(len(expected), 1)


def task_accuracy(model, tokenizer, n: int, seed: int, task_names=None, batch_size: int = 128,
                  **decode) -> dict[str, float]:
    """Dense accuracy per built-in task on ``n`` fresh problems each (``make_problems(task, n, seed)``),
    at the tasks' ``DEFAULT_DECODE`` settings unless ``decode`` overrides them."""
    settings = {**tasks.DEFAULT_DECODE, **decode}
    out = {}
    for task in task_names or tasks.TASKS:
        problems = tasks.make_problems(task, n, seed)
        run = decode_problems(model, tokenizer, [p for p, _ in problems], batch_size=batch_size,
                              progress=False, **settings)
        out[task] = accuracy(run.answers, [a for _, a in problems])
    return out


def compare(dense: DecodeRun, locked: DecodeRun, expected: list[str]) -> dict:
    """Accuracy, token agreement, FLOPs ratio, active fraction, wall-clock ratio and tokens/s of a run with
    locking or a cache policy (``locked``) against the dense one. The FLOPs ratio is against the dense
    sampler's passes, each computing every row (a cache policy may end a block in fewer passes)."""
    flops_dense = sum(s.flops_dense * _pass_ratio(d, s) for d, s in zip(dense.stats, locked.stats))
    flops_locked = sum(s.flops_locked for s in locked.stats)
    active = sum(sum(s.active_counts) for s in locked.stats)
    total = active + sum(sum(s.locked_counts) for s in locked.stats)
    agree = sum(int((a == b).sum()) for a, b in zip(dense.generated, locked.generated))
    tokens = sum(g.numel() for g in dense.generated)
    return dict(
        accuracy_dense=accuracy(dense.answers, expected),
        accuracy_locked=accuracy(locked.answers, expected),
        token_agreement=agree / tokens,
        flops_ratio=flops_locked / flops_dense,
        mean_active_fraction=active / total,
        forward_passes_dense=sum(s.forward_passes for s in dense.stats),
        forward_passes=sum(s.forward_passes for s in locked.stats),
        wall_dense_s=dense.wall_time_s,
        wall_locked_s=locked.wall_time_s,
        wall_ratio=locked.wall_time_s / dense.wall_time_s,
        tokens_per_s_dense=tokens / dense.wall_time_s,
        tokens_per_s=tokens / locked.wall_time_s,
    )


def _pass_ratio(dense, other) -> float:
    """Passes of the dense decode of a batch per pass of ``other``'s (1 where either counted none)."""
    return dense.forward_passes / other.forward_passes if dense.forward_passes and other.forward_passes else 1.0


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way of decoding to compare with dense: a cache policy (``generate``'s ``cache``), locking, or both."""

    cache: str | None = None
    lock: LockConfig | None = None

    @property
    def label(self) -> str:
        parts = [self.cache or ""] + ([f"lock eps={self.lock.kl_threshold:g}"] if self.lock else [])
        return "+".join(p for p in parts if p) or "dense"


def evaluate_settings(model, optimized, tokenizer, problems: list[tuple[str, str]], settings: list[Setting], *,
                      batch_size: int = 64, records: list[dict] | None = None, **decode) -> list[dict]:
    """One dense decode of ``problems`` with ``model``, then one decode with ``optimized``
    (``surelock_fx.optimize(model)``) per Setting; a result row each. With ``records`` (the problems' task
    records, carrying the infill fields ``kind``/``function``), each row also holds ``infill.scores`` of the
    dense decode and of the setting's, their keys suffixed ``_dense`` and ``_locked`` (Gen-PPL by ``model``)."""
    prompts, expected = [p for p, _ in problems], [a for _, a in problems]

    def scores(run: DecodeRun, suffix: str) -> dict:
        if records is None:
            return {}
        got = infill.scores(model, tokenizer, records, run.answers, run.generated, batch_size)
        return {f"{k}_{suffix}": v for k, v in got.items()}

    dense = decode_problems(model, tokenizer, prompts, batch_size=batch_size, desc="dense", **decode)
    dense_scores = scores(dense, "dense")
    rows = []
    for setting in settings:
        run = decode_problems(optimized, tokenizer, prompts, batch_size=batch_size, lock=setting.lock,
                              cache=setting.cache, desc=setting.label, **decode)
        lock = None if setting.lock is None else dataclasses.asdict(setting.lock)
        rows.append(dict(cache=setting.cache, lock=lock, n=len(problems), **compare(dense, run, expected),
                         **dense_scores, **scores(run, "locked")))
    return rows
