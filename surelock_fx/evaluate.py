"""Quality of locking: decode the same problems densely and locked, compare answers, FLOPs and time."""
from __future__ import annotations

import dataclasses
import time

import torch
from tqdm.auto import tqdm

from . import tasks
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


def decode_problems(model, tokenizer, prompts: list[str], *, batch_size: int, lock=None, desc="decoding",
                    progress: bool = True, **decode) -> DecodeRun:
    """Decode every prompt (batched) and return the decoded answers."""
    config = model.config
    stops = (config.eos_token_id, getattr(config, "eot_token_id", None))
    answers, generated, stats = [], [], []
    wall = 0.0
    for lo in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress):
        ids, mask = encode_batch(tokenizer, prompts[lo:lo + batch_size])
        start = time.perf_counter()
        out = generate(model, ids, attention_mask=mask, lock=lock, **decode)
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
    """Accuracy, token agreement, FLOPs ratio, active fraction and wall-clock ratio of a locked run."""
    flops_dense = sum(s.flops_dense for s in locked.stats)
    flops_locked = sum(s.flops_locked for s in locked.stats)
    active = sum(sum(s.active_counts) for s in locked.stats)
    total = active + sum(sum(s.locked_counts) for s in locked.stats)
    agree = sum(int((a == b).sum()) for a, b in zip(dense.generated, locked.generated))
    return dict(
        accuracy_dense=accuracy(dense.answers, expected),
        accuracy_locked=accuracy(locked.answers, expected),
        token_agreement=agree / sum(g.numel() for g in dense.generated),
        flops_ratio=flops_locked / flops_dense,
        mean_active_fraction=active / total,
        wall_dense_s=dense.wall_time_s,
        wall_locked_s=locked.wall_time_s,
        wall_ratio=locked.wall_time_s / dense.wall_time_s,
    )


def evaluate_locking(model, optimized, tokenizer, problems: list[tuple[str, str]], locks: list[LockConfig], *,
                     batch_size: int = 64, **decode) -> list[dict]:
    """One dense decode of ``problems`` with ``model``, then one locked decode with ``optimized``
    (``surelock_fx.optimize(model)``) per LockConfig; a result row each."""
    prompts, expected = [p for p, _ in problems], [a for _, a in problems]
    dense = decode_problems(model, tokenizer, prompts, batch_size=batch_size, desc="dense", **decode)
    rows = []
    for lock in locks:
        locked = decode_problems(optimized, tokenizer, prompts, batch_size=batch_size, lock=lock,
                                 desc=f"locked eps={lock.kl_threshold:g}", **decode)
        rows.append(dict(lock=dataclasses.asdict(lock), n=len(problems), **compare(dense, locked, expected)))
    return rows
