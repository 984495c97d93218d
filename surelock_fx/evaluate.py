"""Quality of locking: decode the same problems densely and locked, compare answers, FLOPs and time."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .lock import LockConfig
from .sampler import generate


@dataclasses.dataclass
class DecodeRun:
    """Answers and per-batch results of decoding a list of problems with one setting."""

    answers: list[str]
    generated: list[torch.Tensor]  # [gen_length] token ids per problem
    stats: list  # DecodeStats per batch
    wall_time_s: float


def encode_batch(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids [B, P] (chat template when the tokenizer has one) and the attention mask."""
    from .cli import encode_prompt

    chat = bool(getattr(tokenizer, "chat_template", None))
    rows = [encode_prompt(tokenizer, p, chat) for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def decode_problems(model, tokenizer, prompts: list[str], *, batch_size: int, lock=None, desc="decoding",
                    progress: bool = True, **decode) -> DecodeRun:
    """Decode every prompt (batched) and return the decoded answers."""
    from .cli import decode_answer

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
    return sum(a.strip() == e.strip() for a, e in zip(answers, expected)) / max(len(expected), 1)


def task_accuracy(model, tokenizer, n: int, seed: int, task_names=None, batch_size: int = 128,
                  **decode) -> dict[str, float]:
    """Dense accuracy per built-in task on ``n`` fresh problems each (``make_problems(task, n, seed)``),
    at the tasks' ``DEFAULT_DECODE`` settings unless ``decode`` overrides them."""
    from . import tasks

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


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of result rows."""
    head = f"{'task':<10}{'eps':>9}{'gate':>6}{'acc dense':>11}{'acc locked':>12}{'agree':>8}" \
           f"{'FLOPs':>8}{'active':>8}{'time d/l (s)':>16}"
    lines = [head]
    for r in rows:
        gate = r["lock"]["confidence_gate"]
        lines.append(
            f"{r.get('task', '-'):<10}{r['lock']['kl_threshold']:>9.0e}{'-' if gate is None else gate:>6}"
            f"{r['accuracy_dense']:>11.3f}{r['accuracy_locked']:>12.3f}{r['token_agreement']:>8.3f}"
            f"{r['flops_ratio']:>8.3f}{r['mean_active_fraction']:>8.3f}"
            f"{r['wall_dense_s']:>8.2f}/{r['wall_locked_s']:<7.2f}"
        )
    return "\n".join(lines)


# --- surelock eval and surelock demo ---------------------------------------------------------

def add_eval_arguments(parser) -> None:
    from .cli import add_lock_arguments, add_model_arguments

    add_model_arguments(parser, required=False)
    parser.add_argument("--task", action="append", default=None,
                        help="a built-in task name or a JSONL file of {prompt, answer} lines; repeatable "
                             "(default: every built-in task)")
    parser.add_argument("--n", type=int, default=64, help="problems per task (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh problems (default: 0)")
    parser.add_argument("--gen-length", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--block-length", type=int, default=None)
    add_lock_arguments(parser, several=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="write the result rows here")


def _problems(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    from . import tasks

    if task in tasks.TASKS:
        return tasks.make_problems(task, n, seed)
    path = Path(task)
    if not path.is_file():
        raise ValueError(f"--task {task!r} is neither a built-in task ({', '.join(tasks.TASKS)}) nor a JSONL file")
    return tasks.load_jsonl_tasks(path)[:n]


def run_eval(args) -> int:
    """Decode fresh problems dense and locked; print and optionally save the comparison."""
    from . import tasks
    from .cli import DTYPES, load_tokenizer, lock_config, optimize_with_backend, resolve_device
    from .models import load_model

    path = args.model or default_checkpoint()
    tokenizer = load_tokenizer(Path(path))
    model = load_model(path, dtype=DTYPES[args.dtype], device=resolve_device(args.device))
    decode = dict(tasks.DEFAULT_DECODE)
    decode.update({k: v for k, v in (("gen_length", args.gen_length), ("steps", args.steps),
                                     ("block_length", args.block_length)) if v is not None})
    locks = [lock_config(args, eps) for eps in args.lock_eps]
    optimized = optimize_with_backend(model, args)
    rows = []
    for task in args.task or list(tasks.TASKS):
        for row in evaluate_locking(model, optimized, tokenizer, _problems(task, args.n, args.seed), locks,
                                    batch_size=args.batch_size, **decode):
            rows.append(dict(task=Path(task).stem, seed=args.seed, decode=decode, **row))
    print(format_rows(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0


def default_checkpoint() -> Path:
    """The trained tiny-tasks model shipped with the package."""
    from . import tasks
    from .cli import CLIError

    path = tasks.default_model_dir()
    if not (path / "config.json").is_file():
        raise CLIError(f"the shipped model is missing from {path} (an incomplete install?); reinstall "
                       "surelock_fx or pass --model DIR")
    return path


def add_demo_arguments(parser) -> None:
    parser.add_argument("--n", type=int, default=16, help="problems per task (default: 16)")
    parser.add_argument("--seed", type=int, default=1234)


def run_demo(args) -> int:
    """The main job on the shipped model: every task, dense vs locked with the default LockConfig."""
    import argparse

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(["--n", str(args.n), "--seed", str(args.seed)]))
