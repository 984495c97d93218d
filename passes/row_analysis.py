"""Row-locality analysis: which tensors carry the sequence axis, and is every op row-wise?

A transformer computes each token's row independently except where attention mixes keys and
values across positions. In a graph captured with a symbolic sequence length N, the sequence
axes of a tensor are the dims whose size involves N. An op is row-wise when it neither reduces,
contracts, slices nor reorders along such an axis; ``check_row_wise`` proves that for every node
from a whitelist of op semantics and names the first node it cannot prove.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from surelock_fx.signature import SDPA

aten = torch.ops.aten
MAX_INDEX = 2**62

# Ops that move or copy elements without mixing rows: a row stays a row wherever it lands.
LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.clone.default,
    aten.contiguous.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout,
    aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default, aten.type_as.default,
}
# Ops whose listed dim arguments must not be a sequence axis: (target, index of the dim argument).
DIM_OPS = {
    aten.mean.dim: 1, aten.sum.dim_IntList: 1, aten.amax.default: 1, aten.amin.default: 1,
    aten._softmax.default: 1, aten._log_softmax.default: 1, aten.softmax.int: 1,
    aten.log_softmax.int: 1, aten.var.correction: 1, aten.var_mean.correction: 1,
    aten.split.Tensor: 2, aten.split_with_sizes.default: 2, aten.chunk.default: 2,
    aten.cat.default: 1, aten.argmax.default: 1, aten.cumsum.default: 1, aten.unbind.int: 1,
}
# Normalizations over trailing dims (normalized_shape, the argument at index 1): row-wise unless a sequence
# axis is among them.
TRAILING_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
# Reductions of a whole tensor to a scalar: over every position at once.
FULL_REDUCTIONS = {aten.max.default, aten.min.default, aten.sum.default, aten.mean.default, aten.amax.default,
                   aten.any.default, aten.all.default}
BOOKKEEPING = {
    aten.sym_size.int, aten._assert_tensor_metadata.default, aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default, operator.getitem,
}


class UnsupportedGraphError(ValueError):
    """The graph holds a node the locking rewrite cannot prove row-wise."""

    def __init__(self, node: fx.Node, why: str):
        super().__init__(f"cannot lock rows at node '{node.name}' ({_target_name(node)}): {why}")
        self.node = node


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def sequence_symbol(gm: fx.GraphModule):
    """The sympy symbol of the sequence length: dim 1 of the first token-indexed placeholder."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() >= 2 and isinstance(val.shape[1], torch.SymInt):
                return val.shape[1].node.expr
    raise UnsupportedGraphError(
        next(iter(gm.graph.nodes)),
        "no placeholder has a symbolic sequence dimension; capture the model with a dynamic sequence "
        "length (surelock_fx.capture)",
    )


def row_dims(value, seq) -> tuple[int, ...]:
    """Dims of a (fake) tensor whose size involves the sequence symbol."""
    if not isinstance(value, torch.Tensor):
        return ()
    return tuple(
        i for i, s in enumerate(value.shape) if isinstance(s, torch.SymInt) and seq in s.node.expr.free_symbols
    )


