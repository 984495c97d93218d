"""``surelock_fx.optimize``: capture, rewrite and compile a model for locked decoding (docs/DESIGN.md §5, §8)."""
from __future__ import annotations

import time

import torch
from torch import fx

from .backends import Backend, TensorRT, get_backend
from .capture import capture
from .decoding import DecodeStats
from .lock import LockConfig, kl_divergence
from .models import from_remote_code, is_remote_code
from .passes.pipeline import LOCK, run_pipeline
from .runtime import PACK_FROM, LockedForms, LockedRunner, LockSchedule
from .signature import FlopModel, cache_specs, pack_index


class OptimizedModel(torch.nn.Module):
    """A model rewritten for locked decoding; pass it to ``surelock_fx.generate`` (a ``sampler.Decodable``).

    ``graph_module`` is the functional locked graph (docs/DESIGN.md §4), as export needs it; ``forms`` the
    backend's callables that run it (``runtime.LockedForms``: padded, packed, or both), which with the eager
    and inductor backends update the caches they are given in place and return them. Calling the model
    runs the padded form where there is one, else the packed one (its logits then [1, R, V], the real
    entries' in row-major order). ``flops`` counts a pass's GEMM FLOPs; ``kl`` is the lock rule's KL as the
    backend runs it.
    """

    def __init__(self, config, graph_module: fx.GraphModule, flops: FlopModel, backend: str, forms: LockedForms,
                 bucket: int = 1, kl=kl_divergence, compile_seconds: float = 0.0):
        super().__init__()
        self.config, self.graph_module, self.flops = config, graph_module, flops
        self.backend, self.forms, self.bucket, self.kl = backend, forms, bucket, kl
        self.compile_seconds = compile_seconds

    def forward(self, input_ids, position_ids, active_index, key_mask, *caches):
        if self.forms.padded is not None:
            return self.forms.padded(input_ids, position_ids, active_index, key_mask, *caches)
        packing = pack_index(active_index, input_ids.shape[1])
        return self.forms.packed(input_ids, position_ids, active_index, key_mask, *packing, *caches)

    def with_forms(self, forms: LockedForms) -> "OptimizedModel":
        """This model running other callables (e.g. instrumented ones) for its locked graph."""
        return OptimizedModel(self.config, self.graph_module, self.flops, self.backend, forms, self.bucket, self.kl,
                              self.compile_seconds)

    def decode_runner(self, lock: LockConfig | None, stats: DecodeStats, schedule: LockSchedule | None = None,
                      pack_from: float = PACK_FROM) -> LockedRunner:
        """The runner of one decode (``pack_from``: the padding share from which a step runs packed)."""
        return LockedRunner(self.forms, cache_specs(self.graph_module), self.config, self.flops, lock, stats,
                            self.bucket, kl=self.kl, pack_from=pack_from, schedule=schedule)


def optimize(model: torch.nn.Module, backend: str | Backend = "eager", bucket: int = 1, **options) -> OptimizedModel:
    """Capture ``model`` with torch.export, rewrite it to compute only active rows, and compile it.

    backend (a name, or a ``surelock_fx.backends`` object): "eager" runs the rewritten graph with its CPU
    linear weights prepacked once for oneDNN and its K/V caches updated in place; "inductor" compiles that
    with torch.compile (dynamic shapes, frozen weights, compiled on first use); "onnxruntime" exports the
    functional graph to ONNX and runs it in ONNX Runtime sessions (CUDA provider if available); "tensorrt"
    builds TensorRT engines (torch-tensorrt, CUDA). options: the backend's (``export_dir``, ``providers``
    and ``session_options`` for "onnxruntime"; ``export_dir``, ``engines``, the ranges of
    ``surelock_fx.export_tensorrt`` and lowering settings for "tensorrt"). bucket: active counts are
    padded up to a multiple of it (padding rows write to the scratch slot), for backends that compile one
    graph per shape; eager and inductor (dynamic M) need none, and the default 1 computes exactly the
    active rows. The model must take ``input_ids`` and ``position_ids`` and return logits (or an output
    with ``.logits``); its config must name a ``mask_token_id``. The official remote-code LLaDA and Dream models
    (``AutoModel.from_pretrained(path, trust_remote_code=True)``: ``LLaDAModelLM``, whose forward takes no
    position_ids, and ``DreamModel``) are first converted to ours (``models.from_remote_code``, sharing their
    weights); the OptimizedModel's config is then ours.
    """
    backend = get_backend(backend, **options)
    if not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket must be a positive integer, got {bucket!r}")
    backend.check()  # before the slow capture
    start = time.perf_counter()
    if is_remote_code(model):
        model = from_remote_code(model)
    dense = capture(model)
    locked = run_pipeline(dense, LOCK)
    forms = backend.forms(locked)
    return OptimizedModel(model.config, locked, FlopModel.from_graph(dense), backend.name, forms, bucket,
                          backend.lock_kl(), time.perf_counter() - start)


def load_tensorrt(path, model: torch.nn.Module, bucket: int = 1) -> OptimizedModel:
    """An OptimizedModel of ``model`` whose locked graph runs the TensorRT engines saved at ``path`` (by
    ``export_tensorrt``); the model supplies the config, the cache layout and the FLOP model."""
    return optimize(model, TensorRT(engines=path), bucket)
