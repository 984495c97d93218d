"""Infill sweep: what locking, Fast-dLLM's caches and threshold decoding cost in code-infilling quality and
save in FLOPs on the tiny-code model (issue #28).

    python benchmarks/infill_sweep.py [--model surelock_fx/assets/tiny-code] [--n 150]
                                      [--out benchmarks/figures/quality_infill] [--no-docs] [--quick]

Decodes the first --n records of the held-out infill evaluation (``surelock_fx/assets/infill/eval.jsonl``,
kinds interleaved, so any prefix is balanced) densely, once per decode setting, and with every setting of
the grid (``grid``) through the locked graph:

- at ``infill.DEFAULT_DECODE`` (gen 24, steps 24, one block): locking never (the locked graph, nothing
  locked), ``kl_threshold`` in ``EPSILONS`` and the confidence gate 0.2 at 5e-3 and 5e-2;
- at block_length 8 (5 blocks, same gen and steps; its own dense decode): cache "prefix" and "dual", each
  alone and with locking at 5e-3 and 5e-2, and Fast-dLLM threshold decoding 0.9 alone, with "dual", and
  with "dual" and locking at 5e-3.

A row per setting: exact match overall and per kind, parse rate of the body infills and Gen-PPL (dense and
the setting's), token agreement with dense, FLOPs and wall ratios (``evaluate.compare``), the median top-1
probability at commit time, and for a locked setting the share of generated positions that locked and the
spread of their KL at lock time. The bound (``quality_sweep.drift_points``): per locked generated position
of eps 5e-3, 5e-2 and 0.5 at the default decode, its KL at lock against three distances of its frozen
prediction from the dense model's on the final sequence.

Writes ``infill_sweep.json`` and plots into --out, the table into docs/quality.md between its
``<!-- infill-table:begin -->`` / ``<!-- infill-table:end -->`` markers and a summary into README.md between
``<!-- quality:begin -->`` / ``<!-- quality:end -->`` (printed only where README has no such block);
``--no-docs`` writes neither.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import surelock_fx  # noqa: E402
from surelock_fx import infill  # noqa: E402
from surelock_fx.evaluate import accuracy, compare, decode_problems  # noqa: E402
from surelock_fx.tasks import load_jsonl_tasks  # noqa: E402
from surelock_fx.text import encode_batch  # noqa: E402

import common  # noqa: E402
import quality_sweep  # noqa: E402

EPSILONS = [5e-8, 5e-4, 5e-3, 5e-2, 0.5, 5.0, 50.0]  # the paper's four and beyond
GATED = [5e-3, 5e-2]  # the eps the confidence gate 0.2 runs at
BOUND_EPS = [5e-3, 5e-2, 0.5]  # the eps whose locked positions the bound figure shows
BLOCK = 8  # the block_length of the cache and threshold settings
THRESHOLD = 0.9
DROP = 0.05  # the summary's "visible" exact-match drop
DOC = common.ROOT / "docs" / "quality.md"
README = common.ROOT / "README.md"
TABLE, SUMMARY = "infill-table", "quality"  # the marker names of the docs table and of README's summary
KL_EDGES = [10.0 ** (e / 2) for e in range(-24, 5)]  # KL histogram bins: 1e-12 .. 1e2, two per decade
CONFIDENCE_EDGES = [i / 20 for i in range(21)]


@dataclasses.dataclass(frozen=True)
class Case:
    """One setting of the sweep: a block length (its dense decode is the reference), a cache policy,
    threshold decoding and locking, each optional."""

    block_length: int = infill.GEN_LENGTH
    cache: str | None = None
    threshold: float | None = None
    lock: surelock_fx.LockConfig | None = None

    @property
    def decode(self) -> dict:
        return {**infill.DEFAULT_DECODE, "block_length": self.block_length,
                **({} if self.threshold is None else {"threshold": self.threshold})}

    @property
    def label(self) -> str:
        parts = [f"block {self.block_length}"] if self.block_length != infill.GEN_LENGTH else []
        parts += [f"threshold {self.threshold:g}"] if self.threshold is not None else []
        parts += [self.cache] if self.cache else []
        if self.lock is not None or not parts:
            parts.append(quality_sweep.lock_label(self.lock))
        return ", ".join(parts)

    @property
    def bound(self) -> bool:
        """Whether the bound figure shows this setting's locked positions."""
        return (self.lock is not None and self.lock.kl_threshold in BOUND_EPS and self.lock.confidence_gate is None
                and self.block_length == infill.GEN_LENGTH and self.cache is None and self.threshold is None)


