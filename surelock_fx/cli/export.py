"""``surelock export``: write a checkpoint's locked graph as ONNX or TensorRT engines."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..export import TensorRTUnavailableError, export_onnx, export_tensorrt, require_tensorrt, tensorrt_ranges
from ..models import load_model
from ..optimize import optimize
from .options import DTYPES, CLIError, add_model_arguments, resolve_device


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


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``surelock export``."""
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


def run_export(args: argparse.Namespace) -> int:
    """Load the checkpoint, rewrite it for locked decoding, write ONNX or TensorRT engines."""
    device = resolve_device(args.device)
    shapes = dict(min_active=args.min_active, opt_active=args.opt_active, max_active=args.max_active,
                  batch=args.batch, seq=args.seq)
    _check_before_loading(args, shapes)
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=device)
    optimized = optimize(model)
    if args.format == "onnx":
        path = export_onnx(optimized, args.out, packed=args.packed)
    else:
        path = export_tensorrt(optimized, args.out, **shapes)
    print(path)
    return 0


def _check_before_loading(args: argparse.Namespace, shapes: dict) -> None:
    """Fail before the weights load: --packed without ONNX, TensorRT missing, bad engine shapes."""
    if args.packed and args.format != "onnx":
        raise CLIError("--packed applies to --format onnx only; the TensorRT engines are padded")
    if args.format == "tensorrt":
        try:
            require_tensorrt()
        except TensorRTUnavailableError as err:
            raise CLIError(str(err)) from None
        tensorrt_ranges(**shapes)
