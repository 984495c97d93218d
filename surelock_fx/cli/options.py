"""Options and helpers shared by the ``surelock`` subcommands: the checkpoint, locking, the backend."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import infill, tasks
from ..backends import BACKEND_NAMES
from ..lock import LockConfig
from ..optimize import optimize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(ValueError):
    """A problem with the command's inputs that is not the checkpoint's or the sampler's."""


# the trained tiny models shipped with the package, by the name --model takes for them
SHIPPED_MODELS = {"tiny-tasks": tasks.default_model_dir(), "tiny-dream": tasks.default_model_dir("dream"),
                  "tiny-code": infill.default_model_dir()}


def model_path(value: str) -> Path:
    """--model's value: a checkpoint directory, or the name of a shipped model (``SHIPPED_MODELS``)."""
    path = Path(value)
    return SHIPPED_MODELS[value] if value in SHIPPED_MODELS and not path.is_dir() else path


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--model, --dtype, --device: where the checkpoint is and how to hold it."""
    parser.add_argument("--model", required=required, type=model_path, default=None,
                        help="checkpoint directory (config.json, safetensors weights, tokenizer), or a shipped "
                             f"model: {', '.join(SHIPPED_MODELS)}"
                        + ("" if required else "; default: tiny-tasks (tiny-code for --task infill)"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype to load the weights in (default: float32)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)")


def add_lock_arguments(parser: argparse.ArgumentParser, several: bool) -> None:
    """--lock-eps (one value, or ``several``: one decode each), --confidence-gate, --no-lock-prompt,
    --backend: how to lock, and which ``optimize()`` backend runs the locked graph."""
    if several:
        parser.add_argument("--lock-eps", type=float, nargs="+", default=[LockConfig.kl_threshold],
                            help="KL thresholds to lock at, one locked decode each")
    else:
        parser.add_argument("--lock-eps", type=float, default=None,
                            help="decode with SureLock, locking at this KL threshold "
                                 f"(default: dense; {LockConfig.kl_threshold:g} is LockConfig's default)")
    parser.add_argument("--confidence-gate", type=float, default=None, help="confidence gate fraction m")
    parser.add_argument("--no-lock-prompt", action="store_true", help="never lock prompt positions")
    parser.add_argument("--backend", choices=BACKEND_NAMES, default=None, help="optimize() backend (default: eager)")


CACHE_HELP = ("Fast-dLLM's K/V cache as the rows each step computes: 'prefix' (the block and the suffix) or "
              "'dual' (the block only), after a full pass at each block start")


def lock_config(args: argparse.Namespace, eps: float) -> LockConfig:
    """The LockConfig of ``add_lock_arguments``' options, locking at ``eps``."""
    return LockConfig(kl_threshold=eps, confidence_gate=args.confidence_gate, lock_prompt=not args.no_lock_prompt)


def optimize_with_backend(model, args: argparse.Namespace):
    """``optimize(model)`` with ``add_lock_arguments``' --backend (default eager)."""
    return optimize(model, backend=args.backend or "eager")


def resolve_device(name: str | None) -> torch.device:
    """The named torch device; by default cuda if available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
