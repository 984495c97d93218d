"""Generate BENCHMARKS.md (and its figures) from the benchmarks' JSON. Never edit BENCHMARKS.md by hand.

    python benchmarks/make_report.py [--results results/] [--output BENCHMARKS.md] [--figures benchmarks/figures]

Reads ``step_latency.json``, ``decode_e2e.json``, ``overhead.json``, ``cache_policies.json`` and
``gpu_check.json`` (a run of ``benchmarks/gpu_check.py`` on a GPU) from ``--results`` (each optional),
redraws their plots into ``--figures`` (with a copy of the JSON) and writes the report: settings and machine,
the targets and whether they are met, tables, plots, and the comparison with the paper's numbers.
With ``--blocks`` (default when writing the default output) the generated blocks of the docs are filled
too (``BLOCK_FILES``): README.md gets the headline numbers between ``<!-- benchmarks:begin -->`` and
``<!-- benchmarks:end -->``, docs/limitations.md the limitations these benchmarks measure between
``<!-- limitations:begin -->`` and ``<!-- limitations:end -->``. ``--blocks-only`` fills the blocks and
writes nothing else, e.g. from the committed JSON:

    python benchmarks/make_report.py --results benchmarks/figures --blocks-only
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import gpu_check  # noqa: E402
from decode_e2e import BACKENDS as E2E_BACKENDS  # noqa: E402

ROOT = common.ROOT
# The generated blocks (``common.readme_markers``) and the file each one is in.
BLOCK_FILES = {"benchmarks": ROOT / "README.md", "limitations": ROOT / "docs" / "limitations.md"}
PAPER = dict(flops_ratio=(0.47, 0.55), tps_ratio_b_ge_2=(1.17, 1.39), tps_ratio_b1_g64=0.73,
             note="LLaDA-8B-Instruct on a GPU, eps 5e-4..5e-3, plain-PyTorch gather/scatter (SureLock, ICLR 2026)")
COMMANDS = """```bash
python benchmarks/step_latency.py   # per-step latency vs active fraction (add --quick for a ~1.5 min run)
python benchmarks/decode_e2e.py     # end-to-end decodes with a recorded lock schedule
python benchmarks/overhead.py       # optimize() cost and per-step bookkeeping share
python benchmarks/cache_policies.py # Fast-dLLM's caches with and without locking, from recorded decodes
python benchmarks/gpu_check.py      # on a CUDA machine: correctness and per-pass timings with the roofline
python benchmarks/make_report.py    # this file, from results/*.json
```"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=common.DEFAULT_OUT)
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--figures", type=Path, default=common.FIGURES)
    ap.add_argument("--blocks", dest="blocks", action="store_true", default=None,
                    help="also fill the generated blocks: the headline in README.md, the limitations in "
                         "docs/limitations.md (default: when --output is the default BENCHMARKS.md)")
    ap.add_argument("--no-blocks", dest="blocks", action="store_false", help="leave README.md and docs/ alone")
    ap.add_argument("--blocks-only", action="store_true",
                    help="fill the generated blocks from --results and write nothing else (no report, no figures)")
    args = ap.parse_args(argv)
    if args.blocks is None:
        args.blocks = args.blocks_only or args.output.resolve() == (ROOT / "BENCHMARKS.md").resolve()
    return args


def load(results: Path) -> dict:
    out = {}
    for name in ("step_latency", "decode_e2e", "overhead", "cache_policies", "gpu_check"):
        path = results / f"{name}.json"
        if path.exists():
            out[name] = common.read_json(path)
    return out


f2, f1, f3 = (lambda v: common.fmt(v, 2)), (lambda v: common.fmt(v, 1)), (lambda v: common.fmt(v, 3))
NAMES = {"eager": "eager", "inductor": "inductor", "onnxruntime": "ONNX Runtime"}


def e2e_backends(results: list[dict]) -> list[str]:
    """The backends the end-to-end results compare locked with dense on, in ``decode_e2e.BACKENDS`` order."""
    return [b for b in E2E_BACKENDS if any(f"speedup_{b}" in r for r in results)]


def pct(v):
    return "–" if v is None else f"{100 * v:.1f}%"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rel(path: Path, output: Path) -> str:
    return os.path.relpath(path, output.parent).replace(os.sep, "/")


def machine_section(data: dict) -> str:
    rows = []
    for name, d in data.items():
        m, s = d["machine"], d["settings"]
        rows.append([f"`{name}`", "quick" if d.get("quick") else "full", m["cpu_model"],
                     m.get("cpu_capability", "–"), m["cpu_cores"],
                     s.get("threads", m.get("torch_threads")), m["torch_version"], m.get("git_commit") or "–",
                     m.get("malloc", "defaults"), m.get("date", "–"),
                     f"{m.get('load_average_start')} → {m.get('load_average_end')}"])
    return table(["benchmark", "mode", "CPU", "vector ISA", "cores", "torch threads", "torch", "commit", "glibc malloc",
                  "date (UTC)", "load avg (1/5/15 min) start → end"], rows)


# ----------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------