def lock(eps: float, gate: float | None = None) -> surelock_fx.LockConfig:
    keep = eps in BOUND_EPS and gate is None  # only the bound needs the frozen logits
    return surelock_fx.LockConfig(kl_threshold=eps, confidence_gate=gate, keep_locked_logits=keep)


def grid(quick: bool) -> list[Case]:
    """The settings, grouped by block length (the default decode's first)."""
    if quick:
        return [Case(), Case(lock=lock(5e-3)), Case(lock=lock(0.5)),
                Case(BLOCK, "dual", lock=lock(5e-3)), Case(BLOCK, "dual", THRESHOLD, lock(5e-3))]
    cases = [Case()] + [Case(lock=lock(eps)) for eps in EPSILONS] + [Case(lock=lock(e, 0.2)) for e in GATED]
    for cache in ("prefix", "dual"):
        cases += [Case(BLOCK, cache)] + [Case(BLOCK, cache, lock=lock(eps)) for eps in GATED]
    cases += [Case(BLOCK, threshold=THRESHOLD), Case(BLOCK, "dual", THRESHOLD),
              Case(BLOCK, "dual", THRESHOLD, lock(5e-3))]
    return cases


class GenPPL:
    """Gen-PPL of decodes of the same problems (``infill.gen_ppl``, batched alike), each problem's NLL
    computed once per distinct generation: settings that agree with dense cost (almost) nothing to score."""

    def __init__(self, model, tokenizer, prompts: list[str], batch_size: int):
        config = model.config
        self.model, self.stops = model, (config.eos_token_id, getattr(config, "eot_token_id", None))
        self.batches = [(lo, *encode_batch(tokenizer, prompts[lo:lo + batch_size]))
                        for lo in range(0, len(prompts), batch_size)]
        self.known: dict[tuple, tuple[float, int]] = {}  # (problem, generated ids) -> (NLL, tokens)

    def __call__(self, generated: list[torch.Tensor]) -> float:
        keys = [(i, tuple(g.tolist())) for i, g in enumerate(generated)]
        for lo, ids, mask in self.batches:
            todo = [i for i in range(len(ids)) if keys[lo + i] not in self.known]
            if todo:
                rows = torch.tensor(todo)
                nll, counts = infill.generated_nll(self.model, ids[rows], mask[rows],
                                                   torch.stack([generated[lo + i] for i in todo]), self.stops)
                for k, i in enumerate(todo):
                    self.known[keys[lo + i]] = (float(nll[k]), int(counts[k]))
        nll, tokens = (sum(v) for v in zip(*(self.known[k] for k in keys)))
        return math.exp(nll / tokens)


def spread(values: list[float], edges: list[float]) -> dict:
    """Quantiles 10/50/90, count and a histogram over ``edges`` (values clamped into their range)."""
    if not values:
        return dict(count=0, q10=None, q50=None, q90=None, edges=edges, histogram=[0] * (len(edges) - 1))
    v = torch.tensor(values, dtype=torch.float64)
    q10, q50, q90 = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    e = torch.tensor(edges, dtype=torch.float64)
    index = (torch.bucketize(v.clamp(e[0], e[-1]), e, right=True) - 1).clamp(0, len(edges) - 2)
    return dict(count=len(values), q10=q10, q50=q50, q90=q90, edges=edges,
                histogram=torch.bincount(index, minlength=len(edges) - 1).tolist())


def commit_confidences(run) -> list[float]:
    """The sampler's probability of every token it committed (``DecodeStats.commit_confidence``)."""
    return [x for s in run.stats for x in s.commit_confidence[~s.commit_confidence.isnan()].tolist()]


def lock_kls(run, gen_length: int) -> tuple[list[float], int]:
    """(KL at lock time of every generated position that locked, the number of generated positions)."""
    kls, positions = [], 0
    for s in run.stats:
        kl = s.lock_state.lock_kl[:, -gen_length:] if s.lock_state is not None else torch.empty(0, gen_length)
        kls += kl[~kl.isnan()].tolist()
        positions += s.unmask_step[:, -gen_length:].numel()
    return kls, positions


