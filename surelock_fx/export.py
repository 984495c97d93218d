"""Export the locked graph: torch.export with named dynamic dims, ONNX (+ ONNX Runtime), TensorRT.

Every path starts from ``export_locked``, the one function that torch.exports the locked graph
(``surelock_fx.passes.lock_rows``) with three named dynamic dimensions:

    batch   B   every input's dim 0
    seq     N   dim 1 of the token inputs and of ``key_mask``; the caches hold ``seq + 1`` slots
    active  M   dim 1 of ``active_index``, and of the logits

The caches are explicit inputs and outputs (``k_cache_0, v_cache_0, ...`` in,
``k_cache_0_out, ...`` out), so an exported program is a pure function of its inputs that the
decode runtime (``surelock_fx.runtime.LockedRunner``) drives step by step.

- ``export_onnx`` writes it as ONNX (weights as external data) with the dims named as above.
- ``OrtLockedGraph`` runs that file in ONNX Runtime with the locked graph's calling convention
  (torch tensors in and out, zero-copy through io_binding); ``optimize(model,
  backend="onnxruntime")`` uses it.
- ``export_tensorrt`` builds TensorRT engines with torch-tensorrt's dynamo path (min/opt/max
  ranges for M, B, N) and saves them with ``torch_tensorrt.save``; ``load_tensorrt`` and
  ``optimize(model, backend="tensorrt")`` run them. torch_tensorrt is imported only there.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import fx
from torch.export import Dim

from .lock import pack_index
from .passes import cache_specs, copy_graph_module, index_copy_cache_updates, is_locked, is_packed, pack_rows
from .passes.pack_rows import PACKED_ROWS, UNPACK_INDEX

DIM_NAMES = ("batch", "seq", "active")
ROWS = "rows"  # a packed graph's real rows (passes.pack_rows)
EXAMPLE_SIZES = (2, 8, 3)  # preferred tracing sizes of batch, seq, active
RANGE_OPTIONS = ("min_active", "opt_active", "max_active", "batch", "seq")
ONNX_FILE = "model.onnx"
PACKED_ONNX_FILE = "model.packed.onnx"
TENSORRT_FILE = "model.ep"
_ORT_TYPES = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool,
}


# --- the shared torch.export of the locked graph ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DimRange:
    """Sizes one dynamic dimension may take: ``min <= opt <= max`` (``max=None``: unbounded).

    ``opt`` is the size TensorRT tunes its kernels for; torch.export and ONNX use only min and max.
    """

    min: int
    opt: int
    max: int | None = None

    def __post_init__(self):
        if not 1 <= self.min <= self.opt or (self.max is not None and self.opt > self.max):
            raise ValueError(f"need 1 <= min <= opt <= max, got {self}")

    @classmethod
    def of(cls, value: "int | Sequence[int] | DimRange") -> "DimRange":
        """A range from an int (a fixed size), a (min, opt, max) triple, or a DimRange."""
        if isinstance(value, DimRange):
            return value
        if isinstance(value, int):
            return cls(value, value, value)
        lo, opt, hi = value
        return cls(int(lo), int(opt), None if hi is None else int(hi))

    @property
    def static(self) -> bool:
        return self.max == self.min

    def example(self, preferred: int) -> int:
        """A tracing size inside the range, >= 2 when the dim is dynamic (torch.export
        specializes example sizes 0 and 1)."""
        if self.static:
            return self.min
        hi = self.max if self.max is not None else max(preferred, self.min)
        return min(max(preferred, self.min, 2), hi)


# Ranges for a graph served at any size (ONNX, ONNX Runtime): B >= 1, N >= 2, M >= 1, unbounded.
UNBOUNDED = {"batch": DimRange(1, 2), "seq": DimRange(2, 8), "active": DimRange(1, 4)}


def locked_graph(optimized) -> fx.GraphModule:
    """The locked GraphModule of an OptimizedModel (or the locked GraphModule itself)."""
    gm = getattr(optimized, "graph_module", optimized)
    if not isinstance(gm, fx.GraphModule) or not is_locked(gm):
        raise TypeError(
            "expected an OptimizedModel (surelock_fx.optimize(model)) or a graph rewritten by "
            f"surelock_fx.passes.lock_rows, got {type(optimized).__name__}"
        )
    return gm


def input_names(gm: fx.GraphModule) -> list[str]:
    """The locked graph's inputs in order: token inputs, active_index, key_mask, caches."""
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def output_names(gm: fx.GraphModule) -> list[str]:
    return ["logits"] + [f"{spec.name}_out" for spec in cache_specs(gm)]


