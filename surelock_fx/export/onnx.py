"""The locked graph as an ONNX file (docs/DESIGN.md §8), from its torch.export (``export.program``)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..passes.pipeline import export_form
from ..signature import ACTIVE_INDEX, KEY_MASK, PACKED_ROWS, input_names, output_names
from .program import ROWS, export_locked, locked_graph

ONNX_FILE = "model.onnx"
PACKED_ONNX_FILE = "model.packed.onnx"


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
    and ``unpack_index [batch, active]`` (``surelock_fx.signature.pack_index`` of ``active_index``), and the
    logits are ``[1, rows, V]``, the real entries' in row-major order.
    """
    gm = export_form(locked_graph(optimized), packed)
    path = Path(path)
    if path.suffix != ".onnx":
        path = path / (PACKED_ONNX_FILE if packed else ONNX_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_locked(gm)
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
    for name, dim, axis in ((KEY_MASK, 0, "batch"), (KEY_MASK, 1, "seq"), (ACTIVE_INDEX, 1, "active"),
                            (PACKED_ROWS, 0, ROWS)):
        if name not in by_name:
            continue
        symbol = by_name[name][dim]
        if not isinstance(symbol, int) and getattr(symbol, "value", None) is not None:
            mapping[symbol.value] = axis
    return mapping
