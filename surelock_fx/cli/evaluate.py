"""``surelock eval`` and ``surelock demo``: decode fresh problems dense and locked, print the comparison."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import infill, tasks
from ..evaluate import Setting, evaluate_settings
from ..models import load_config, load_model
from ..text import load_tokenizer
from .options import (
    CACHE_HELP,
    DTYPES,
    SHIPPED_MODELS,
    CLIError,
    add_lock_arguments,
    add_model_arguments,
    lock_config,
    model_path,
    optimize_with_backend,
    resolve_device,
)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``surelock eval``."""
    add_model_arguments(parser, required=False)
    parser.add_argument("--task", action="append", default=None,
                        help="a built-in task (add, sort, reverse, word; infill: the held-out code infilling "
                             "evaluation of the tiny-code model) or a JSONL file of {prompt, answer} lines; "
                             "repeatable (default: add, sort, reverse, word)")
    parser.add_argument("--n", type=int, default=64, help="problems per task (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh problems (default: 0)")
    parser.add_argument("--gen-length", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--threshold", type=float, default=None,
                        help="Fast-dLLM confidence threshold: dynamic steps (default: off)")
    add_lock_arguments(parser, several=True)
    parser.add_argument("--cache", nargs="+", choices=("prefix", "dual"), default=[],
                        help=CACHE_HELP + "; each alone and with each --lock-eps (default: none)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="write the result rows here")


INFILL = "infill"


def _records(task: str, n: int, seed: int) -> list[dict]:
    """``n`` task records ({prompt, answer}, infill ones with ``kind``/``function`` too) of a built-in task
    (fresh, from ``seed``), of the infill evaluation (its first ``n``, interleaved by kind) or of a JSONL file."""
    if task in tasks.TASKS:
        return [dict(prompt=p, answer=a) for p, a in tasks.make_problems(task, n, seed)]
    path = infill.eval_file() if task == INFILL else Path(task)
    if not path.is_file() and task == INFILL:
        raise CLIError(f"the infill evaluation is missing from {path} (an incomplete install?); reinstall surelock_fx")
    if not path.is_file():
        raise ValueError(f"--task {task!r} is neither a built-in task ({', '.join((*tasks.TASKS, INFILL))}) "
                         "nor a JSONL file")
    return tasks.load_jsonl_tasks(path, records=True)[:n]


def run_eval(args: argparse.Namespace) -> int:
    """Decode fresh problems dense, locked (each --lock-eps) and with each --cache policy (alone and locked);
    print and optionally save the comparison. Infill tasks (records with ``kind``/``function``) decode at
    ``infill.DEFAULT_DECODE`` and get its scores; without --model, tasks all infill run tiny-code."""
    task_records = {task: _records(task, args.n, args.seed) for task in args.task or list(tasks.TASKS)}
    is_infill = {task: infill.is_infill(records) for task, records in task_records.items()}
    path = args.model or default_checkpoint(code=all(is_infill.values()))
    load_config(path)  # cheap checks first: directory, config.json
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=DTYPES[args.dtype], device=resolve_device(args.device))
    overrides = {k: v for k, v in (("gen_length", args.gen_length), ("steps", args.steps),
                                   ("block_length", args.block_length), ("threshold", args.threshold))
                 if v is not None}
    locks = [lock_config(args, eps) for eps in args.lock_eps]
    settings = [Setting(lock=lock) for lock in locks]
    settings += [Setting(cache, lock) for cache in args.cache for lock in (None, *locks)]
    optimized = optimize_with_backend(model, args)
    rows = []
    for task, records in task_records.items():
        decode = {**(infill.DEFAULT_DECODE if is_infill[task] else tasks.DEFAULT_DECODE), **overrides}
        problems = [(r["prompt"], r["answer"]) for r in records]
        for row in evaluate_settings(model, optimized, tokenizer, problems, settings, batch_size=args.batch_size,
                                     records=records if is_infill[task] else None, **decode):
            rows.append(dict(task=Path(task).stem, seed=args.seed, decode=decode, **row))
    print(format_rows(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of result rows (``-`` where a row does not lock or has no cache policy), then one of
    the infill scores of the rows that have them."""
    head = (f"{'task':<10}{'eps':>9}{'gate':>6}{'acc dense':>11}{'acc locked':>12}{'agree':>8}{'FLOPs':>8}"
            f"{'active':>8}{'time d/l (s)':>16}{'tok/s d/l':>14}  cache")
    lines = [head]
    for r in rows:
        lock = r["lock"] or {}
        gate = lock.get("confidence_gate")
        lines.append(
            f"{_setting(r)}{'-' if gate is None else gate:>6}"
            f"{r['accuracy_dense']:>11.3f}{r['accuracy_locked']:>12.3f}{r['token_agreement']:>8.3f}"
            f"{r['flops_ratio']:>8.3f}{r['mean_active_fraction']:>8.3f}"
            f"{r['wall_dense_s']:>8.2f}/{r['wall_locked_s']:<7.2f}"
            f"{r['tokens_per_s_dense']:>7.0f}/{r['tokens_per_s']:<6.0f}  {r.get('cache') or '-'}"
        )
    scored = [r for r in rows if "gen_ppl_dense" in r]
    return "\n".join(lines + (["", format_infill_rows(scored)] if scored else []))


def _setting(r: dict) -> str:
    eps = (r["lock"] or {}).get("kl_threshold")
    return f"{r.get('task', '-'):<10}{'-' if eps is None else f'{eps:.0e}':>9}"


def format_infill_rows(rows: list[dict]) -> str:
    """Exact match per kind, the parse rate of body infills and Gen-PPL, dense/locked, of infill result rows."""
    kinds = list(dict.fromkeys(k for r in rows for k in r["exact_match_dense"]))

    def pair(dense, locked, spec: str) -> str:
        return "-" if dense is None else f"{dense:{spec}}/{locked:{spec}}"

    lines = [f"{'task':<10}{'eps':>9}  {'cache':<7}" + "".join(f"{f'exact {k} d/l':>18}" for k in kinds)
             + f"{'parses d/l':>16}{'Gen-PPL d/l':>18}"]
    for r in rows:
        exact = "".join(f"{pair(r['exact_match_dense'].get(k), r['exact_match_locked'].get(k), '.3f'):>18}"
                        for k in kinds)
        lines.append(f"{_setting(r)}  {r.get('cache') or '-':<7}{exact}"
                     f"{pair(r['parse_rate_dense'], r['parse_rate_locked'], '.3f'):>16}"
                     f"{pair(r['gen_ppl_dense'], r['gen_ppl_locked'], '.2f'):>18}")
    return "\n".join(lines)


def default_checkpoint(code: bool = False) -> Path:
    """The trained model shipped with the package: tiny-tasks, or with ``code`` tiny-code (code infilling)."""
    path = infill.default_model_dir() if code else tasks.default_model_dir()
    if not (path / "config.json").is_file():
        raise CLIError(f"the shipped model is missing from {path} (an incomplete install?); reinstall "
                       "surelock_fx or pass --model DIR")
    return path


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``surelock demo``."""
    parser.add_argument("--model", type=model_path, default=None,
                        help=f"a checkpoint directory or a shipped model ({', '.join(SHIPPED_MODELS)}; default "
                             "tiny-tasks); tiny-code runs the infilling task, any other every built-in task")
    parser.add_argument("--n", type=int, default=16, help="problems per task (default: 16)")
    parser.add_argument("--seed", type=int, default=1234)


def run_demo(args: argparse.Namespace) -> int:
    """The main job on a shipped model: its tasks, dense vs locked with the default LockConfig."""
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    argv = ["--n", str(args.n), "--seed", str(args.seed)]
    if args.model is not None:
        argv += ["--model", str(args.model)]
        if args.model.resolve() == SHIPPED_MODELS["tiny-code"].resolve():
            argv += ["--task", INFILL]
    return run_eval(parser.parse_args(argv))