def _token_names(gm: fx.GraphModule) -> list[str]:
    names = input_names(gm)
    return names[: names.index("active_index")]


def make_dims(batch: DimRange, seq: DimRange, active: DimRange) -> dict[str, Dim | None]:
    """torch.export Dims named batch, seq, active (None for a range with min == max: static), and
    rows, the packed graph's real rows R (1 to B x M)."""
    dims = {}
    for name, r in zip(DIM_NAMES, (batch, seq, active)):
        dims[name] = None if r.static else Dim(name, min=r.min, **({} if r.max is None else {"max": r.max}))
    most = None if batch.max is None or active.max is None else batch.max * active.max
    dims[ROWS] = Dim(ROWS, min=1, **({} if most is None else {"max": most}))
    return dims


def dynamic_shapes(gm: fx.GraphModule, dims: dict[str, Dim | None]) -> dict[str, dict[int, Dim]]:
    """torch.export's ``dynamic_shapes`` of the locked graph, per input name (static dims left out)."""
    b, n, m = (dims[k] for k in DIM_NAMES)
    by_input = {name: {0: b, 1: n} for name in _token_names(gm)}
    by_input["active_index"] = {0: b, 1: m}
    by_input["key_mask"] = {0: b, 1: n}
    if is_packed(gm):
        by_input[PACKED_ROWS] = {0: dims[ROWS]}
        by_input[UNPACK_INDEX] = {0: b, 1: m}
    for spec in cache_specs(gm):
        by_input[spec.name] = {0: b, 2: None if n is None else n + 1}
    return {name: {d: v for d, v in axes.items() if v is not None} for name, axes in by_input.items()}


