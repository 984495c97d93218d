"""Shared helpers of the compiler-level benchmarks: models, timing, compile counting, machine info,
JSON and plots.

The benchmark scripts import this module as ``common`` (they put ``benchmarks/`` on ``sys.path``).
Every script writes one JSON file (``machine`` + ``settings`` + its results) and PNG plots into
its ``--out`` directory (default ``results/``); ``make_report.py`` turns the JSON into
``BENCHMARKS.md`` and ``benchmarks/figures/``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "results"
FIGURES = ROOT / "benchmarks" / "figures"

# LLaDA-shaped model presets (docs/DESIGN.md §3 architecture, random weights). ``bench`` is big enough that
# matrix products dominate a step on a CPU; ``e2e`` is 1/2 its width so that whole decodes fit in
# the time a CPU benchmark can take; ``small`` is for --quick; ``tiny`` for the unit tests.
PRESETS = {
    "bench": dict(d_model=1024, n_layers=8, n_heads=16, mlp_hidden_size=2816, vocab_size=32000),
    "e2e": dict(d_model=512, n_layers=8, n_heads=8, mlp_hidden_size=1408, vocab_size=32000),
    "small": dict(d_model=256, n_layers=4, n_heads=4, mlp_hidden_size=704, vocab_size=8000),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=96, vocab_size=101),
}


# ----------------------------------------------------------------------------------------------
# machine, settings, JSON
# ----------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(malloc: str = "defaults") -> dict:
    """What the numbers were measured on; ``malloc``: glibc's malloc settings (``setup``'s ``args.malloc``)."""
    return dict(
        malloc=malloc,
        cpu_model=cpu_model(),
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        platform=platform.platform(),
        cuda=torch.cuda.is_available(),
        git_commit=git_commit(),
        load_average_start=load_average(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def write_json(path: Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("machine", {})["load_average_end"] = load_average()
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    return path


def run_and_save(name: str, args, run, plot) -> tuple[dict, Path]:
    """Run a benchmark, write ``<out>/<name>.json`` and its plots; (result, JSON path)."""
    result = run(args)
    path = write_json(args.out / f"{name}.json", result)
    plot(result, args.out)
    return result, path


def readme_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_readme_block(path: Path, name: str, text: str) -> bool:
    """Replace what ``path`` holds between its ``readme_markers(name)`` with ``text``; False (and nothing
    written) if it has no such block."""
    readme = Path(path).read_text() if Path(path).exists() else ""
    begin, end = readme_markers(name)
    if begin not in readme or end not in readme:
        return False
    head, rest = readme.split(begin, 1)
    Path(path).write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")
    return True


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (torch.dtype, Path)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model and grid (finishes in about a minute)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON and PNG files")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine, OpenMP with as many threads as cores "
                         "stalls at every parallel region whenever another process holds a core)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    ap.add_argument("--malloc-defaults", action="store_true",
                    help="leave glibc's malloc at its defaults (by default the benchmark calls "
                         "surelock_fx.keep_freed_memory, as the surelock command does, so that no variant is charged "
                         "for page-faulting in fresh large tensors)")
    return ap


def fill_defaults(args, quick: dict, full: dict):
    """``args`` with the options left unset (None) taken from ``quick`` under ``--quick``, else from ``full``."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def setup(args) -> None:
    from surelock_fx import keep_freed_memory

    kept = not args.malloc_defaults and keep_freed_memory()
    args.malloc = "mmap/trim thresholds 2 GiB" if kept else "defaults"
    if args.threads:
        torch.set_num_threads(args.threads)
    # A benchmark sweeps many shapes; past dynamo's recompilation limit (8) a compiled function would
    # silently fall back to eager. Compilations are counted and reported instead.
    torch._dynamo.config.recompile_limit = 64
    torch.manual_seed(args.seed)
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr (``disable`` passes through)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------