def scores(run, records, gen_ppl: GenPPL, suffix: str) -> dict:
    out = dict(exact_match=infill.exact_match(run.answers, records), parse_rate=infill.parse_rate(run.answers, records),
               gen_ppl=gen_ppl(run.generated),
               commit_confidence_median=spread(commit_confidences(run), CONFIDENCE_EDGES)["q50"])
    return {f"{k}_{suffix}": v for k, v in out.items()}


def sweep(args) -> dict:
    from surelock_fx.models import load_model
    from surelock_fx.text import load_tokenizer

    model = load_model(args.model)
    tokenizer = load_tokenizer(Path(args.model))
    optimized = surelock_fx.optimize(model)
    records = load_jsonl_tasks(infill.eval_file(), records=True)[:args.n]
    prompts, expected = [r["prompt"] for r in records], [r["answer"] for r in records]
    gen_ppl = GenPPL(model, tokenizer, prompts, args.batch_size)
    gen_length = infill.GEN_LENGTH
    rows, bound, dense_runs = [], {}, {}
    spreads = dict(commit_confidence={}, kl_at_lock={})
    for case in grid(args.quick):
        block = case.block_length
        if block not in dense_runs:
            start = time.perf_counter()
            decode = {**infill.DEFAULT_DECODE, "block_length": block}
            dense = decode_problems(model, tokenizer, prompts, batch_size=args.batch_size,
                                    desc=f"dense, block {block}", **decode)
            dense_runs[block] = dense, scores(dense, records, gen_ppl, "dense")
            spreads["commit_confidence"][f"dense, block {block}"] = spread(commit_confidences(dense), CONFIDENCE_EDGES)
            print(f"dense, block {block}: exact match {accuracy(dense.answers, expected):.3f}, Gen-PPL "
                  f"{dense_runs[block][1]['gen_ppl_dense']:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
        dense, dense_scores = dense_runs[block]
        start = time.perf_counter()
        run = decode_problems(optimized, tokenizer, prompts, batch_size=args.batch_size, lock=case.lock,
                              cache=case.cache, desc=case.label, **case.decode)
        row = dict(label=case.label, block_length=block, cache=case.cache, threshold=case.threshold,
                   lock=None if case.lock is None else dataclasses.asdict(case.lock), n=len(records),
                   **compare(dense, run, expected), **dense_scores, **scores(run, records, gen_ppl, "locked"))
        spreads["commit_confidence"][case.label] = spread(commit_confidences(run), CONFIDENCE_EDGES)
        if case.lock is not None:
            kls, positions = lock_kls(run, gen_length)
            kl = spreads["kl_at_lock"][case.label] = spread(kls, KL_EDGES)
            row.update(locked_fraction=len(kls) / positions,
                       kl_at_lock={q: kl[q] for q in ("q10", "q50", "q90")})
        if case.bound:
            bound[case.label] = [list(p) for p in quality_sweep.drift_points(model, tokenizer, prompts, run)]
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(row_line(row), flush=True)
    return dict(machine=common.machine_info(),
                settings=dict(n=len(records), quick=args.quick, model=Path(args.model).name,
                              model_path=str(args.model), eval_file="surelock_fx/assets/infill/eval.jsonl",
                              decode=infill.DEFAULT_DECODE, block_length_cached=BLOCK, batch_size=args.batch_size,
                              threads=torch.get_num_threads(), epsilons=EPSILONS, bound_epsilons=BOUND_EPS),
                rows=rows, spreads=spreads,
                bound=dict(measures=list(quality_sweep.Drift._fields), points=bound))


def row_line(r: dict) -> str:
    locked = ""
    if r["lock"] is not None:
        median = r["kl_at_lock"]["q50"]
        locked = f", locked {r['locked_fraction']:.2f}, KL at lock median {math.nan if median is None else median:.1e}"
    return (f"{r['label']}: exact match {r['accuracy_dense']:.3f} -> {r['accuracy_locked']:.3f}, Gen-PPL "
            f"{r['gen_ppl_dense']:.2f} -> {r['gen_ppl_locked']:.2f}, agreement {r['token_agreement']:.3f}, FLOPs "
            f"{r['flops_ratio']:.3f}, wall {r['wall_ratio']:.2f}{locked} ({r['seconds']:.0f} s)")


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------

def plot(result: dict, out: Path) -> list[Path]:
    plt = common.plt()
    rows = result["rows"]
    blocks = sorted({r["block_length"] for r in rows}, reverse=True)
    colors = {b: f"C{i}" for i, b in enumerate(blocks)}
    paths = []
    for key, ylabel, name in (("accuracy", "exact match", "exact_match_vs_flops.png"),
                              ("gen_ppl", "Gen-PPL (dense model)", "gen_ppl_vs_flops.png")):
        dense_key, setting_key = (f"{key}_dense", f"{key}_locked")
        fig, ax = plt.subplots(figsize=(11, 5.5))
        for b in blocks:
            rs = [r for r in rows if r["block_length"] == b]
            ax.scatter([1.0], [rs[0][dense_key]], marker="*", s=120, color=colors[b], label=f"dense, block {b}")
            ax.scatter([r["flops_ratio"] for r in rs], [r[setting_key] for r in rs], color=colors[b], s=18)
        for i, r in enumerate(rows, 1):  # points numbered (labels of nearby points would overlap), keyed beside
            ax.annotate(str(i), (r["flops_ratio"], r[setting_key]), fontsize=7, xytext=(3, 2 + 7 * (i % 2)),
                        textcoords="offset points", color=colors[r["block_length"]])
        ax.text(1.02, 1.0, "\n".join(f"{i}: {r['label']}" for i, r in enumerate(rows, 1)), transform=ax.transAxes,
                va="top", fontsize=7)
        ax.set(xlabel="FLOPs ratio (setting / dense)", ylabel=ylabel,
               title=f"{ylabel} vs FLOPs ratio ({result['settings']['model']}, n {result['settings']['n']})")
        ax.legend(fontsize=7)
        paths.append(common.save_figure(fig, out, name))

    measures = result["bound"]["measures"]
    titles = dict(max_norm="max |frozen log p - final log p|", committed="committed token |Δ log p|",
                  weighted="Σ p_final |Δ log p|")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    for i, (measure, ax) in enumerate(zip(measures[1:], axes)):
        for label, points in result["bound"]["points"].items():
            if points:
                ax.scatter([max(p[0], 1e-12) for p in points], [max(p[i + 1], 1e-12) for p in points], s=6,
                           alpha=0.4, label=label)
        ax.set(xscale="log", yscale="log", xlabel="KL at lock time", title=titles.get(measure, measure))
    axes[0].set_ylabel("frozen vs dense on the final sequence (nats)")
    axes[0].legend(fontsize=7)
    paths.append(common.save_figure(fig, out, "lock_bound.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, s in result["spreads"]["kl_at_lock"].items():
        if s["count"] and label in {r["label"] for r in rows if r["block_length"] == infill.GEN_LENGTH}:
            ax.stairs(s["histogram"], s["edges"], label=f"{label} (n {s['count']})")
    ax.set(xscale="log", xlabel="KL at lock time (clamped to [1e-12, 1e2])", ylabel="locked generated positions",
           title="KL at lock time, default decode")
    ax.legend(fontsize=6)
    paths.append(common.save_figure(fig, out, "kl_at_lock_hist.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, s in result["spreads"]["commit_confidence"].items():
        if s["count"] and (label.startswith("dense") or "threshold" in label):
            ax.stairs([h / s["count"] for h in s["histogram"]], s["edges"],
                      label=f"{label} (median {s['q50']:.2f})")
    ax.set(xlabel="top-1 probability at commit time", ylabel="share of committed tokens",
           title="Prediction spread at commit time")
    ax.legend(fontsize=7)
    paths.append(common.save_figure(fig, out, "commit_confidence_hist.png"))
    return paths


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------

KINDS = ("line", "lines", "body")


def _kinds(em: dict) -> str:
    return " / ".join(common.fmt(em.get(k), 2) for k in KINDS)


def _num(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(result: dict) -> str:
    """docs/quality.md's infill table: one row per setting."""
    lines = ["| setting | EM dense | EM | EM dense line / lines / body | EM line / lines / body | parse dense | parse "
             "| Gen-PPL dense | Gen-PPL | token agreement | FLOPs ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {r['accuracy_dense']:.3f} | {r['accuracy_locked']:.3f} | "
                     f"{_kinds(r['exact_match_dense'])} | {_kinds(r['exact_match_locked'])} | "
                     f"{_num(r['parse_rate_dense'])} | {_num(r['parse_rate_locked'])} | {r['gen_ppl_dense']:.2f} | "
                     f"{r['gen_ppl_locked']:.2f} | {r['token_agreement']:.3f} | {r['flops_ratio']:.3f} |")
    return "\n".join(lines) + "\n\n" + provenance(result)


def summary_rows(result: dict) -> list[tuple[str, dict | None]]:
    """(what, row) for README's summary: eps 5e-3, 5e-2 and the first eps (at the default decode, no gate)
    whose exact match is DROP or more below dense; None for the last where no eps dropped that far."""
    plain = [r for r in result["rows"] if r["block_length"] == infill.GEN_LENGTH and r["cache"] is None
             and r["threshold"] is None and r["lock"] is not None and r["lock"]["confidence_gate"] is None]
    by_eps = {r["lock"]["kl_threshold"]: r for r in plain}
    out = [(f"eps {eps:g}", by_eps[eps]) for eps in (5e-3, 5e-2) if eps in by_eps]
    drop = next((r for r in sorted(plain, key=lambda r: r["lock"]["kl_threshold"])
                 if r["accuracy_locked"] <= r["accuracy_dense"] - DROP + 1e-12), None)
    what = f"first eps losing >= {DROP:g}"
    out.append((what if drop is None else f"eps {drop['lock']['kl_threshold']:g} ({what})", drop))
    return out


def summary_table(result: dict) -> str:
    """README's summary: dense exact match, then exact match, Gen-PPL and FLOPs ratio of ``summary_rows``."""
    dense = next(r for r in result["rows"] if r["block_length"] == infill.GEN_LENGTH)
    lines = ["| tiny-code infill | exact match | Gen-PPL | FLOPs ratio |", "|---|---:|---:|---:|",
             f"| dense | {dense['accuracy_dense']:.3f} | {dense['gen_ppl_dense']:.2f} | 1.000 |"]
    largest = max((r["lock"]["kl_threshold"] for r in result["rows"] if r["lock"]), default=None)
    for what, r in summary_rows(result):
        if r is None:
            lines.append(f"| {what} | none up to eps {largest:g} | | |")
        else:
            lines.append(f"| {what} | {r['accuracy_locked']:.3f} | {r['gen_ppl_locked']:.2f} | "
                         f"{r['flops_ratio']:.3f} |")
    return "\n".join(lines) + "\n\n" + provenance(result)


def provenance(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    d = s["decode"]
    return (f"_The first {s['n']} records of `{s['eval_file']}` (kinds interleaved); gen_length {d['gen_length']}, "
            f"steps {d['steps']}, one block or blocks of {s['block_length_cached']}, greedy {d['remasking']} "
            f"remasking; model `{s['model']}`, {m['cpu_model']}, {m['torch_threads']} torch thread(s), eager "
            f"backend; generated by `python benchmarks/infill_sweep.py{' --quick' if s['quick'] else ''} "
            f"--n {s['n']}`._")


def write_docs(result: dict) -> None:
    """Fill docs/quality.md's infill-table block with ``table``, and README's quality block with
    ``summary_table`` (printed instead where README has no such block)."""
    if not common.replace_readme_block(DOC, TABLE, table(result)):
        begin, end = common.readme_markers(TABLE)
        raise SystemExit(f"{DOC} has no {begin} ... {end} block to fill")
    print(f"wrote the table into {DOC}")
    if common.replace_readme_block(README, SUMMARY, summary_table(result)):
        print(f"wrote the summary into {README}")
    else:
        begin, end = common.readme_markers(SUMMARY)
        print(f"{README} has no {begin} ... {end} block; its summary would be:\n\n{summary_table(result)}\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=infill.default_model_dir(),
                        help="checkpoint with tokenizer (default: the shipped tiny-code model)")
    parser.add_argument("--n", type=int, default=None, help="records of the evaluation (default 150; 6 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a handful of settings (and n 6 unless given)")
    parser.add_argument("--out", type=Path, default=common.FIGURES / "quality_infill",
                        help="where infill_sweep.json and the plots go (default: benchmarks/figures/quality_infill)")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/quality.md and README.md alone")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the other benchmarks)")
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 6 if args.quick else 150
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = sweep(args)
    result["seconds"] = time.perf_counter() - start
    print(f"wrote {common.write_json(args.out / 'infill_sweep.json', result)}")
    for path in plot(result, args.out):
        print(f"wrote {path}")
    print(table(result))
    if args.no_docs:
        print(summary_table(result))
    else:
        write_docs(result)
    return result


if __name__ == "__main__":
    main()