def input_shapes(gm: fx.GraphModule, batch: int, seq: int, active: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every input of the locked graph at the given sizes."""
    shapes = {name: ((batch, seq), torch.long) for name in _token_names(gm)}
    shapes["active_index"] = ((batch, active), torch.long)
    shapes["key_mask"] = ((batch, seq), torch.bool)
    if is_packed(gm):  # the real entries of example_inputs' active index
        packed_rows, unpack_index = pack_index(example_index(batch, seq, active), seq)
        shapes[PACKED_ROWS] = (tuple(packed_rows.shape), torch.long)
        shapes[UNPACK_INDEX] = (tuple(unpack_index.shape), torch.long)
    for s in cache_specs(gm):
        shapes[s.name] = ((batch, s.heads, seq + 1, s.head_dim), s.dtype)
    return shapes


def example_index(batch: int, seq: int, active: int, device=None) -> torch.Tensor:
    """An active index [batch, active]: the first ``active`` rows in batch row 0 and one fewer in the
    others (their last entry is padding: ``seq``, the scratch slot)."""
    index = torch.arange(active, device=device).expand(batch, active).clone()
    index[1:, active - 1] = seq
    return index


def example_inputs(gm: fx.GraphModule, batch: int, seq: int, active: int, device=None) -> tuple[torch.Tensor, ...]:
    """Inputs of the given sizes, laid out as the runtime lays them out: token ids 0, positions
    0..N-1, ``example_index``'s active index, all keys valid, zero caches; a packed graph's
    ``packed_rows`` and ``unpack_index`` of that index (``surelock_fx.lock.pack_index``)."""
    device = torch.device(device or _graph_device(gm))
    index = example_index(batch, seq, active, device)
    special = dict(zip((PACKED_ROWS, UNPACK_INDEX), pack_index(index, seq)), active_index=index)
    out = []
    for name, (shape, dtype) in input_shapes(gm, batch, seq, active).items():
        if name in special:
            t = special[name]
        elif name == "key_mask":
            t = torch.ones(shape, dtype=dtype, device=device)
        elif "position" in name:
            t = torch.arange(seq, device=device).expand(shape).contiguous()
        else:
            t = torch.zeros(shape, dtype=dtype, device=device)
        out.append(t)
    return tuple(out)


def example_sizes(batch: DimRange, seq: DimRange, active: DimRange) -> tuple[int, int, int]:
    """Tracing sizes (B, N, M) inside the ranges, with M <= N where the ranges allow it."""
    n = seq.example(max(EXAMPLE_SIZES[1], active.min))
    return batch.example(EXAMPLE_SIZES[0]), n, active.example(min(EXAMPLE_SIZES[2], n))


def _graph_device(gm: fx.GraphModule) -> torch.device:
    for tensor in list(gm.parameters()) + list(gm.buffers()):
        return tensor.device
    return torch.device("cpu")


def export_locked(optimized, *, batch=UNBOUNDED["batch"], seq=UNBOUNDED["seq"], active=UNBOUNDED["active"],
                  device=None) -> torch.export.ExportedProgram:
    """torch.export the locked graph with dynamic dims ``batch``, ``seq`` (caches: ``seq + 1``)
    and ``active`` over the given ranges (each an int, a (min, opt, max) triple or a DimRange;
    an int or min == max makes that dim static). The one export both ONNX and TensorRT build on.
    """
    gm = locked_graph(optimized)
    ranges = [DimRange.of(r) for r in (batch, seq, active)]
    b, n, m = example_sizes(*ranges)
    shapes = dynamic_shapes(gm, make_dims(*ranges))
    names = input_names(gm)
    args = example_inputs(gm, b, n, m, device)
    with torch.no_grad():
        return torch.export.export(gm, args, dynamic_shapes=tuple(shapes[k] for k in names), strict=False)


# --- ONNX and ONNX Runtime --------------------------------------------------------------------

def export_onnx(optimized, path, *, packed: bool = False, opset_version: int | None = None,
                optimize: bool = True) -> Path:
    """Write the locked graph as ONNX; return the .onnx file's path.

    ``path`` is a ``.onnx`` file or a directory (then ``model.onnx`` in it, ``model.packed.onnx`` if
    ``packed``). The weights go to external data next to it (``<file>.data``), so models over 2 GB
    export too. Inputs:
    the token inputs ``[batch, seq]``, ``active_index [batch, active]`` (padding rows hold ``seq``,
    the scratch slot), ``key_mask [batch, seq]`` and the caches ``[batch, H, seq + 1, D]``;
    outputs: ``logits [batch, active, V]`` and the updated caches (``<cache>_out``). The cache rows are
    written as whole rows (``passes.index_copy_cache_updates``: ScatterND, not ScatterElements).

    ``packed``: the graph's row-wise ops run on the real rows only (``passes.pack_rows``), for batches
    whose rows have different active counts. Two inputs follow ``key_mask``: ``packed_rows [rows]``
    and ``unpack_index [batch, active]`` (``surelock_fx.lock.pack_index`` of ``active_index``), and the
    logits are ``[1, rows, V]``, the real entries' in row-major order.
    """
    gm = copy_graph_module(locked_graph(optimized))
    if packed:
        gm = pack_rows(gm)
    path = Path(path)
    if path.suffix != ".onnx":
        path = path / (PACKED_ONNX_FILE if packed else ONNX_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_locked(index_copy_cache_updates(gm))
    kwargs = {} if opset_version is None else {"opset_version": opset_version}
    onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=input_names(gm),
                                     output_names=output_names(gm), optimize=optimize, verbose=False, **kwargs)
    onnx_program.rename_axes(_onnx_axis_names(onnx_program.model.graph.inputs))
    onnx_program.save(str(path), external_data=True)
    return path


def _onnx_axis_names(inputs) -> dict:
    """The exporter's symbol names (s0, s1, ...) -> batch, seq, active, rows; ``s1 + 1`` follows."""
    by_name = {value.name: value.shape for value in inputs}
    mapping = {}
    for name, dim, axis in (("key_mask", 0, "batch"), ("key_mask", 1, "seq"), ("active_index", 1, "active"),
                            (PACKED_ROWS, 0, ROWS)):
        if name not in by_name:
            continue
        symbol = by_name[name][dim]
        if not isinstance(symbol, int) and getattr(symbol, "value", None) is not None:
            mapping[symbol.value] = axis
    return mapping


class OrtLockedGraph(torch.nn.Module):
    """An exported locked graph in an ONNX Runtime session, called like the GraphModule.

    ``graph(*inputs) -> (logits, *caches)`` with torch tensors in and out. Inputs are bound
    zero-copy (io_binding on the tensors' memory) and outputs are written by ONNX Runtime
    straight into freshly allocated torch tensors, so the caches never pass through numpy.
    CUDA tensors are bound on the GPU when the session has the CUDA provider (else they are
    copied to the CPU and the outputs back).
    """

    def __init__(self, path, providers: Sequence[str] | None = None, session_options=None):
        import onnxruntime as ort

        super().__init__()
        self.path = Path(path)
        if providers is None:
            providers = default_providers()
        self.session = ort.InferenceSession(str(self.path), sess_options=session_options, providers=list(providers))
        self.inputs = [i.name for i in self.session.get_inputs()]
        outputs = self.session.get_outputs()
        self.outputs = [o.name for o in outputs]
        self.logits_dtype = _ORT_TYPES[outputs[0].type]
        self.vocab = outputs[0].shape[-1]
        if not isinstance(self.vocab, int):
            raise ValueError(f"{self.path}: the logits' last dim must be static, got {self.vocab!r}")
        self.on_gpu = "CUDAExecutionProvider" in self.session.get_providers()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.inputs):
            raise TypeError(f"expected {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {len(inputs)}")
        index = inputs[self.inputs.index("active_index")]
        device = index.device if (index.device.type == "cpu" or self.on_gpu) else torch.device("cpu")
        inputs = tuple(t.to(device).contiguous() for t in inputs)  # kept alive until run returns
        caches = inputs[len(inputs) - (len(self.outputs) - 1):]
        rows = (1, len(inputs[self.inputs.index(PACKED_ROWS)])) if PACKED_ROWS in self.inputs else index.shape
        outputs = (torch.empty(*rows, self.vocab, dtype=self.logits_dtype, device=device),
                   *(torch.empty_like(c) for c in caches))
        run_bound(self.session, dict(zip(self.inputs, inputs)), dict(zip(self.outputs, outputs)))
        return tuple(t.to(index.device) for t in outputs)  # no copy unless the session ran elsewhere