def target_rows(data: dict) -> list[list]:
    rows = []
    sl, e2e = data.get("step_latency"), data.get("decode_e2e")
    if sl:
        for backend in sorted({r["backend"] for r in sl["results"]}):
            pts = [r for r in sl["results"] if r["backend"] == backend and r["fraction"] >= 0.1 - 1e-9]
            worst = min(pts, key=lambda r: r["efficiency"], default=None)
            if worst:
                bad = [r for r in pts if r["efficiency"] < 0.9]
                where = "" if not bad else "; below 0.9 at " + ", ".join(
                    f"N={r['seq']} M/N={f2(r['fraction'])}" for r in bad)
                rows.append([f"efficiency >= 0.9 wherever M/N >= 0.1 (graph step, {backend})",
                             f"min {f2(worst['efficiency'])} (N={worst['seq']}, M/N={f2(worst['fraction'])}){where}",
                             "met" if not bad else "**not met**"])
        half = sl["targets"].get("locked_half_vs_plain_eager") or []
        for backend in sorted({h["backend"] for h in half}):
            hs = [h for h in half if h["backend"] == backend]
            rows.append([f"{backend} locked >= 2x the plain eager model at FLOPs ratio ~0.5 (graph step, M/N = 0.5)",
                         ", ".join(f"N={h['seq']}: {f2(h['speedup'])}x" for h in hs),
                         "met" if min(h["speedup"] for h in hs) >= 2 else "**not met**"])
    if e2e:
        res = e2e["results"]
        for backend in e2e_backends(res):
            vals = [(r[f"speedup_{backend}"], r) for r in res if f"speedup_{backend}" in r]
            if vals:
                worst, r = min(vals, key=lambda v: v[0])
                rows.append([f"never slower than dense, any B and G (end-to-end, {backend})",
                             f"min tokens/s ratio {f2(worst)} (B={r['batch']}, G={r['gen_length']})",
                             "met" if worst >= 1 else "**not met**"])
        effs = [(r[f"efficiency_{b}"], b, r) for r in res for b in e2e_backends(res) if f"efficiency_{b}" in r]
        if effs:
            worst, b, r = min(effs, key=lambda v: v[0])
            rows.append(["end-to-end efficiency (speedup / ideal) >= 0.9 (M/N >= 0.1 throughout these decodes)",
                         f"min {f2(worst)} ({b}, B={r['batch']}, G={r['gen_length']})",
                         "met" if worst >= 0.9 else "**not met**"])
        near = [r for r in res if "speedup_vs_plain_inductor" in r and 0.4 <= r["flops_ratio"] <= 0.6]
        if near:
            lo = min(r["speedup_vs_plain_inductor"] for r in near)
            hi = max(r["speedup_vs_plain_inductor"] for r in near)
            rows.append(["inductor locked >= 2x the plain eager model at FLOPs ratio ~0.5 "
                         "(end-to-end, FLOPs ratio 0.4-0.6)",
                         f"{f2(lo)}x .. {f2(hi)}x over {len(near)} configurations",
                         "met" if lo >= 2 else "**not met**"])
        graphs = [r["compilations_timed"]["graphs"] for r in res]
        warm = [r["compilations_warmup"]["graphs"] for r in res]
        rows.append(["static shapes: no compilation inside timed decodes (after per-shape warm-up)",
                     f"{sum(graphs)} graphs compiled during timed decodes; {min(warm)}–{max(warm)} graphs compiled "
                     f"per (B, G) in warm-up (bucket {e2e['settings']['bucket']}) serve "
                     f"{min(len(r['graph_widths']) for r in res)}–{max(len(r['graph_widths']) for r in res)} "
                     "active-row widths per decode",
                     "met" if sum(graphs) == 0 else "**not met**"])
    return rows


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------

def linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares t = a + b * M over (M, t) points: (a, b)."""
    n = len(points)
    mx = sum(m for m, _ in points) / n
    my = sum(t for _, t in points) / n
    var = sum((m - mx) ** 2 for m, _ in points)
    b = sum((m - mx) * (t - my) for m, t in points) / var if var else 0.0
    return my - b * mx, b


def fixed_costs(d: dict) -> list[dict]:
    """Per (backend, N): the fitted fixed cost of a locked pass (time at M = 0) and the cost per row."""
    out = []
    for backend in sorted({r["backend"] for r in d["results"]}):
        for N in sorted({r["seq"] for r in d["results"]}):
            pts = [r for r in d["results"] if r["backend"] == backend and r["seq"] == N]
            if len(pts) < 2:
                continue
            a, b = linear_fit([(r["active_rows"] * r["batch"], r["t_locked_s"]) for r in pts])
            streamed = d["model"].get("streamed_weight_bytes")
            out.append(dict(backend=backend, seq=N, fixed_s=a, per_row_s=b, fixed_share=a / pts[0]["t_dense_s"],
                            rows_for_0_9=9 * a / b if b > 0 else None,
                            weight_gb_per_s=streamed / a / 1e9 if streamed and a > 0 else None))
    return out


def step_latency_section(d: dict, figures: list[Path], output: Path) -> str:
    s, m = d["settings"], d["model"]
    out = [f"Model: LLaDA-shaped, random weights, d_model {m['d_model']}, {m['n_layers']} layers, "
           f"{m['n_heads']} heads, MLP {m['mlp_hidden_size']}, vocab {m['vocab_size']} "
           f"({m['parameters'] / 1e6:.0f}M parameters, {m['dtype']}); "
           f"batch {s['batch']}; {s['reps']} interleaved repetitions, {s.get('statistic', 'median')}. "
           f"Dense baseline: {s['dense_baseline']}. "
           f"Locked: {s['locked_graph']}."]
    rows = [[r["backend"], r["seq"], r["active_rows"], f2(r["fraction"]), f1(r["t_dense_s"] * 1e3),
             f1(r["t_locked_s"] * 1e3), f2(r["speedup"]), f2(r["ideal_speedup"]), f2(r["efficiency"]),
             f2(r.get("gemm_efficiency")), f1(r["t_plain_s"] * 1e3), f2(r["speedup_vs_plain"])]
            for r in d["results"]]
    out.append(f"Plain model: {s['plain']}; its time is the `plain ms` column, and `vs plain` = plain ms / locked ms. "
               f"`GEMMs alone`: {s.get('gemm_chain', 'not measured')}; the bound for a pass, which adds "
               "attention, norms and gathers to them.")
    out.append(table(["backend", "N", "M", "M/N", "dense ms", "locked ms", "speedup", "ideal", "efficiency",
                      "GEMMs alone", "plain ms", "vs plain"], rows))
    cross = ", ".join(f"{c['backend']} N={c['seq']}: " + ("none (locked faster up to M = N)" if c["fraction"] is None
                                                          else f"M/N = {f2(c['fraction'])}") for c in d["crossover"])
    out.append(f"Measured crossover (locked graph as slow as the dense model): {cross}. "
               f"Compilations during the sweep: "
               + ", ".join(f"{k}: {v['graphs']}" for k, v in d["compilations"].items()) + ".")
    fits = fixed_costs(d)
    if fits:
        streamed = d["model"].get("streamed_weight_bytes")
        out.append("Where the efficiency goes at small M: a least-squares line t_locked = a + b * M through each "
                   "curve. The intercept a stands for what a pass costs beyond its FLOPs at small M: every pass "
                   "reads all weights whatever M is"
                   + (f" ({streamed / 1e6:.0f} MB here, all but the embedding table; the last column is the "
                      "bandwidth at which reading them once takes a)" if streamed else "")
                   + ", and GEMMs with few rows run below peak. With it, efficiency at M rows is about "
                   "b * M / (a + b * M), i.e. >= 0.9 needs M >= 9 a / b rows (B * M with a batch).")
        out.append(table(["backend", "N", "fixed cost a (ms)", "a / dense pass", "b (ms per row)",
                          "rows for efficiency 0.9", "weights / a (GB/s)"],
                         [[f["backend"], f["seq"], f1(f["fixed_s"] * 1e3), pct(f["fixed_share"]),
                           f2(f["per_row_s"] * 1e3),
                           "–" if f["rows_for_0_9"] is None else f"{f['rows_for_0_9']:.0f}", f1(f["weight_gb_per_s"])]
                          for f in fits]))
    out += [f"![step latency]({rel(p, output)})" for p in figures]
    return "\n\n".join(out)


def repetition_efficiencies(r: dict, backend: str) -> list[float]:
    """The efficiency of each interleaved repetition of an exact configuration ``r``: its dense time over
    its locked time, over the ideal."""
    dense, locked = (r["exact"][f"{kind}/{backend}"]["times_s"] for kind in ("dense", "locked"))
    return [d / t / r["ideal_speedup"][backend] for d, t in zip(dense, locked, strict=True)]


def e2e_section(d: dict, figures: list[Path], output: Path) -> str:
    s, m, sch = d["settings"], d["model"], d["schedule"]
    rec = sch["recorded"]
    lags = [v for v in sch["gen_lags"] if v is not None]
    never = sum(v is None for v in sch["gen_lags"])
    out = [f"Model: LLaDA-shaped, random weights, d_model {m['d_model']}, {m['n_layers']} layers, "
           f"{m['n_heads']} heads, MLP {m['mlp_hidden_size']}, vocab {m['vocab_size']} "
           f"({m['parameters'] / 1e6:.0f}M parameters). Prompt "
           f"{s['prompt']} random tokens; sampler: {s['sampler']}; `optimize(bucket={s['bucket']})`; eps {s['eps']}.",
           f"Lock schedule recorded from: {sch['source']} (batch {rec['batch']}, N = {rec['seq']}, "
           f"FLOPs ratio of the recorded decodes {f3(rec['flops_ratio'])}); generated tokens lock "
           f"{min(lags) if lags else '–'}–{max(lags) if lags else '–'} steps after they are unmasked "
           f"(median {sorted(lags)[len(lags) // 2] if lags else '–'}; {never} of {len(sch['gen_lags'])} never lock), "
           "prompt tokens at the recorded prompt lock steps. The replay decides which rows are locked; all "
           "runtime work is real.",
           f"`exact` = whole `generate()` decodes (the fastest of {s.get('exact_reps', 1)} per variant, "
           f"interleaved); `sampled` = {s['samples']} timed decode steps per variant, "
           "interpolated over all G steps, locked variants' in the step's active rows, dense ones' in t (whole "
           "decodes of the larger configurations would take hours on this CPU)."]
    backends = e2e_backends(d["results"])
    names = [NAMES[b] for b in backends]
    rows = []
    for r in d["results"]:
        t = r["tokens_per_s"]
        rows.append([r["batch"], r["gen_length"], r["mode"], f3(r["flops_ratio"]), f2(r["ideal_speedup"][backends[0]]),
                     f2(t.get("dense/plain")),
                     *(f2(t.get(f"{kind}/{b}")) for kind in ("dense", "locked") for b in backends),
                     *(f2(r.get(f"{key}_{b}")) for key in ("speedup", "efficiency") for b in backends),
                     f2(r.get("gemm_efficiency")), *(f2(r.get(f"speedup_vs_plain_{b}")) for b in backends)])
    out.append("Each backend's dense baseline is its pipeline without the locking rewrite (eager: packed weights, "
               "inductor: frozen weights, ONNX Runtime: the plain model exported to ONNX, in a CPU session with as "
               "many threads as torch); `plain` is the model in PyTorch eager. Speedup and efficiency compare "
               "locked with dense on the same backend; `GEMMs alone` is that efficiency for the model's linear "
               "layers alone (one oneDNN call each on packed weights) at the rows of each step's locked (eager: active "
               "rows, packed) and dense graphs, timed at the sampled steps: the bound that reading the weights "
               "every pass and few-row GEMMs set, before attention, the sampler and the bookkeeping. The last "
               "columns compare locked with the plain model.")
    out.append(table(["B", "G", "mode", "FLOPs ratio", "ideal", "tok/s plain",
                      *(f"tok/s {kind} {n}" for kind in ("dense", "locked") for n in names),
                      *(f"{key} {n}" for key in ("speedup", "eff.") for n in names), "GEMMs alone",
                      *(f"locked {n} / plain" for n in names)], rows))
    spread = [(r, b, repetition_efficiencies(r, b)) for r in d["results"] for b in backends
              if f"locked/{b}" in r.get("exact", {})]
    if spread:
        out.append("Efficiency of each interleaved repetition of the exact decodes (its dense time over its locked "
                   "time, over the ideal): how far one timing may stray on this machine. " + "; ".join(
                       f"B={r['batch']} G={r['gen_length']} {NAMES[b]}: {span(effs)}" for r, b, effs in spread) + ".")
    padded = [r for r in d["results"] if "padded_flops_ratio" in r]
    if padded:
        out.append("Batch padding: attention runs every batch row's queries as many as the row with the most active "
                   "ones; the projections, FFN and LM head compute the active rows only on the steps that run packed "
                   "across the batch (`passes/pack_rows.py`: eager every step, inductor and ONNX Runtime where "
                   "the padding reaches `runtime.PACK_FROM` of the rows), else as many as attention. The locked "
                   "graphs compute a FLOPs ratio (eager / inductor and ONNX Runtime, their packed steps) of "
                   + ", ".join(
                       f"{f3(r['padded_flops_ratio']['eager'])} / {f3(r['padded_flops_ratio']['inductor'])}, "
                       f"{r['packed_steps']['inductor']} of {r['steps']} (B={r['batch']}, G={r['gen_length']})"
                       for r in padded)
                   + " against the FLOPs ratio above (active rows only), which the ideal is computed from.")
    errs = [(r, k, v) for r in d["results"] for k, v in (r.get("estimator_error") or {}).items()]
    if errs:
        out.append("Step-sampling estimator against whole decodes (estimate / exact - 1): " + "; ".join(
            f"B={r['batch']} G={r['gen_length']} {k}: {100 * v:+.0f}%" for r, k, v in errs) + ".")
    comp = [(r["batch"], r["gen_length"], r["compilations_warmup"]["graphs"], r["compilations_timed"]["graphs"])
            for r in d["results"]]
    out.append("Compilations (graphs; warm-up / timed): "
               + ", ".join(f"B={b} G={g}: {w}/{t}" for b, g, w, t in comp) + ".")
    out += [f"![decode]({rel(p, output)})" for p in figures]
    return "\n\n".join(out)


def overhead_section(d: dict, figures: list[Path], output: Path) -> str:
    s, oc = d["settings"], d["optimize_cost"]
    out = [f"`optimize()` on the `{s['preset']}` model: capture (torch.export + cleanup) {f1(oc['capture_s'])} s, "
           f"`lock_rows` {f3(oc['lock_rows_s'])} s. Compilation happens on the first call (inductor, "
           f"dynamic shapes; inductor cache: {s.get('inductor_cache', '–')})."]
    rows = []
    for backend in s["backends"]:
        e = oc[backend]
        packed = e.get("packed_compilations")
        rows.append([backend, f1(e["optimize_s"]), f1(e["compile_on_first_call_s"]),
                     f1(e["packed_compile_on_first_use_s"]) if packed else "–", f1(e["total_setup_s"]),
                     e["compilations"]["graphs"] + (packed["graphs"] if packed else 0), f1(e["dense_compile_s"]),
                     f1(e["steady_call_s"] * 1e3), f1(e["dense_steady_call_s"] * 1e3)])
    out.append(table(["backend", "optimize() s", "first-call compile s", "packed form's compile s (first packed step)",
                      "total setup s", "graphs", "dense torch.compile s", "locked pass ms (M = N)", "dense pass ms"],
                     rows))
    rows = []
    for st in d["steps"]:
        ph = st["phases_s"]
        rows.append([st["backend"], st["batch"], st["step"], f2(st["fraction"]), st["graph_width"], st["kl_candidates"],
                     f1(st["step_profiled_s"] * 1e3), pct(st["graph_share"]), pct(st["bookkeeping_share"]),
                     f1(ph.get("index", 0) * 1e3), f1(ph.get("release", 0) * 1e3), f1(ph.get("kl", 0) * 1e3),
                     f1(ph["cache_scatter"] * 1e3) if st["backend"] == "eager" and "cache_scatter" in ph else "fused",
                     pct(st["sampler_share"]), f1(st["bookkeeping_s"] * 1e3), f1(st["legacy_bookkeeping_s"] * 1e3)])
    out.append(f"Per decode step (G = {s['gen']}, P = {s['prompt']}, replayed schedule; profiled, best of "
               f"{s['reps']}): bookkeeping = runner time outside the graph (index, release of old logits, KL, "
               "lock-mask and row-map updates, stats); "
               "sampler = the sampler's own work on the returned logits (same for dense decoding). Last column: the "
               "first runtime's KL/buffer bookkeeping on the same tensors.")
    out.append(table(["backend", "B", "step", "M/N", "graph M", "KL rows", "step ms", "graph", "bookkeeping",
                      "index ms", "release ms", "KL ms", "K/V cache writes ms (in graph)", "sampler", "bookkeeping ms",
                      "first runtime ms"], rows))
    out += [f"![overhead]({rel(p, output)})" for p in figures]
    return "\n\n".join(out)


# ----------------------------------------------------------------------------------------------
# cache policies
# ----------------------------------------------------------------------------------------------

CLOCK_NAMES = {"wall": "wall time", "cpu": "the process's CPU time (one thread: the time on a core of its own, "
                                       "on a machine shared with other work)"}


def policy_ratios(results: list[dict], name: str, key: str = "tokens_per_s") -> str:
    """The span over configurations of variant ``name``'s ``key`` against the dense sampler's ("–" if not run)."""
    vals = [r["variants"][name][key] / r["variants"]["dense"][key] for r in results if name in r["variants"]]
    return span(vals) if vals else "–"


def median(values: list):
    values = sorted(values)
    return values[len(values) // 2] if values else "–"


def recorded_summary(d: dict) -> str:
    """What the cache-policy replays were recorded from: the threshold profiles and the lock timings."""
    rec = d["recorded"]
    profiles = ", ".join(f"{name} {f3(sum(p) / len(p))}" for name, p in rec["profiles"].items())
    timings = []
    for policy, sch in rec["timings"].items():
        lags = [v for v in sch["gen_lags"] if v is not None]
        counts = [v for v in sch["prompt_lock_steps"] if v is not None]
        timings.append(f"{'no cache' if policy == 'none' else policy}: generated tokens lock after a median "
                       f"{median(lags)} computations once unmasked ({len(sch['gen_lags']) - len(lags)} of "
                       f"{len(sch['gen_lags'])} never), {len(counts)} of {len(sch['prompt_lock_steps'])} prompt "
                       f"positions lock, after a median {median(counts)} computations (FLOPs ratio of the recorded "
                       f"decodes {f3(sch['recorded']['flops_ratio'])})")
    steps = [s for p in rec["profiles"].values() for s in p]
    whole = steps and all(s * rec["threshold_block"] == 1 for s in steps)
    return (f"Recorded from {rec['source']}, gen {rec['settings']['gen_length']}. Threshold decoding "
            f"({rec['threshold']}, block {rec['threshold_block']}) took a mean {profiles} steps per row and block, "
            "relative to the block's length (1 = one token per step); threshold variants replay that step count "
            "(per block: the block length times the expected largest of B rows' relative steps) in LLaDA's even "
            "per-step schedule."
            + (" The recorded model commits every row's whole block in one step, so this step count is set by the "
               "recorded block's length, not by the model: a model that commits a few tokens per step takes more."
               if whole else "")
            + " Lock timing, from LLaDA-schedule locked decodes of each policy in blocks of "
            f"{rec['lock_block']} (counted in a token's own computations, which a cache policy makes fewer than the "
            "passes; threshold variants replay the same timing): " + "; ".join(timings) + ".")


def cache_policies_rows(d: dict) -> list[list]:
    return [[r["batch"], r["prompt"], name, v["steps"], f3(v["flops_ratio"]), f2(v["tokens_per_s"]), f2(v["speedup"]),
             f2(v["ideal_speedup"]), f2(v["efficiency"]), f2(v["gemm_efficiency"]), pct(v["gemm_share"]),
             " / ".join(pct(v[f"{part}_s"] / v["time_s"]) for part in ("graph", "kl", "sampler"))]
            for r in d["results"] for name, v in r["variants"].items()]


def cache_policies_targets(d: dict) -> str:
    rows = []
    for t in d["targets"]:
        measured = f"tokens/s {f2(t['tokens_per_s_ratio'])}x" + (
            f", FLOPs {f3(t['flops_ratio'])}x" if "flops_ratio" in t else "")
        rows.append([t["target"], t["batch"], t["prompt"], measured, "met" if t["met"] else "**not met**"])
    return table(["target", "B", "P", "measured", "status"], rows)


def published_comparison(d: dict) -> str:
    """Their published figures beside ours, labelled."""
    pub, res = d["published"], d["results"]
    fd, sl = pub["fast_dllm"], pub["surelock"]
    gen = d["settings"]["gen"]
    tps, acc = fd["gen_256"]["tokens_per_s"], fd["gen_256"]["accuracy_pct"]
    rows = [[f"theirs: {fd['source']}", "caches + threshold vs LLaDA",
             f"{tps[0]} → {tps[1]} tok/s = {fd['gen_256']['ratio']}x at gen 256 ({fd['gen_512_ratio']}x at gen 512); "
             f"accuracy {acc[0]} → {acc[1]}%", "–"],
            [f"theirs: {sl['source']}", "SureLock + selection vs dense", f"{sl['tokens_per_s_ratio']}x",
             f"{sl['flops_ratio']}x"]]
    for name, what in (("dual+thr", "dual cache + threshold vs dense"), ("prefix+thr", "prefix cache + threshold"),
                       ("lock", "SureLock alone"), ("lock+thr", "SureLock + threshold"),
                       ("dual+lock+thr", "dual cache + SureLock + threshold")):
        if any(name in r["variants"] for r in res):
            rows.append([f"ours (gen {gen}, all B and P, estimated)", what, f"{policy_ratios(res, name)}x",
                         f"{policy_ratios(res, name, 'flops')}x"])
    return table(["source", "comparison", "tokens/s ratio", "FLOPs ratio"], rows)


def cache_policies_section(d: dict, figures: list[Path], output: Path) -> str:
    s, m, val = d["settings"], d["model"], d["validation"]
    out = [f"Model: LLaDA-shaped, random weights, d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} "
           f"heads, MLP {m['mlp_hidden_size']}, vocab {m['vocab_size']} ({m['parameters'] / 1e6:.0f}M parameters); "
           f"gen {s['gen']}, block {s['block']}, prompts {s['prompts']} (random tokens), B in {s['batches']}; "
           f"{s['threads']} torch thread(s). Policies: `dense` is the dense LLaDA sampler (dense graph, "
           "steps = gen, no cache); `prefix` and `dual` are Fast-dLLM's caches as the rows each pass computes, `lock` "
           f"SureLock (eps {s['eps']}), `+thr` threshold decoding's step count; all but dense run the locked graph "
           f"({s['locked_backend']}), dense runs {s['dense_baseline']}.",
           recorded_summary(d),
           "Times are estimates: a real decode of each replay on a tiny model gives every pass's computed rows, KL "
           "candidate rows and masked rows; single passes of the benchmark model (dense graph, locked graph at "
           f"{s['points']} row counts, GEMMs alone at the same counts), the sampler's step and the lock rule's KL are "
           f"timed ({CLOCK_NAMES[s['clock']]}; the fastest of {s['reps']} interleaved), and a decode's time is the "
           "sum over its passes, "
           "interpolated in those rows. FLOPs ratio and speedup are against `dense`; efficiency = speedup / "
           "(1 / FLOPs ratio); `GEMMs alone` is that efficiency for the model's linear layers alone (the bound of "
           "the step-latency and end-to-end sections), `GEMM share` the decode's time its GEMMs alone would take; "
           "`graph / KL / sampler` the shares of the estimated time.",
           table(["B", "P", "policy", "steps", "FLOPs ratio", "tok/s", "speedup", "ideal", "efficiency", "GEMMs alone",
                  "GEMM share", "graph / KL / sampler"], cache_policies_rows(d))]
    clock = s["clock"]
    checked = ", ".join(f"{name}: estimate {f2(v['time_s'])} s, whole decode {f2(v[f'measured_{clock}_s'])} s "
                        f"({100 * v['estimator_error']:+.0f}%; wall {f2(v['measured_wall_s'])} s, CPU "
                        f"{f2(v['measured_cpu_s'])} s)" for name, v in val["variants"].items())
    match = all(v["rows_match"] for v in val["variants"].values())
    out.append(f"Estimator check (B={val['batch']}, P={val['prompt']}, gen {val['gen_length']}, decoded whole on the "
               f"benchmark model, the fastest of {s['validate_reps']}): {checked}; the speedup between them is off "
               f"by {100 * val['speedup_error']:+.0f}%. The whole decodes computed "
               + ("the replayed rows at every pass." if match else "**other rows than the replay at some pass**."))
    out += ["Targets (from the issue):", cache_policies_targets(d),
            "Published figures, theirs (LLaDA-8B on GPUs, with accuracy measured), beside ours (a CPU, random-weight "
            "models, replayed schedules, no accuracy): only the ratios compare.", published_comparison(d)]
    out += [f"![cache policies]({rel(p, output)})" for p in figures]
    return "\n\n".join(out)


def paper_section(data: dict) -> str:
    e2e = data.get("decode_e2e")
    backends = e2e_backends(e2e["results"]) if e2e else ["eager", "inductor"]
    rows = [["FLOPs ratio (locked / dense)", f"{PAPER['flops_ratio'][0]}–{PAPER['flops_ratio'][1]}"],
            ["tokens/s ratio, B >= 2", f"{PAPER['tps_ratio_b_ge_2'][0]}–{PAPER['tps_ratio_b_ge_2'][1]}x"],
            ["tokens/s ratio, B = 1, N_gen = 64", f"{PAPER['tps_ratio_b1_g64']}x (slower)"],
            ["tokens/s ratio against the plain PyTorch model, all B and G", "–"]]
    for row in rows:
        row += ["–"] * len(backends)
    if e2e:
        res = e2e["results"]
        fr = [r["flops_ratio"] for r in res]
        rows[0][2:] = [f"{f3(min(fr))}–{f3(max(fr))} (replayed schedule, all B, G)"] * len(backends)
        for col, backend in enumerate(backends, start=2):
            b2 = [r[f"speedup_{backend}"] for r in res if r["batch"] >= 2 and f"speedup_{backend}" in r]
            if b2:
                rows[1][col] = f"{f2(min(b2))}–{f2(max(b2))}x"
            b1 = [r for r in res if r["batch"] == 1 and f"speedup_{backend}" in r]
            b1_64 = [r for r in b1 if r["gen_length"] == 64] or b1
            if b1_64:
                r = b1_64[0]
                rows[2][col] = f"{f2(r[f'speedup_{backend}'])}x (G={r['gen_length']}, {r['mode']})"
            plain = [r[f"speedup_vs_plain_{backend}"] for r in res if f"speedup_vs_plain_{backend}" in r]
            if plain:
                rows[3][col] = f"{f2(min(plain))}–{f2(max(plain))}x"
    return table(["", f"paper ({PAPER['note']})", *(f"ours, {NAMES[b]}" for b in backends)], rows)


def notes(data: dict) -> str:
    """Observations computed from the data (no hand-typed numbers)."""
    items = []
    sl, e2e, oh = data.get("step_latency"), data.get("decode_e2e"), data.get("overhead")
    if sl:
        low = [r for r in sl["results"] if r["fraction"] >= 0.1 - 1e-9 and r["efficiency"] < 0.9]
        if low:
            fits = fixed_costs(sl)
            items.append("Graph-level efficiency falls below 0.9 at: " + ", ".join(
                f"{r['backend']} N={r['seq']} M/N={f2(r['fraction'])} ({f2(r['efficiency'])})" for r in low)
                + ". The cause is a per-pass cost that does not shrink with M (fitted intercept "
                + ", ".join(f"{f['backend']} N={f['seq']}: {f1(f['fixed_s'] * 1e3)} ms" for f in fits)
                + "): every pass reads all weights from memory whatever M is (the intercepts are of the order of "
                "reading them once, see the bandwidths in the table), and GEMMs with a few dozen rows run below "
                "the throughput of large ones; neither is counted by the FLOPs ratio. The cost is about the same "
                "at every N, so it weighs less as N or B grows (rows needed for 0.9 in the table).")
            gemm = sorted({(r["seq"], r["active_rows"], r["gemm_efficiency"]) for r in low if "gemm_efficiency" in r})
            if gemm:
                items.append("At those row counts the model's GEMMs alone, without anything else a pass does, reach "
                             "an efficiency of only " + ", ".join(f"{f2(g)} (N={N}, M={M})" for N, M, g in gemm)
                             + "; where that is below 0.9, no pass running oneDNN's float32 GEMM (eager, inductor) "
                             "can reach 0.9 on this CPU. "
                             "The rest of the gap (the locked pass against its GEMMs: "
                             + ", ".join(f"{r['backend']} N={r['seq']} M={r['active_rows']}: "
                                         f"{f2(r['efficiency'])} vs {f2(r['gemm_efficiency'])}"
                                         for r in low if "gemm_efficiency" in r)
                             + ") is attention with few queries (about 1.2x the cost per query of a full-width "
                             "one), the K/V cache writes and per-op costs.")
        else:
            items.append("Graph-level efficiency is at least 0.9 at every measured M/N >= 0.1.")
        over = [r for r in sl["results"] if r["efficiency"] > 1.05]
        if over:
            items.append(f"{len(over)} points show efficiency above 1: fewer rows also means a smaller working set "
                         "(better cache reuse), and the dense model's attention is over N queries where the locked "
                         "graph's is over M; timing noise on a shared machine is the rest.")
    if e2e:
        res = e2e["results"]
        slow = [(b, r) for r in res for b in e2e_backends(res) if r.get(f"speedup_{b}", 2) < 1]
        if slow:
            items.append("Locked decoding is slower than dense at: " + ", ".join(
                f"{b} B={r['batch']} G={r['gen_length']} ({f2(r[f'speedup_{b}'])}x)" for b, r in slow) + ".")
        else:
            items.append("Locked decoding is faster than dense decoding at every measured B and G with every backend, "
                         "B = 1 included (the paper measured 0.73x at B = 1, N_gen = 64). On this CPU a pass costs "
                         "close to its rows (see the step-latency curves), so removing rows removes time even at "
                         "B = 1; a GPU that few rows leave under-filled does not behave that way.")
        effs = [(r[f"efficiency_{b}"], b, r) for r in res for b in e2e_backends(res) if f"efficiency_{b}" in r]
        if effs:
            lo, hi = min(effs, key=lambda e: e[0]), max(effs, key=lambda e: e[0])
            items.append(f"End-to-end efficiency ranges from {f2(lo[0])} ({lo[1]}, B={lo[2]['batch']}, "
                         f"G={lo[2]['gen_length']}) to {f2(hi[0])} ({hi[1]}, B={hi[2]['batch']}, "
                         f"G={hi[2]['gen_length']}). "
                         "It is below the graph-level efficiency because a decode step also runs the sampler (an "
                         "argmax and a softmax over the masked positions' logits, read a few rows at a time; not "
                         "reduced by locking) and the "
                         "runtime's bookkeeping, and because "
                         "the active rows of a step (masked rows plus the few not yet locked) are few at the end of "
                         "a decode, where small-M passes are least efficient.")
            gemm = [r for r in res if "gemm_efficiency" in r]
            if gemm:
                lo_g = min(gemm, key=lambda r: r["gemm_efficiency"])
                hi_g = max(gemm, key=lambda r: r["gemm_efficiency"])
                below = [r for r in gemm if r["gemm_efficiency"] < 0.9]
                items.append(f"The decodes' GEMMs alone reach an efficiency of {f2(lo_g['gemm_efficiency'])} "
                             f"(B={lo_g['batch']}, G={lo_g['gen_length']}) to {f2(hi_g['gemm_efficiency'])} "
                             f"(B={hi_g['batch']}, G={hi_g['gen_length']})"
                             + (("; below 0.9 at " + ", ".join(f"B={r['batch']} G={r['gen_length']}" for r in below)
                                 + ": there, with oneDNN's float32 GEMM on this CPU and the rows these graphs "
                                 "compute (packed active rows), no eager or inductor decode can reach 0.9, whatever "
                                 "the rest of a step costs") if below else "") + ".")
    if sl:
        lowering = sorted({(r["backend"], r["seq"], r["t_plain_s"] / r["t_dense_s"]) for r in sl["results"]})
        items.append("How much of the speedup over the plain model is the lowering rather than the locking: the dense "
                     "pass of each backend's pipeline is " + ", ".join(
                         f"{f2(x)}x the plain model's speed ({b}, N={N})" for b, N, x in lowering)
                     + ". The plain model's float32 linears run torch's default BLAS GEMM (MKL); both pipelines "
                     "run oneDNN's GEMM on weights packed once into its blocked layout (the eager backend's "
                     "prepack_linear_weights pass, inductor's freezing), which is faster on this CPU, most of all "
                     "with few rows.")
    if oh:
        steps = oh["steps"]
        book = [st["bookkeeping_share"] for st in steps]
        samp = [st["sampler_share"] for st in steps]
        items.append(f"Runner bookkeeping takes {pct(min(book))}–{pct(max(book))} of a decode step and the sampler's "
                     f"own work {pct(min(samp))}–{pct(max(samp))} (the sampler runs "
                     "unchanged for dense decoding too, so it caps the end-to-end speedup). The first runtime's "
                     "bookkeeping on the same tensors took "
                     f"{f1(min(st['legacy_bookkeeping_s'] for st in steps) * 1e3)}–"
                     f"{f1(max(st['legacy_bookkeeping_s'] for st in steps) * 1e3)} ms per step against "
                     f"{f1(min(st['bookkeeping_s'] for st in steps) * 1e3)}–"
                     f"{f1(max(st['bookkeeping_s'] for st in steps) * 1e3)} ms now.")
    return "\n".join(f"- {i}" for i in items)


def render(data: dict, figures: dict, output: Path, generated_by: str) -> str:
    parts = ["# Benchmarks",
             f"*Generated by {generated_by}; do not edit by hand.* "
             "Every speed is a ratio of timings taken within one run (interleaved where possible); absolute times "
             "depend on the machine and on its load.",
             "## Commands", COMMANDS,
             "## Machine and settings", machine_section(data)]
    rows = target_rows(data)
    if rows:
        parts += ["## Targets", table(["target", "measured", "status"], rows)]
    if "step_latency" in data:
        parts += ["## Per-step latency against the active fraction",
                  step_latency_section(data["step_latency"], figures.get("step_latency", []), output)]
    if "decode_e2e" in data:
        parts += ["## End-to-end decoding", e2e_section(data["decode_e2e"], figures.get("decode_e2e", []), output)]
    if "overhead" in data:
        parts += ["## Overheads: optimize() and per-step bookkeeping",
                  overhead_section(data["overhead"], figures.get("overhead", []), output)]
    if "cache_policies" in data:
        parts += ["## Cache policies",
                  cache_policies_section(data["cache_policies"], figures.get("cache_policies", []), output)]
    if "gpu_check" in data:
        parts += [gpu_check.markdown(data["gpu_check"])]
    parts += ["## Comparison with the paper", paper_section(data),
              "The paper measured LLaDA-8B on a GPU, where a step with few active rows under-fills the device; "
              "these numbers are a CPU with random-weight models and a replayed lock schedule, so only the ratios "
              "are comparable, not the absolute speeds.",
              "## Observations", notes(data)]
    return "\n\n".join(parts) + "\n"


def headline(data: dict) -> str:
    lines = ["See [BENCHMARKS.md](BENCHMARKS.md) for the tables, plots, settings and the comparison with the paper."]
    e2e = data.get("decode_e2e")
    if e2e:
        res = e2e["results"]
        for backend in ("inductor", "eager"):
            vals = [r[f"speedup_{backend}"] for r in res if f"speedup_{backend}" in r]
            if vals:
                plain = [r[f"speedup_vs_plain_{backend}"] for r in res if f"speedup_vs_plain_{backend}" in r]
                against_plain = (f"; against the plain PyTorch model {f2(min(plain))}x to {f2(max(plain))}x"
                                 if plain else "")
                lines.append(f"Latest run ({'quick' if e2e.get('quick') else 'full'}, {e2e['machine']['cpu_model']}): "
                             f"locked vs dense tokens/s with {backend}: {f2(min(vals))}x to {f2(max(vals))}x over "
                             f"B in {sorted({r['batch'] for r in res})} and G in "
                             f"{sorted({r['gen_length'] for r in res})} "
                             f"(FLOPs ratio {f2(min(r['flops_ratio'] for r in res))}–"
                             f"{f2(max(r['flops_ratio'] for r in res))})"
                             f"{against_plain}.")
                break
    return "\n".join(lines)


def span(values, fmt=f2) -> str:
    values = list(values)
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def bullet(text: str) -> str:
    return textwrap.fill(text, 100, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False)


def small_pass_limitation(sl: dict, e2e: dict, report: str = "../BENCHMARKS.md") -> str:
    """The limitation of passes with few active rows, from step_latency and decode_e2e (``report``: the link
    to the benchmark report, relative to the file the text goes in)."""
    m = sl["machine"]
    rows = [f["rows_for_0_9"] for f in fixed_costs(sl) if f["rows_for_0_9"] and f["backend"] in ("eager", "inductor")]
    low = min((r for r in sl["results"] if r["fraction"] >= 0.1 - 1e-9 and "gemm_efficiency" in r),
              key=lambda r: r["gemm_efficiency"])
    threads = f"{m['torch_threads']} thread" + ("s" if m["torch_threads"] > 1 else "")
    reach = (f"reaches 0.9 from about {span(rows, '{:.0f}'.format)} active rows (B x M) per pass; below that the "
             f"speedup stays under the FLOPs ratio's promise" if rows
             else "falls with the active rows (B x M) per pass")
    text = (f"A pass with few active rows is bound by reading the weights from memory, not by its FLOPs: on the "
            f"{m['cpu_model']} measured ({m['cpu_cores']} cores, {threads}), the efficiency of the eager and inductor "
            f"graphs against the FLOPs ratio {reach}. "
            f"The model's GEMMs alone, timed at the same row counts, show "
            f"the same limit ({f2(low['gemm_efficiency'])} at {low['active_rows'] * low['batch']} rows, "
            f"[BENCHMARKS.md]({report}), `GEMMs alone` column, oneDNN's GEMM): it is the GEMM's on this hardware, "
            "not the rewrite's.")
    res = e2e["results"]
    G0 = min(r["gen_length"] for r in res)
    short, long = [r for r in res if r["gen_length"] == G0], [r for r in res if r["gen_length"] > G0]

    def decodes(rs):
        return span(r[f"efficiency_{b}"] for r in rs for b in e2e_backends(res) if f"efficiency_{b}" in r)

    text += (f" Whole decodes show it too: with {G0} generated tokens, whose last steps run a few rows, the GEMMs "
             f"alone at each step's rows reach an efficiency of {span(r['gemm_efficiency'] for r in short)} and the "
             f"decodes {decodes(short)}")
    single = [r for r in short if r["batch"] == 1]
    if single:
        text += (f" ({decodes(single)} at B = 1, where the GEMMs alone reach "
                 f"{span(r['gemm_efficiency'] for r in single)})")
    if long:
        text += (f"; from {min(r['gen_length'] for r in long)} tokens up, "
                 f"{span(r['gemm_efficiency'] for r in long)} and {decodes(long)}")
    return bullet(text + ".")


def padding_limitation(e2e: dict, report: str = "../BENCHMARKS.md") -> str:
    """The limitation of batch padding, from decode_e2e (``report``: as in ``small_pass_limitation``)."""
    res = [r for r in e2e["results"] if r["batch"] > 1]
    worst = max(res, key=lambda r: r["padded_flops_ratio"]["tensorrt"] / r["flops_ratio"])
    padded = worst["padded_flops_ratio"]
    extra = [r["padded_flops_ratio"]["tensorrt"] / r["flops_ratio"] - 1 for r in res]
    return bullet(
        "With B > 1, every batch row of a pass runs as many rows as the one with the most active rows, the "
        "others padded to the scratch slot. The TensorRT engines compute the padding in "
        f"every op: in the end-to-end benchmark of [BENCHMARKS.md]({report}), "
        f"{span([100 * e for e in extra], '{:.0f}'.format)}% more FLOPs than the active rows' (most at "
        f"B = {worst['batch']}, G = {worst['gen_length']}: a FLOPs ratio of "
        f"{f3(padded['tensorrt'])} computed for {f3(worst['flops_ratio'])} active). The eager backend runs the "
        f"projections, FFN and LM head on the active rows only, packed across the batch, at every step "
        f"({f3(padded['eager'])} there), the inductor and ONNX Runtime backends on the steps where that pays "
        f"({worst['packed_steps']['inductor']} of {worst['steps']}, {f3(padded['inductor'])}); attention still "
        f"runs the padded queries.")


def limitations(data: dict, report: str = "../BENCHMARKS.md") -> str | None:
    """The limitations block (docs/limitations.md), or None without step_latency and decode_e2e results."""
    sl, e2e = data.get("step_latency"), data.get("decode_e2e")
    if not (sl and e2e):
        return None
    return small_pass_limitation(sl, e2e, report) + "\n" + padding_limitation(e2e, report)


def update_blocks(blocks: dict[str, str | None], files: dict[str, Path] | None = None) -> list[str]:
    """Replace each named block that has a text in its file (``files``, default ``BLOCK_FILES``;
    ``common.replace_readme_block``); the names replaced."""
    files = BLOCK_FILES if files is None else files
    return [name for name, text in blocks.items()
            if text is not None and common.replace_readme_block(files[name], name, text)]


def blocks(data: dict, output: Path) -> dict[str, str | None]:
    """The text of every generated block, linking to the report at ``output``."""
    return dict(benchmarks=headline(data), limitations=limitations(data, rel(output, BLOCK_FILES["limitations"])))


def generated_by(args) -> str:
    """The command that writes this report, with the options that differ from the defaults (paths from the root)."""
    defaults = parse_args([])
    options = [f" --{name} {os.path.relpath(getattr(args, name).resolve(), ROOT).replace(os.sep, '/')}"
               for name in ("results", "output", "figures")
               if getattr(args, name).resolve() != getattr(defaults, name).resolve()]
    return f"`python benchmarks/make_report.py{''.join(options)}`" + ("" if options else " from `results/*.json`")


def main(argv=None):
    args = parse_args(argv)
    data = load(args.results)
    if not data:
        raise SystemExit(f"no benchmark JSON in {args.results}; run the benchmarks first")
    if args.blocks_only:
        names = update_blocks(blocks(data, args.output))
        print(f"filled {', '.join(f'{n} ({os.path.relpath(BLOCK_FILES[n], ROOT)})' for n in names) or 'no blocks'}")
        return
    figures = {}
    modules = {"step_latency": "step_latency", "decode_e2e": "decode_e2e", "overhead": "overhead",
               "cache_policies": "cache_policies"}
    for name, module in modules.items():
        if name in data:
            figures[name] = __import__(module).plot(data[name], args.figures)
            (args.figures / f"{name}.json").write_text(json.dumps(data[name], indent=1) + "\n")  # versioned with it
    if "gpu_check" in data:  # a table, no plot
        args.figures.mkdir(parents=True, exist_ok=True)
        (args.figures / "gpu_check.json").write_text(json.dumps(data["gpu_check"], indent=1) + "\n")
    args.output.write_text(render(data, figures, args.output, generated_by(args)))
    if args.blocks:
        update_blocks(blocks(data, args.output))
    print(f"wrote {args.output} and {sum(len(v) for v in figures.values())} figures in {args.figures}")


if __name__ == "__main__":
    main()
