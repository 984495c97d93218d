"""The ``surelock`` command line.

Each subcommand is one entry of ``SUBCOMMANDS``: a name, a one-line help, a function that adds its
options to its parser, and a function ``run(args) -> exit code``. To add a subcommand, write those
two functions in a module of this package and append an entry; shared options and helpers are in
``surelock_fx.cli.options``, the tokenizer helpers in ``surelock_fx.text``.

Expected failures (bad checkpoint, bad settings, no tokenizer) raise ``ValueError`` subclasses and
are reported by ``main`` as one line ``error: ...`` with exit code 2, never a stack trace.
"""
from __future__ import annotations

import argparse
import sys

from ..allocator import keep_freed_memory
from . import evaluate, export, generate

EXIT_ERROR = 2

# (name, help, add_arguments(parser), run(args) -> exit code)
SUBCOMMANDS = [
    ("generate", "decode an answer to one prompt with a LLaDA or Dream checkpoint", generate.add_generate_arguments,
     generate.run_generate),
    ("eval", "decode fresh problems dense, locked and with cache policies; compare accuracy, FLOPs and speed",
     evaluate.add_eval_arguments, evaluate.run_eval),
    ("demo", "the main job: dense vs locked decoding of every task on the shipped model",
     evaluate.add_demo_arguments, evaluate.run_demo),
    ("export", "write a checkpoint's locked graph as ONNX or TensorRT engines", export.add_export_arguments,
     export.run_export),
]


def build_parser() -> argparse.ArgumentParser:
    """The ``surelock`` parser, one subparser per entry of ``SUBCOMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="surelock", description="SureLock for masked diffusion LMs: decode, evaluate, export."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in SUBCOMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), run the subcommand, return its exit code."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # the command owns its process: large tensors are reused, not page-faulted in anew
    try:
        return args.run(args)
    except ValueError as err:  # CheckpointError, ConfigError, TokenizerError, CLIError, generate's argument errors
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_ERROR