def run_bound(session, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
    """Run an ONNX Runtime session on contiguous torch tensors, zero-copy: the inputs are bound in
    place and the session writes into the preallocated ``outputs`` (all on one device)."""
    device = next(iter(outputs.values())).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # ONNX Runtime reads the inputs on its own stream
    binding = session.io_binding()
    for name, tensor in inputs.items():
        binding.bind_input(name, device.type, device.index or 0, _numpy_dtype(tensor.dtype),
                           tuple(tensor.shape), tensor.data_ptr())
    for name, tensor in outputs.items():
        binding.bind_output(name, device.type, device.index or 0, _numpy_dtype(tensor.dtype),
                            tuple(tensor.shape), tensor.data_ptr())
    session.run_with_iobinding(binding)
    if device.type == "cuda":
        binding.synchronize_outputs()


def _numpy_dtype(dtype: torch.dtype):
    import numpy as np

    try:
        return {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
                torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}[dtype]
    except KeyError:
        raise TypeError(f"the ONNX Runtime backend has no binding for {dtype}; use a float32 or float16 model") from None


def default_providers() -> list[str]:
    """CUDA (then CPU) when both onnxruntime and torch see a GPU, else CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnxruntime_graph(optimized, export_dir=None, providers=None, session_options=None,
                      packed: bool = False) -> OrtLockedGraph:
    """Export to ``export_dir`` (a temporary directory when None, removed with the graph; ``packed``:
    see ``export_onnx``) and open an ONNX Runtime session on it (``session_options``: an
    ``onnxruntime.SessionOptions``)."""
    tmp = None
    if export_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="surelock_onnx_")
        export_dir = tmp.name
    graph = OrtLockedGraph(export_onnx(optimized, export_dir, packed=packed), providers=providers,
                           session_options=session_options)
    graph._tmpdir = tmp  # the session has loaded the file; the directory lives as long as the graph
    return graph


# --- TensorRT ---------------------------------------------------------------------------------

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


def tensorrt_ranges(*, min_active=1, opt_active=None, max_active=None, batch=1, seq=(2, 256, 2048)) -> dict[str, DimRange]:
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
    device = _graph_device(gm)
    if device.type != "cuda":
        raise TensorRTUnavailableError(
            f"TensorRT export needs the model's weights on a CUDA device; they are on {device} (call model.cuda() first)"
        )
    program = export_locked(gm, device=device, **ranges)
    inputs = [trt.Input(**spec) for spec in tensorrt_input_specs(gm, ranges)]
    return trt.dynamo.compile(program, arg_inputs=inputs, **tensorrt_settings(**settings))


def save_tensorrt(module, optimized, ranges: dict[str, DimRange], path) -> Path:
    """``torch_tensorrt.save`` the compiled module as an ExportedProgram keeping the dynamic dims."""
    trt = require_tensorrt()
    gm = locked_graph(optimized)
    path = Path(path)
    path = path if path.suffix == ".ep" else path / TENSORRT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = example_sizes(*(ranges[k] for k in DIM_NAMES))
    shapes = dynamic_shapes(gm, make_dims(*(ranges[k] for k in DIM_NAMES)))
    trt.save(module, str(path), output_format="exported_program",
             arg_inputs=list(example_inputs(gm, *sizes, device=_graph_device(gm))),
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


def tensorrt_graph(optimized, export_dir=None, **options):
    """TensorRT engines for ``optimize(..., backend="tensorrt")``: built now, and saved when
    ``export_dir`` is given. ``options``: the ranges of ``export_tensorrt`` and lowering settings."""
    ranges = tensorrt_ranges(**{k: options.pop(k) for k in RANGE_OPTIONS if k in options})
    module = build_tensorrt(optimized, ranges, **options)
    if export_dir is not None:
        save_tensorrt(module, optimized, ranges, export_dir)
    return module


def load_tensorrt(path, model: torch.nn.Module, bucket: int = 1):
    """An OptimizedModel of ``model`` whose locked graph runs the TensorRT engines saved at ``path``
    (by ``export_tensorrt``); the model supplies the config, the cache layout and the FLOP model."""
    trt = require_tensorrt()
    from .optimize import check_arguments, rewrite

    check_arguments("tensorrt", bucket)
    path = Path(path)
    path = path if path.suffix == ".ep" else path / TENSORRT_FILE
    optimized = rewrite(model, "tensorrt", bucket)
    program = trt.load(str(path))
    optimized.compiled = program.module() if hasattr(program, "module") else program
    return optimized


def check_backend(backend: str, export_dir, options: dict) -> None:
    """Reject options that ``optimize`` cannot use, and a missing TensorRT, before any work is done."""
    if backend not in ("onnxruntime", "tensorrt"):
        if export_dir is not None or options:
            raise ValueError(f"export_dir and backend options apply to the onnxruntime and tensorrt backends, "
                             f"not backend {backend!r}")
        return
    allowed = {"onnxruntime": {"providers", "session_options"}}.get(backend)
    if allowed is not None and set(options) - allowed:
        raise ValueError(f"unknown option(s) {sorted(set(options) - allowed)} for backend {backend!r}; "
                         f"it takes {sorted(allowed)}")
    if backend == "tensorrt":
        require_tensorrt()


class BuiltOnFirstCall:
    """A graph that ``build()`` makes when it is first called (a form a decode may never run)."""

    def __init__(self, build):
        self.build, self.graph = build, None

    def __call__(self, *inputs):
        if self.graph is None:
            self.graph = self.build()
        return self.graph(*inputs)


def backend_graphs(optimized, backend: str, export_dir=None, **options):
    """The callables ``optimize`` runs for an export backend: (padded graph, packed graph or None).
    ONNX Runtime's packed graph (``export_onnx(packed=True)``) is exported and loaded on its first call."""
    if backend == "onnxruntime":
        packed = BuiltOnFirstCall(lambda: onnxruntime_graph(optimized, export_dir, packed=True, **options))
        return onnxruntime_graph(optimized, export_dir, **options), packed
    if backend == "tensorrt":
        return tensorrt_graph(optimized, export_dir, **options), None
    raise ValueError(f"not an export backend: {backend!r}")


# --- the ``surelock export`` subcommand (registered in surelock_fx/cli.py) ----------------------

def _range_arg(text: str):
    """``N`` (fixed) or ``MIN,OPT,MAX``."""
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected N or MIN,OPT,MAX (integers), got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``surelock export``."""
    from .cli import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--format", required=True, choices=("onnx", "tensorrt"), help="what to write")
    parser.add_argument("--out", required=True, type=Path,
                        help="output: a .onnx/.ep file, or a directory (model.onnx / model.ep in it)")
    parser.add_argument("--packed", action="store_true",
                        help="onnx: the packed form, which computes the real rows only (inputs packed_rows and "
                             "unpack_index; model.packed.onnx in a directory)")
    trt = parser.add_argument_group("TensorRT engine shapes (--format tensorrt)")
    trt.add_argument("--min-active", type=int, default=1, help="fewest active rows M (default: 1)")
    trt.add_argument("--opt-active", type=int, default=None, help="M the kernels are tuned for (default: opt seq / 2)")
    trt.add_argument("--max-active", type=int, default=None,
                     help="most active rows M (default: max seq; the first step has every row active, M = N)")
    trt.add_argument("--batch", type=_range_arg, default=1, help="batch size: N or MIN,OPT,MAX (default: 1)")
    trt.add_argument("--seq", type=_range_arg, default=(2, 256, 2048),
                     help="sequence length (prompt + generation): N or MIN,OPT,MAX (default: 2,256,2048)")


def run_cli(args: argparse.Namespace) -> int:
    """Load the checkpoint, rewrite it for locked decoding, write ONNX or TensorRT engines."""
    from .cli import DTYPES, CLIError, resolve_device
    from .models import load_model
    from .optimize import optimize

    device = resolve_device(args.device)
    shapes = dict(min_active=args.min_active, opt_active=args.opt_active, max_active=args.max_active,
                  batch=args.batch, seq=args.seq)
    if args.packed and args.format != "onnx":
        raise CLIError("--packed applies to --format onnx only; the TensorRT engines are padded")
    if args.format == "tensorrt":  # fail before loading the weights: what is missing, bad shapes
        try:
            require_tensorrt()
        except TensorRTUnavailableError as err:
            raise CLIError(str(err)) from None
        tensorrt_ranges(**shapes)
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=device)
    optimized = optimize(model)
    if args.format == "onnx":
        path = export_onnx(optimized, args.out, packed=args.packed)
    else:
        path = export_tensorrt(optimized, args.out, **shapes)
    print(path)
    return 0
