"""``surelock_fx.optimize``: capture, rewrite and compile a model for locked decoding."""
from __future__ import annotations

import time

import torch
from torch import fx
from torch._inductor import config as inductor_config
from torch.fx.experimental import _config as fx_config

from .capture import capture
from .export import backend_graphs, check_backend
from .lock import LockConfig, kl_divergence, pack_index
from .passes import (cache_specs, copy_graph_module, index_copy_cache_updates, lock_rows, pack_rows, prepack_linear_weights,
                     realize_reused_trig, update_caches_in_place)
from .runtime import FlopModel, LockedRunner
from .sampler import DecodeStats

BACKENDS = ("eager", "inductor", "onnxruntime", "tensorrt")
EXPORT_BACKENDS = ("onnxruntime", "tensorrt")  # run an exported graph (surelock_fx.export)
# The forms of the locked graph each backend runs: (padded: B x M rows, packed: the real rows only,
# passes.pack_rows); with both, a step runs the packed one where padding pays (runtime.runs_packed,
# PACK_FROM). Where nothing is padded, packing costs eager 0.7% of a step (one step, e2e model, CPU,
# B = 8, 40 active rows each), inductor's generated gathers and index checks around attention 2%, and
# ONNX Runtime's gathers 1.4%, which would be every step at B = 1 and many at B > 1 (padding is 0-10%
# of the rows of a replayed decode, benchmarks/decode_e2e.py). The TensorRT engines are padded only.
FORMS = {"eager": (False, True), "inductor": (True, True), "onnxruntime": (True, True), "tensorrt": (True, False)}


class FrozenInductor:
    """``torch.compile(fn, dynamic=True)`` whose compilations freeze the weights (if any) into the graph as
    constants, which lets inductor pack them for oneDNN (its CPU weight-packing pass picks oneDNN's
    packed GEMM for a dynamic row count). Dynamo reads inductor's ``freezing`` flag when it traces,
    and any call with new shapes may trace, so the flag is set around every call, not globally; and
    inductor freezes only what it compiles without autograd, so every call runs under no_grad (the
    locked graph is for inference only). Duck sizing is off while tracing: a decode's first pass has
    as many active rows as positions (M = N), and a graph traced with them sized as one symbol would be
    compiled again, for M < N, on the next step."""

    def __init__(self, fn):
        self.compiled = torch.compile(fn, dynamic=True)

    def __call__(self, *args, **kwargs):
        with inductor_config.patch(freezing=True), fx_config.patch(use_duck_shape=False), torch.no_grad():
            return self.compiled(*args, **kwargs)


def compile_graph(gm: fx.GraphModule, backend: str, packed: bool = False):
    """The callable that runs ``gm`` for an in-process backend, on a copy of it that shares its weights
    (``gm`` stays functional, for export): K/V caches updated in place (passes.update_caches_in_place),
    if ``packed`` the active rows packed across the batch (passes.pack_rows), the cache rows written by
    index_copy_ (passes.index_copy_cache_updates); then for "eager" the CPU linear weights packed once
    (passes.prepack_linear_weights), for "inductor" its rotary tables computed once a pass
    (passes.realize_reused_trig) and torch.compile (dynamic shapes, compiled on first call, frozen
    weights: later changes to the model's weights are not seen)."""
    if backend not in FORMS or backend in EXPORT_BACKENDS:
        raise ValueError(f"not an in-process backend: {backend!r}")
    runnable = update_caches_in_place(copy_graph_module(gm))
    if packed:
        runnable = pack_rows(runnable)
    runnable = index_copy_cache_updates(runnable)
    if backend == "inductor":
        return FrozenInductor(realize_reused_trig(runnable))
    return prepack_linear_weights(runnable)