def model_config(preset: str | dict, **overrides):
    """A LLaDAConfig from a preset name (``PRESETS``) or a dict of sizes; special ids at the top of the vocabulary."""
    from surelock_fx.models import LLaDAConfig

    sizes = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    sizes.update(overrides)
    V = sizes["vocab_size"]
    return LLaDAConfig(mask_token_id=V - 1, eos_token_id=V - 2, pad_token_id=V - 2, bos_token_id=V - 3,
                       eot_token_id=V - 4, rope_theta=10000.0, max_sequence_length=8192, **sizes)


def random_model(preset: str | dict, seed: int = 0, logit_scale: float = 3.0, **overrides):
    """A float32 LLaDAModel on ``model_config(preset, **overrides)`` with seeded random weights, in eval mode
    (``surelock_fx.models.random_llada``: built on the meta device, so the 166M-parameter ``bench`` model
    takes seconds)."""
    from surelock_fx.models import random_llada

    return random_llada(model_config(preset, **overrides), seed, logit_scale)


def describe_model(model) -> dict:
    cfg = model.config
    embedding = model.model.transformer.wte.weight
    return dict(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                mlp_hidden_size=cfg.mlp_hidden_size, vocab_size=cfg.vocab_size,
                parameters=sum(p.numel() for p in model.parameters()), dtype=str(cfg_dtype(model)),
                # what every forward pass reads whatever its row count: all weights but the embedding table,
                # of which it only gathers its rows
                streamed_weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()
                                          if p is not embedding))


def cfg_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def compiled_dense(model, backend: str):
    """The dense baseline of a backend: what ``surelock_fx.optimize`` runs, minus the locking rewrite.

    "eager" and "inductor": the captured graph compiled by the backend (``DenseGraph``: eager with its
    linear weights prepacked, inductor torch.compile of it with frozen weights); "onnxruntime": the plain
    model exported to ONNX in an ONNX Runtime session; "plain": the model itself in PyTorch eager, what a
    user runs without surelock_fx. Each is called as ``dense(input_ids) -> logits`` and has the model's
    ``config`` (``surelock_fx.generate`` decodes with it; without an attention mask).
    """
    if backend == "plain":
        return model
    if backend == "onnxruntime":
        return OrtDense(model)
    return DenseGraph(model, backend)


def gemm_chain(model, max_rows: int):
    """(``run(rows)``, FLOPs per row): the model's linear layers called one after another on
    ``rows`` rows of random input, through oneDNN on the prepacked weights of the eager dense pipeline
    (``passes.prepack_linear_weights``). ``run`` costs what the GEMMs of a pass cost alone, each
    weight read from memory once as in a pass: the bound a pass at that many rows cannot beat."""
    from surelock_fx.passes.prepack_linear_weights import PREPACKED_LINEAR

    gm = compiled_dense(model, "eager").graph
    nodes = [n for n in gm.graph.nodes if n.target is PREPACKED_LINEAR]
    if not nodes:
        raise RuntimeError("no prepacked linear layers: this build of torch has no oneDNN")
    layers = [(getattr(gm, n.args[1].target), None if n.args[2] is None else getattr(gm, n.args[2].target),
               int(n.args[0].meta["val"].shape[-1])) for n in nodes]
    dtype = cfg_dtype(model)
    inputs = {width: torch.randn(max_rows, width, dtype=dtype) for _, _, width in layers}

    def run(rows: int):
        for weight, bias, width in layers:
            PREPACKED_LINEAR(inputs[width][:rows], weight, bias, "none", [], "")

    return run, sum(2 * width * int(n.meta["val"].shape[-1]) for n, (_, _, width) in zip(nodes, layers))


class DenseGraph:
    """The captured dense graph compiled by an in-process backend, as it compiles the locked one
    (``surelock_fx.backends.get_backend(backend).compile``)."""

    def __init__(self, model, backend: str):
        from surelock_fx.backends import get_backend
        from surelock_fx.capture import capture

        self.config = model.config
        self.graph = get_backend(backend).compile(capture(model))

    def __call__(self, input_ids, attention_mask=None):
        check_no_mask(attention_mask)
        B, N = input_ids.shape
        return self.graph(input_ids, torch.arange(N).expand(B, N))


