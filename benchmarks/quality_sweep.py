"""Quality sweep: what locking costs in accuracy and saves in FLOPs on the shipped trained model.

    python benchmarks/quality_sweep.py [--quick] [--n 8] [--out benchmarks/figures/quality]

Grid: kl_threshold in {never, 5e-8, 5e-4, 5e-3, 5e-2} x confidence gate {off, 0.2} x lock_prompt
{on, off}, for gen_length in {64, 128, 256} x steps in {gen_length, gen_length/2} x one block or
block_length 32. Each decode setting decodes the same fresh problems (n per task) densely once
and locked once per lock setting. Writes ``quality.json`` and plots (accuracy vs FLOPs ratio,
active fraction over steps, a lock timeline, the KL-at-lock vs final-drift bound) into --out,
and the results table into docs/quality.md between its ``<!-- quality-table:begin -->`` and
``<!-- quality-table:end -->`` markers (``DOC``; ``--no-docs`` leaves it alone).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import surelock_fx  # noqa: E402
from surelock_fx import tasks  # noqa: E402
from surelock_fx.evaluate import accuracy, compare, decode_problems  # noqa: E402
from surelock_fx.text import encode_batch  # noqa: E402

import common  # noqa: E402

EPSILONS = [5e-8, 5e-4, 5e-3, 5e-2]
DOC = common.ROOT / "docs" / "quality.md"  # the file whose quality-table block ``write_docs_table`` fills
MARKERS = common.readme_markers("quality-table")


def decode_grid(quick: bool) -> list[dict]:
    """The shipped model's default setting (gen_length 16), then gen_length 64, 128 and 256, each with
    steps = gen_length and gen_length / 2, one block or blocks of 32."""
    grid = [dict(gen_length=tasks.GEN_LENGTH, steps=steps, block_length=tasks.GEN_LENGTH, temperature=0.0)
            for steps in (tasks.GEN_LENGTH, tasks.GEN_LENGTH // 2)]
    for gen in [] if quick else [64, 128, 256]:
        for steps, block in itertools.product([gen, gen // 2], [gen, 32]):
            grid.append(dict(gen_length=gen, steps=steps, block_length=block, temperature=0.0))
    return grid


def lock_grid(full: bool) -> list[surelock_fx.LockConfig | None]:
    """never (the locked graph with nothing locked), then every eps; with ``full`` also the
    confidence gate and lock_prompt off."""
    gates, prompts = ([None, 0.2], [True, False]) if full else ([None], [True])
    locks = [None]
    for eps, gate, prompt in itertools.product(EPSILONS, gates, prompts):
        locks.append(surelock_fx.LockConfig(kl_threshold=eps, confidence_gate=gate, lock_prompt=prompt,
                                            keep_locked_logits=True))  # for drift_points
    return locks


def lock_label(lock) -> str:
    if lock is None:
        return "never"
    gate = "" if lock.confidence_gate is None else f", gate {lock.confidence_gate:g}"
    prompt = "" if lock.lock_prompt else ", prompt unlocked"
    return f"eps {lock.kl_threshold:g}{gate}{prompt}"


def active_curve(stats) -> list[float]:
    """Active fraction per step, averaged over the batches of a run."""
    curves = [[a / (a + skipped) for a, skipped in zip(s.active_counts, s.locked_counts)] for s in stats]
    return [sum(c[i] for c in curves) / len(curves) for i in range(min(len(c) for c in curves))]


class Drift(NamedTuple):
    """How far a locked position's frozen prediction ends from the dense model's on the final sequence."""

    kl: float  # KL at lock time
    max_norm: float  # max over the vocabulary of |frozen log p - final dense log p| (what the paper bounds)
    committed: float  # |frozen log p - final dense log p| at the token finally in the sequence
    weighted: float  # sum over the vocabulary of p_final(v) |frozen log p(v) - final dense log p(v)|


def drift_points(model, tokenizer, prompts, run) -> list[Drift]:
    """A ``Drift`` for every locked generated position of ``run`` (a locked decode with
    ``keep_locked_logits``), against the dense ``model`` on the final sequence."""
    points, start = [], 0
    for stats in run.stats:
        state = stats.lock_state
        B = state.locked.shape[0]
        ids, mask = encode_batch(tokenizer, prompts[start:start + B])
        final = torch.cat([ids, torch.stack(run.generated[start:start + B])], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(final[:, ids.shape[1]:])], dim=1)
        start += B
        b, j = (state.locked & (torch.arange(final.shape[1]) >= ids.shape[1])).nonzero(as_tuple=True)
        if not len(b):
            continue
        with torch.inference_mode():
            dense = torch.log_softmax(model(final, attention_mask=full_mask).float()[b, j], dim=-1)
        frozen = torch.log_softmax(state.locked_logits[b, j].float(), dim=-1)
        delta = (frozen - dense).abs()
        committed = delta.gather(-1, final[b, j, None]).squeeze(-1)
        weighted = (dense.exp() * delta).sum(-1)
        points += [Drift(*p) for p in zip(state.lock_kl[b, j].tolist(), delta.amax(-1).tolist(),
                                          committed.tolist(), weighted.tolist())]
    return points


def timeline(run, row: int = 0) -> list[list[int]]:
    """[steps][N] states of one problem: 0 masked, 1 unmasked and active, 2 locked."""
    stats = run.stats[0]
    unmask, lock = stats.unmask_step[row], stats.lock_state.lock_step[row]
    states = []
    for step in range(stats.steps):
        s = torch.ones_like(unmask)
        s[unmask >= step] = 0
        s[(lock >= 0) & (lock < step)] = 2
        states.append(s.tolist())
    return states


def sweep(args) -> dict:
    from surelock_fx.models import load_model
    from surelock_fx.text import load_tokenizer

    model = load_model(args.model)
    tokenizer = load_tokenizer(Path(args.model))
    optimized = surelock_fx.optimize(model)
    rows, curves, bound, timelines = [], {}, {}, {}
    for decode in decode_grid(args.quick):
        long = decode["gen_length"] > args.full_grid_up_to
        n = max(1, args.n // 2) if long else args.n  # long decodes: half the problems, eps only
        problems = {task: tasks.make_problems(task, n, args.seed) for task in tasks.TASKS}
        prompts = [p for task in tasks.TASKS for p, _ in problems[task]]
        expected = [a for task in tasks.TASKS for _, a in problems[task]]
        key = f"gen {decode['gen_length']}, steps {decode['steps']}, block {decode['block_length']}"
        dense = decode_problems(model, tokenizer, prompts, batch_size=len(prompts), desc=f"dense {key}", **decode)
        for lock in lock_grid(full=not (long or args.quick)):
            locked = decode_problems(optimized, tokenizer, prompts, batch_size=len(prompts), lock=lock,
                                     desc=f"{lock_label(lock)} | {key}", **decode)
            row = dict(decode=decode, lock=None if lock is None else dataclasses.asdict(lock),
                       label=lock_label(lock), n=len(prompts), **compare(dense, locked, expected))
            row["accuracy_locked_per_task"] = {
                t: accuracy(locked.answers[i * n:(i + 1) * n], expected[i * n:(i + 1) * n])
                for i, t in enumerate(tasks.TASKS)}
            rows.append(row)
            if lock is not None and lock.confidence_gate is None and lock.lock_prompt:
                curves.setdefault(key, {})[lock_label(lock)] = active_curve(locked.stats)
                if decode["steps"] == decode["gen_length"] and decode["block_length"] == decode["gen_length"]:
                    bound[f"{key} | {lock_label(lock)}"] = [  # (KL at lock, max-norm drift)
                        p[:2] for p in drift_points(model, tokenizer, prompts, locked)]
                    timelines[f"{key} | {lock_label(lock)}"] = timeline(locked)
    return dict(machine=common.machine_info(), settings=dict(n_per_task=args.n, seed=args.seed, quick=args.quick,
                full_grid_up_to=args.full_grid_up_to, tasks=list(tasks.TASKS), model=Path(args.model).name),
                rows=rows, active_curves=curves, bound=bound, timelines=timelines)


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for gen in sorted({r["decode"]["gen_length"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["decode"]["gen_length"] == gen]
        ax.scatter([r["flops_ratio"] for r in rs], [r["accuracy_locked"] for r in rs], label=f"gen_length {gen}",
                   alpha=0.7)
    ax.set(xlabel="FLOPs ratio (locked / dense)", ylabel="accuracy (locked)", title="Accuracy vs FLOPs ratio")
    ax.legend()
    paths.append(_save(fig, out / "accuracy_vs_flops.png"))

    key = next(iter(result["active_curves"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in result["active_curves"][key].items():
        ax.plot(curve, label=label)
    ax.set(xlabel="decoding step", ylabel="active fraction M/N", title=f"Active fraction over steps ({key})")
    ax.legend()
    paths.append(_save(fig, out / "active_fraction.png"))

    name = next(k for k in result["timelines"] if "eps 0.005" in k)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = matplotlib.colors.ListedColormap(["#d9d9d9", "#4c72b0", "#dd8452"])
    ax.imshow(torch.tensor(result["timelines"][name]).T.numpy(), aspect="auto", cmap=cmap, vmin=0, vmax=2,
              interpolation="nearest", origin="lower")
    ax.set(xlabel="decoding step", ylabel="position",
           title=f"Lock timeline: grey masked, blue active, orange locked\n{name}")
    paths.append(_save(fig, out / "lock_timeline.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in result["bound"].items():
        if points:
            kl, drift = zip(*points)
            ax.scatter([max(k, 1e-12) for k in kl], drift, s=8, alpha=0.5, label=label)
    ax.set(xscale="log", yscale="log", xlabel="KL at lock time", ylabel="max |frozen log p - final dense log p|",
           title="Frozen predictions vs the dense model at the end")
    ax.legend(fontsize=6, ncol=2)
    paths.append(_save(fig, out / "lock_bound.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def table(result: dict) -> str:
    """Markdown table of the sweep, one row per (decode setting, lock setting)."""
    lines = ["| gen | steps | block | lock | acc dense | acc locked | token agreement | FLOPs ratio | wall ratio |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        d = r["decode"]
        lines.append(f"| {d['gen_length']} | {d['steps']} | {d['block_length']} | {r['label']} | "
                     f"{r['accuracy_dense']:.3f} | {r['accuracy_locked']:.3f} | {r['token_agreement']:.3f} | "
                     f"{r['flops_ratio']:.3f} | {r['wall_ratio']:.2f} |")
    return "\n".join(lines) + "\n\n" + provenance(result)


def summary(result: dict) -> list[dict]:
    """Per lock setting, over the decode settings it ran on: mean accuracies, the worst accuracy
    change, mean token agreement, FLOPs and wall ratios."""
    out = []
    for label in dict.fromkeys(r["label"] for r in result["rows"]):
        rs = [r for r in result["rows"] if r["label"] == label]
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        out.append(dict(label=label, settings=len(rs), accuracy_dense=mean("accuracy_dense"),
                        accuracy_locked=mean("accuracy_locked"),
                        worst_change=min(r["accuracy_locked"] - r["accuracy_dense"] for r in rs),
                        token_agreement=mean("token_agreement"), flops_ratio=mean("flops_ratio"),
                        wall_ratio=mean("wall_ratio")))
    return out


def summary_table(result: dict) -> str:
    """The docs' table (docs/quality.md): one row per lock setting, averaged over the decode settings."""
    lines = ["| lock | decode settings | acc dense | acc locked | worst change | token agreement | FLOPs ratio "
             "| wall ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary(result):
        lines.append(f"| {r['label']} | {r['settings']} | {r['accuracy_dense']:.3f} | {r['accuracy_locked']:.3f} | "
                     f"{r['worst_change']:+.3f} | {r['token_agreement']:.3f} | {r['flops_ratio']:.3f} | "
                     f"{r['wall_ratio']:.2f} |")
    return "\n".join(lines) + "\n\n" + provenance(result)


def provenance(result: dict) -> str:
    s = result["settings"]
    gens = sorted({r["decode"]["gen_length"] for r in result["rows"]})
    return (f"_gen_length {', '.join(map(str, gens))}; {s['n_per_task']} problems per task x {len(s['tasks'])} tasks "
            f"(half as many, eps only, above gen_length {s['full_grid_up_to']}), seed {s['seed']}, model "
            f"`{s['model']}`, {result['machine']['cpu_model']}, eager backend; generated by "
            f"`python benchmarks/quality_sweep.py{' --quick' if s['quick'] else ''} --n {s['n_per_task']}`._")


def write_docs_table(result: dict) -> None:
    """Fill the quality-table block of ``DOC`` with ``summary_table(result)``."""
    if not common.replace_readme_block(DOC, "quality-table", summary_table(result)):
        raise SystemExit(f"{DOC} has no {MARKERS[0]} ... {MARKERS[1]} block to fill")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=tasks.default_model_dir(),
                        help="checkpoint with tokenizer (default: the shipped tiny-tasks model)")
    parser.add_argument("--quick", action="store_true", help="the default gen_length only, eps only")
    parser.add_argument("--full-grid-up-to", type=int, default=64,
                        help="gen_length up to which the gate and lock_prompt variants run too; longer decodes "
                             "run eps only, on half the problems (default: 64)")
    parser.add_argument("--n", type=int, default=8, help="problems per task (default: 8)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, default=common.FIGURES / "quality",
                        help="where quality.json and the plots go (default: benchmarks/figures/quality)")
    parser.add_argument("--no-docs", action="store_true", help="do not update the table in docs/quality.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the other benchmarks)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result = sweep(args)
    (args.out / "quality.json").write_text(json.dumps(result, indent=1))
    (args.out / "quality.md").write_text("# Quality sweep, every setting (generated)\n\n" + table(result) + "\n")
    for path in plot(result, args.out):
        print(f"wrote {path}")
    print(summary_table(result))
    if not args.no_docs:
        write_docs_table(result)


if __name__ == "__main__":
    main()
