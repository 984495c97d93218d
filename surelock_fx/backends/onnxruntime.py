"""The onnxruntime backend: the locked graph exported to ONNX (``export.onnx``) and run in ONNX Runtime
sessions, torch tensors bound zero-copy through io_binding."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx

from ..export.onnx import export_onnx
from ..runtime import LockedForms
from ..signature import ACTIVE_INDEX, PACKED_ROWS
from .base import Backend, BuiltOnFirstCall

_ORT_TYPES = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool,
}


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
        index = inputs[self.inputs.index(ACTIVE_INDEX)]
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
        message = f"the ONNX Runtime backend has no binding for {dtype}; use a float32 or float16 model"
        raise TypeError(message) from None


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


@dataclasses.dataclass(frozen=True)
class OnnxRuntime(Backend):
    """Both forms: the padded one exported and loaded by ``optimize``; the packed one on the first step
    that runs it, into a second session holding a second copy of the weights. ``export_dir``: where the
    ONNX files go (default: a temporary directory, removed with the graphs); ``providers`` (default:
    ``default_providers()``) and ``session_options`` (an ``onnxruntime.SessionOptions``) of the sessions."""

    name = "onnxruntime"
    padded = True
    packed = True
    export_dir: str | Path | None = None
    providers: Sequence[str] | None = None
    session_options: Any = None

    def check(self) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as err:
            raise ValueError(f"the onnxruntime backend needs onnxruntime (pip install 'surelock_fx[onnx]'): "
                             f"{err}") from None

    def forms(self, locked: fx.GraphModule) -> LockedForms:
        options = dict(export_dir=self.export_dir, providers=self.providers, session_options=self.session_options)
        return LockedForms(onnxruntime_graph(locked, **options),
                           BuiltOnFirstCall(lambda: onnxruntime_graph(locked, packed=True, **options)))