def token_inputs(gm: fx.GraphModule, seq) -> list[fx.Node]:
    """Placeholders indexed by token position (a sequence axis at dim 1)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        dims = row_dims(node.meta.get("val"), seq)
        if dims and dims != (1,):
            raise UnsupportedGraphError(node, f"input has its sequence axis at dims {dims}; expected [batch, seq, ...]")
        if dims:
            found.append(node)
    return found


def _dims(arg, ndim: int) -> list[int]:
    dims = arg if isinstance(arg, (list, tuple)) else [arg]
    return [d % ndim for d in dims]


def _val(arg):
    return arg.meta.get("val") if isinstance(arg, fx.Node) else None


def _check_sdpa(node: fx.Node, seq) -> None:
    q, k, v = node.args[:3]
    for name, arg in (("query", q), ("key", k), ("value", v)):
        val = _val(arg)
        if row_dims(val, seq) != (val.dim() - 2,):
            raise UnsupportedGraphError(node, f"{name} must be [..., seq, head_dim] with one sequence axis")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if mask is not None:
        raise UnsupportedGraphError(
            node, "attention has a mask that is not a plain key-padding mask; run detach_full_attention_masks first"
        )
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    if causal:
        raise UnsupportedGraphError(node, "attention is causal; SureLock needs bidirectional attention")


def _check_node(node: fx.Node, seq) -> None:
    target = node.target
    if target in BOOKKEEPING:
        return
    if target is SDPA:
        return _check_sdpa(node, seq)
    inputs = [a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)]
    in_rows = {a: row_dims(_val(a), seq) for a in inputs}
    out_rows = row_dims(_val(node), seq) if isinstance(_val(node), torch.Tensor) else ()
    if not any(in_rows.values()):
        if out_rows:
            raise UnsupportedGraphError(
                node,
                "it creates a tensor with a sequence axis that is not derived from the token inputs "
                "(positions or masks computed inside the model?); pass them as inputs (position_ids) instead",
            )
        return
    if target in LAYOUT_OPS or torch.Tag.pointwise in getattr(target, "tags", ()):
        return
    first = inputs[0]
    rows = in_rows[first]
    ndim = _val(first).dim()
    if target in TRAILING_NORMS:
        if min(rows) >= ndim - len(node.args[1]):
            raise UnsupportedGraphError(node, "it normalizes over the sequence axis")
        return
    if target in FULL_REDUCTIONS and len(node.args) == 1:
        raise UnsupportedGraphError(node, "it reduces over every position at once (as a rotary embedding that "
                                    "picks its scaling from the longest position does: Phi-3's LongRoPE, dynamic "
                                    "RoPE); use a model whose computation of a row does not depend on the others")
    if target in DIM_OPS:
        index = DIM_OPS[target]
        dims = node.args[index] if len(node.args) > index else node.kwargs.get("dim", list(range(ndim)))
        if dims is None or set(_dims(dims, ndim)) & set(rows):
            raise UnsupportedGraphError(node, "it reduces, splits or joins along the sequence axis")
        return
    if target is aten.slice.Tensor:
        dim, start, end = (list(node.args[1:4]) + [0, None, None])[:3]
        full = (start in (0, None)) and (end is None or (isinstance(end, int) and end >= MAX_INDEX))
        if dim % ndim in rows and not full:
            raise UnsupportedGraphError(node, "it slices the sequence axis")
        return
    if target is aten.select.int:
        if node.args[1] % ndim in rows:
            raise UnsupportedGraphError(node, "it selects one position along the sequence axis")
        return
    if target is aten.linear.default:
        if (ndim - 1) in rows or row_dims(_val(node.args[1]), seq):
            raise UnsupportedGraphError(node, "its contraction runs over the sequence axis")
        return
    if target in (aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default):
        a, b = node.args[-2:]
        a_rows, b_rows = row_dims(_val(a), seq), row_dims(_val(b), seq)
        b_contracted = max(_val(b).dim() - 2, 0)
        # row-wise: no sequence axis contracted, and only one operand carrying one (an outer product with
        # positions, as transformers 4.x's rotary embedding computes inv_freq @ position_ids)
        if (_val(a).dim() - 1) in a_rows or b_contracted in b_rows or (a_rows and b_rows):
            raise UnsupportedGraphError(
                node, "a matrix product mixes positions; only scaled_dot_product_attention may mix them "
                "(load transformers models with attn_implementation='sdpa')"
            )
        return
    if target is aten.embedding.default:
        if row_dims(_val(node.args[0]), seq):
            raise UnsupportedGraphError(node, "the embedding table has a sequence axis")
        return
    if target is aten.repeat.default:
        repeats = node.args[1]
        if any(repeats[len(repeats) - ndim + d] != 1 for d in rows):
            raise UnsupportedGraphError(node, "it repeats the sequence axis")
        return
    if target is aten.gather.default:
        if row_dims(_val(node.args[0]), seq):
            raise UnsupportedGraphError(node, "it gathers from a tensor along positions")
        return  # a table without positions read at each row's own index (BERT's token types at position_ids)
    if target is aten.index.Tensor:
        if row_dims(_val(node.args[0]), seq):
            raise UnsupportedGraphError(node, "it indexes into a tensor along positions")
        return
    raise UnsupportedGraphError(node, "the op is not known to be row-wise (it may mix positions)")


def check_row_wise(gm: fx.GraphModule) -> None:
    """Raise UnsupportedGraphError at the first node that is not provably row-wise."""
    seq = sequence_symbol(gm)
    token_inputs(gm, seq)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            _check_node(node, seq)
        elif node.op in ("call_module", "call_method"):
            raise UnsupportedGraphError(node, "the graph must be flat ATen (capture with surelock_fx.capture)")