def check_no_mask(attention_mask) -> None:
    """The dense baselines take token ids and positions only."""
    if attention_mask is not None:
        raise ValueError("the dense baselines decode without an attention mask")


def ort_session_options():
    """ONNX Runtime session options with as many intra-op threads as torch uses (fair comparisons)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return options


def optimized(model, backend: str, **kwargs):
    """``surelock_fx.optimize(model, backend, **kwargs)``, ONNX Runtime's sessions with ``ort_session_options``."""
    import surelock_fx

    if backend == "onnxruntime":
        kwargs["session_options"] = ort_session_options()
    return surelock_fx.optimize(model, backend=backend, **kwargs)


class OrtDense:
    """The plain model exported to ONNX (dynamic batch and sequence) in an ONNX Runtime CPU session:
    ``dense(input_ids) -> logits``, zero-copy like the locked graph's ONNX Runtime backend."""

    def __init__(self, model):
        import tempfile

        import onnxruntime as ort

        from surelock_fx.backends.onnxruntime import run_bound
        from surelock_fx.capture import export_logits

        self._run = run_bound  # imported once, not on every timed call
        self._tmp = tempfile.TemporaryDirectory(prefix="surelock_dense_onnx_")
        path = Path(self._tmp.name) / "dense.onnx"
        onnx_program = torch.onnx.export(export_logits(model), (), dynamo=True,
                                         input_names=["input_ids", "position_ids"], output_names=["logits"],
                                         verbose=False)
        onnx_program.save(str(path), external_data=True)
        self.session = ort.InferenceSession(str(path), sess_options=ort_session_options(),
                                            providers=["CPUExecutionProvider"])
        self.config = model.config

    def __call__(self, input_ids, attention_mask=None):
        check_no_mask(attention_mask)
        B, N = input_ids.shape
        positions = torch.arange(N).expand(B, N).contiguous()
        logits = torch.empty(B, N, self.config.vocab_size)
        self._run(self.session, {"input_ids": input_ids.contiguous(), "position_ids": positions}, {"logits": logits})
        return logits


# ----------------------------------------------------------------------------------------------
# timing and compilation counting
# ----------------------------------------------------------------------------------------------

def time_calls(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict:
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times), reps=len(times))


class CompileCounter:
    """Counts what torch.compile did since it was created: graphs compiled (``unique_graphs``),
    recompilations and frames compiled, from the process-global ``torch._dynamo.utils.counters``."""

    def __init__(self):
        self.before = self._read()

    @staticmethod
    def _read() -> dict:
        from torch._dynamo.utils import counters

        return dict(graphs=counters["stats"]["unique_graphs"], recompiles=sum(counters["recompiles"].values()),
                    frames_ok=counters["frames"]["ok"])

    def delta(self) -> dict:
        now = self._read()
        return {k: now[k] - self.before[k] for k in now}


@contextlib.contextmanager
def count_compilations():
    """``with count_compilations() as c: ...`` fills ``c`` with the CompileCounter delta of the block."""
    counter = CompileCounter()
    out: dict = {}
    try:
        yield out
    finally:
        out.update(counter.delta())


# ----------------------------------------------------------------------------------------------
# efficiency and plots
# ----------------------------------------------------------------------------------------------

def efficiency(t_dense: float, t_locked: float, flops_dense: float, flops_locked: float) -> dict:
    """speedup = t_dense / t_locked; ideal = flops_dense / flops_locked; efficiency = speedup / ideal."""
    speedup = t_dense / t_locked
    ideal = flops_dense / flops_locked
    return dict(speedup=speedup, ideal_speedup=ideal, efficiency=speedup / ideal)


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save_figure(fig, out_dir: Path, name: str) -> Path:
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt().close(fig)
    return path


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
