"""TensorRT engines of the locked graph (docs/DESIGN.md §8): torch-tensorrt's dynamo path on its torch.export
(``export.program``), min/opt/max ranges for the active, batch and sequence dims, saved with
``torch_tensorrt.save``. torch_tensorrt is imported only here, when used."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..signature import input_names
from .program import (
    DIM_NAMES,
    DimRange,
    dynamic_shapes,
    example_inputs,
    example_sizes,
    export_locked,
    graph_device,
    input_shapes,
    locked_graph,
    make_dims,
)

RANGE_OPTIONS = ("min_active", "opt_active", "max_active", "batch", "seq")
TENSORRT_FILE = "model.ep"


class TensorRTUnavailableError(RuntimeError):
    """torch-tensorrt or a CUDA GPU, needed for TensorRT engines, is missing."""


def require_tensorrt():
    """Import torch_tensorrt, or raise TensorRTUnavailableError naming everything missing."""
    missing = []
    try:
        trt = importlib.import_module("torch_tensorrt")
    except ImportError as err:
        trt = None
        missing.append(f"the torch-tensorrt package (pip install 'surelock_fx[tensorrt]'; import failed: {err})")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if missing:
        raise TensorRTUnavailableError("TensorRT export needs " + " and ".join(missing))
    return trt


def tensorrt_ranges(*, min_active=1, opt_active=None, max_active=None, batch=1,
                    seq=(2, 256, 2048)) -> dict[str, DimRange]:
    """The (min, opt, max) ranges of batch, seq and active that the engines are built for.

    ``batch`` and ``seq`` are an int (fixed) or a (min, opt, max) triple. ``max_active`` defaults
    to the largest sequence, ``opt_active`` to half the optimal sequence length (at least min).
    """
    b, n = DimRange.of(batch), DimRange.of(seq)
    if n.max is None or b.max is None:
        raise ValueError("TensorRT engines need a maximum batch size and sequence length")
    hi = n.max if max_active is None else max_active
    opt = max(min_active, min(hi, n.opt // 2)) if opt_active is None else opt_active
    m = DimRange(min_active, opt, hi)
    if m.max > n.max:
        raise ValueError(f"max_active ({m.max}) cannot exceed the longest sequence ({n.max})")
    return {"batch": b, "seq": n, "active": m}


def tensorrt_input_specs(optimized, ranges: dict[str, DimRange]) -> list[dict]:
    """Per input: name, dtype and min/opt/max shapes (the arguments of ``torch_tensorrt.Input``)."""
    gm = locked_graph(optimized)
    specs = {name: {"name": name} for name in input_names(gm)}
    for level in ("min", "opt", "max"):
        sizes = (getattr(ranges[k], level) for k in DIM_NAMES)
        for name, (shape, dtype) in input_shapes(gm, *sizes).items():
            specs[name].update({f"{level}_shape": shape, "dtype": dtype})
    return list(specs.values())


def tensorrt_settings(**overrides) -> dict:
    """Keyword arguments for ``torch_tensorrt.dynamo.compile``.

    use_explicit_typing: engines keep the model's dtypes (an fp16/bf16 model runs in fp16/bf16,
    float32 stays float32 and exact enough to compare tokens). min_block_size=1: convert even
    small subgraphs, so little falls back to PyTorch between engines. truncate_double: TensorRT
    has no float64. require_full_compilation stays False: an op without a converter runs in
    PyTorch instead of failing the build.
    """
    settings = dict(use_explicit_typing=True, min_block_size=1, truncate_double=True,
                    require_full_compilation=False, immutable_weights=True)
    settings.update(overrides)
    return settings


def build_tensorrt(optimized, ranges: dict[str, DimRange], **settings):
    """Compile the locked graph's export (``export_locked`` over ``ranges``) into TensorRT engines."""
    trt = require_tensorrt()
    gm = locked_graph(optimized)
    device = graph_device(gm)
    if device.type != "cuda":
        raise TensorRTUnavailableError(
            f"TensorRT export needs the model's weights on a CUDA device; they are on {device} "
            "(call model.cuda() first)"
        )
    program = export_locked(gm, device=device, **ranges)
    inputs = [trt.Input(**spec) for spec in tensorrt_input_specs(gm, ranges)]
    return trt.dynamo.compile(program, arg_inputs=inputs, **tensorrt_settings(**settings))


def save_tensorrt(module, optimized, ranges: dict[str, DimRange], path) -> Path:
    """``torch_tensorrt.save`` the compiled module as an ExportedProgram keeping the dynamic dims."""
    trt = require_tensorrt()
    gm = locked_graph(optimized)
    path = engine_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = example_sizes(*(ranges[k] for k in DIM_NAMES))
    shapes = dynamic_shapes(gm, make_dims(*(ranges[k] for k in DIM_NAMES)))
    trt.save(module, str(path), output_format="exported_program",
             arg_inputs=list(example_inputs(gm, *sizes, device=graph_device(gm))),
             dynamic_shapes=tuple(shapes[k] for k in input_names(gm)), retrace=True)
    return path


def export_tensorrt(optimized, path, *, min_active: int = 1, opt_active: int | None = None,
                    max_active: int | None = None, batch=1, seq=(2, 256, 2048), **settings) -> Path:
    """Build TensorRT engines for the locked graph and save them with ``torch_tensorrt.save``.

    The engines accept ``min_active <= M <= max_active`` active rows (tuned for ``opt_active``),
    ``batch`` and ``seq`` as an int or a (min, opt, max) triple. ``path``: a ``.ep`` file or a
    directory (then ``model.ep`` in it); returns the file written. ``settings`` override
    ``tensorrt_settings()``. Needs torch-tensorrt and the model on a CUDA GPU
    (TensorRTUnavailableError otherwise). Load with ``load_tensorrt(path, model)``.
    """
    ranges = tensorrt_ranges(min_active=min_active, opt_active=opt_active, max_active=max_active,
                             batch=batch, seq=seq)
    module = build_tensorrt(optimized, ranges, **settings)
    return save_tensorrt(module, optimized, ranges, path)


def engine_file(path) -> Path:
    """The engines' file: ``path`` if it is a ``.ep`` file, else ``model.ep`` in the directory ``path``."""
    path = Path(path)
    return path if path.suffix == ".ep" else path / TENSORRT_FILE


def load_engines(path):
    """The module of the engines ``export_tensorrt`` saved at ``path``, called like the locked graph."""
    program = require_tensorrt().load(str(engine_file(path)))
    return program.module() if hasattr(program, "module") else program
