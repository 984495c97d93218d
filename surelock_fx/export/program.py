"""torch.export of the locked graph with named dynamic dimensions (docs/DESIGN.md §8): the one export
that ONNX and TensorRT build on.

    batch   B   every input's dim 0
    seq     N   dim 1 of the token inputs and of ``key_mask``; the caches hold ``seq + 1`` slots
    active  M   dim 1 of ``active_index``, and of the logits
    rows    R   a packed graph's real rows (``packed_rows``; 1 to B x M)

The caches are explicit inputs and outputs (``k_cache_0, v_cache_0, ...`` in, ``k_cache_0_out, ...`` out),
so an exported program is a pure function of its inputs that the decode runtime
(``surelock_fx.runtime.LockedRunner``) drives step by step.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import fx
from torch.export import Dim

from ..signature import (
    ACTIVE_INDEX,
    KEY_MASK,
    PACKED_ROWS,
    UNPACK_INDEX,
    cache_specs,
    input_names,
    is_locked,
    is_packed,
    pack_index,
    token_input_names,
)

DIM_NAMES = ("batch", "seq", "active")
ROWS = "rows"  # a packed graph's real rows (passes.pack_rows)
EXAMPLE_SIZES = (2, 8, 3)  # preferred tracing sizes of batch, seq, active


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
    by_input = {name: {0: b, 1: n} for name in token_input_names(gm)}
    by_input[ACTIVE_INDEX] = {0: b, 1: m}
    by_input[KEY_MASK] = {0: b, 1: n}
    if is_packed(gm):
        by_input[PACKED_ROWS] = {0: dims[ROWS]}
        by_input[UNPACK_INDEX] = {0: b, 1: m}
    for spec in cache_specs(gm):
        by_input[spec.name] = {0: b, 2: None if n is None else n + 1}
    return {name: {d: v for d, v in axes.items() if v is not None} for name, axes in by_input.items()}


def input_shapes(gm: fx.GraphModule, batch: int, seq: int,
                 active: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every input of the locked graph at the given sizes."""
    shapes = {name: ((batch, seq), torch.long) for name in token_input_names(gm)}
    shapes[ACTIVE_INDEX] = ((batch, active), torch.long)
    shapes[KEY_MASK] = ((batch, seq), torch.bool)
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
    ``packed_rows`` and ``unpack_index`` of that index (``surelock_fx.signature.pack_index``)."""
    device = torch.device(device or graph_device(gm))
    index = example_index(batch, seq, active, device)
    special = {ACTIVE_INDEX: index, **dict(zip((PACKED_ROWS, UNPACK_INDEX), pack_index(index, seq)))}
    out = []
    for name, (shape, dtype) in input_shapes(gm, batch, seq, active).items():
        if name in special:
            t = special[name]
        elif name == KEY_MASK:
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


def graph_device(gm: fx.GraphModule) -> torch.device:
    """Where the graph's weights are (CPU for a graph without any)."""
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
