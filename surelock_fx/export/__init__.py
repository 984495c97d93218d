"""Export the locked graph (docs/DESIGN.md §8): ``program`` (torch.export with named dynamic dims), ``onnx``
(an ONNX file, weights as external data) and ``tensorrt`` (TensorRT engines via torch-tensorrt).
``surelock_fx.backends`` runs what they write."""
from .onnx import ONNX_FILE, PACKED_ONNX_FILE, export_onnx
from .program import (
                      DIM_NAMES,
                      UNBOUNDED,
                      DimRange,
                      dynamic_shapes,
                      example_inputs,
                      example_sizes,
                      export_locked,
                      input_shapes,
                      locked_graph,
                      make_dims,
)
from .tensorrt import (
                      TENSORRT_FILE,
                      TensorRTUnavailableError,
                      export_tensorrt,
                      load_engines,
                      require_tensorrt,
                      tensorrt_input_specs,
                      tensorrt_ranges,
                      tensorrt_settings,
)

__all__ = [
    "DIM_NAMES",
    "ONNX_FILE",
    "PACKED_ONNX_FILE",
    "TENSORRT_FILE",
    "UNBOUNDED",
    "DimRange",
    "TensorRTUnavailableError",
    "dynamic_shapes",
    "example_inputs",
    "example_sizes",
    "export_locked",
    "export_onnx",
    "export_tensorrt",
    "input_shapes",
    "load_engines",
    "locked_graph",
    "make_dims",
    "require_tensorrt",
    "tensorrt_input_specs",
    "tensorrt_ranges",
    "tensorrt_settings",
]