class OptimizedModel(torch.nn.Module):
    """A model rewritten for locked decoding; pass it to ``surelock_fx.generate``.

    ``graph_module`` is the locked graph (inputs: the token inputs, ``active_index``,
    ``key_mask``, the caches; outputs: logits of the active rows, the updated caches), functional
    as export needs it. Calling the model runs the compiled form, which with the eager and inductor
    backends updates the caches it is given in place and returns them; with the eager backend
    (``packed``; passes.pack_rows) it computes only the real entries of ``active_index`` (< N), and
    its logits are [1, R, V], the real entries' in row-major order. The inductor and onnxruntime
    backends also hold that packed form (``compiled_packed``), which their decodes run on steps with
    enough padding (``runtime.PACK_FROM``); it is compiled (exported and loaded) on the first such
    step, with its own copy of the weights (none at B = 1, where with ``bucket`` 1 no step is padded).
    """

    def __init__(self, model: torch.nn.Module, locked: fx.GraphModule, dense: fx.GraphModule,
                 backend: str, bucket: int, compile_seconds: float):
        super().__init__()
        self.config = model.config
        self.graph_module = locked
        self.flops = FlopModel.from_graph(dense)
        self.backend = backend
        self.bucket = bucket
        self.compile_seconds = compile_seconds
        padded, packed = FORMS[backend]
        if backend in EXPORT_BACKENDS:  # exported by optimize(), once the model is built
            self.compiled, self.compiled_packed = locked, None
        else:
            self.compiled = compile_graph(locked, backend, packed=not padded)
            self.compiled_packed = compile_graph(locked, backend, packed=True) if padded and packed else None
        # The lock rule's full-vocabulary KL (a softmax and three reductions per candidate row):
        # inductor fuses them into one kernel.
        self.kl = FrozenInductor(kl_divergence) if backend == "inductor" else kl_divergence

    @property
    def packed(self) -> bool:
        """Whether the backend runs the packed form only: ``compiled`` takes ``pack_index``'s inputs."""
        return not FORMS[self.backend][0]

    def forward(self, input_ids, position_ids, active_index, key_mask, *caches):
        packing = pack_index(active_index, input_ids.shape[1]) if self.packed else ()
        return self.compiled(input_ids, position_ids, active_index, key_mask, *packing, *caches)

    def decode_runner(self, lock: LockConfig | None, stats: DecodeStats) -> LockedRunner:
        graph, packed_graph = (None, self.compiled) if self.packed else (self.compiled, self.compiled_packed)
        return LockedRunner(graph, cache_specs(self.graph_module), self.config, self.flops, lock, stats,
                            self.bucket, kl=self.kl, packed_graph=packed_graph)


def optimize(model: torch.nn.Module, backend: str = "eager", bucket: int = 1, export_dir=None,
             **backend_options) -> OptimizedModel:
    """Capture ``model`` with torch.export, rewrite it to compute only active rows, and compile it.

    backend: "eager" runs the rewritten graph with its CPU linear weights packed once for oneDNN and
    its K/V caches updated in place (``compile_graph``); "inductor" compiles that with torch.compile
    (dynamic shapes, frozen weights, compiled on first use); "onnxruntime" exports the functional
    graph to ONNX (into ``export_dir``, else a temporary directory) and runs it in ONNX Runtime
    sessions (CUDA provider if available); "tensorrt" builds TensorRT engines (torch-tensorrt,
    CUDA; saved to ``export_dir`` if given).
    backend_options: for "tensorrt" the ranges and settings of ``surelock_fx.export_tensorrt``,
    for "onnxruntime" ``providers`` and ``session_options``. bucket: active counts are padded up to
    a multiple of it (padding rows write to the scratch slot), for backends that compile one graph
    per shape; eager and inductor (dynamic M) need none, and the default 1 computes exactly the
    active rows.
    The model must take ``input_ids`` and ``position_ids`` and return logits (or an output with
    ``.logits``); its config must name a ``mask_token_id``.
    """
    check_arguments(backend, bucket)
    check_backend(backend, export_dir, backend_options)  # before the slow capture
    start = time.perf_counter()
    optimized = rewrite(model, backend, bucket)
    if backend in EXPORT_BACKENDS:
        optimized.compiled, optimized.compiled_packed = backend_graphs(optimized, backend, export_dir, **backend_options)
        optimized.compile_seconds = time.perf_counter() - start
    return optimized


def check_arguments(backend: str, bucket: int) -> None:
    """Reject an unknown backend, or a bucket that is not a positive integer."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket must be a positive integer, got {bucket!r}")


def rewrite(model: torch.nn.Module, backend: str, bucket: int) -> OptimizedModel:
    """``model`` captured and rewritten for ``backend`` (arguments checked by ``check_arguments``), compiled
    for an in-process one; for an export backend ``compiled`` is the functional locked graph, for the
    caller to replace with the exported graphs (``optimize``, ``export.load_tensorrt``)."""
    start = time.perf_counter()
    dense = capture(model)
    return OptimizedModel(model, lock_rows(dense), dense, backend, bucket, time.perf_counter() - start)
