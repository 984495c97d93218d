"""The ``surelock`` command line.

Each subcommand is one entry of ``SUBCOMMANDS``: a name, a one-line help, a function that adds its
options to its parser, and a function ``run(args) -> exit code``. To add a subcommand, write those
two functions and append an entry; shared options (``add_model_arguments``) and helpers
(``load_tokenizer``, ``encode_prompt``, ``decode_answer``) are here to reuse.

Expected failures (bad checkpoint, bad settings, no tokenizer) raise ``ValueError`` subclasses and
are reported by ``main`` as one line ``error: ...`` with exit code 2, never a stack trace.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import evaluate, export
from .allocator import keep_freed_memory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXIT_ERROR = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class CLIError(ValueError):
    """A problem with the command's inputs that is not the checkpoint's or the sampler's."""


# --- shared helpers ------------------------------------------------------------------------

def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--model, --dtype, --device: where the checkpoint is and how to hold it."""
    parser.add_argument("--model", required=required, type=Path, default=None,
                        help="checkpoint directory (config.json, safetensors weights, tokenizer)"
                        + ("" if required else "; default: the shipped tiny-tasks model"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype to load the weights in (default: float32)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)")


def add_lock_arguments(parser: argparse.ArgumentParser, several: bool) -> None:
    """--lock-eps (one value, or ``several``: one decode each), --confidence-gate, --no-lock-prompt,
    --backend: how to lock, and which ``optimize()`` backend runs the locked graph."""
    from .lock import LockConfig
    from .optimize import BACKENDS

    if several:
        parser.add_argument("--lock-eps", type=float, nargs="+", default=[LockConfig.kl_threshold],
                            help="KL thresholds to lock at, one locked decode each")
    else:
        parser.add_argument("--lock-eps", type=float, default=None,
                            help="decode with SureLock, locking at this KL threshold "
                                 f"(default: dense; {LockConfig.kl_threshold:g} is LockConfig's default)")
    parser.add_argument("--confidence-gate", type=float, default=None, help="confidence gate fraction m")
    parser.add_argument("--no-lock-prompt", action="store_true", help="never lock prompt positions")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="optimize() backend (default: eager)")


def lock_config(args: argparse.Namespace, eps: float):
    """The LockConfig of ``add_lock_arguments``' options, locking at ``eps``."""
    from .lock import LockConfig

    return LockConfig(kl_threshold=eps, confidence_gate=args.confidence_gate, lock_prompt=not args.no_lock_prompt)


def optimize_with_backend(model, args: argparse.Namespace):
    """``optimize(model)`` with ``add_lock_arguments``' --backend (default eager)."""
    from .optimize import optimize

    return optimize(model, backend=args.backend or "eager")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(path: Path):
    """The Hugging Face tokenizer saved in the checkpoint directory, from local files only.

    Its class comes from tokenizer_config.json: AutoTokenizer is given an empty model config, since
    the checkpoint's config.json (model_type 'llada', remote code) is not one transformers can read.
    """
    from transformers import AutoTokenizer, PretrainedConfig

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CLIError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
            "there with tokenizer.save_pretrained"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, config=PretrainedConfig())
    except (OSError, ValueError, KeyError) as err:
        raise CLIError(
            f"could not load the tokenizer in {path}: {first_line(err)}"
        ) from None


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt; with ``chat``, wrapped as a user turn by the tokenizer's chat template."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise CLIError("--chat needs a tokenizer with a chat_template; this tokenizer has none")
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def decode_answer(tokenizer, generated: list[int], stop_ids) -> str:
    """The generated text up to (not including) the first stop token, special tokens skipped."""
    stops = {i for i in stop_ids if i is not None}
    end = next((pos for pos, tok in enumerate(generated) if tok in stops), len(generated))
    return tokenizer.decode(generated[:end], skip_special_tokens=True).strip()


def first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# --- surelock generate ---------------------------------------------------------------------

def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from .sampler import REMASKING

    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    parser.add_argument("--gen-length", type=int, default=128, help="tokens to generate (default: 128)")
    parser.add_argument("--steps", type=int, default=128, help="denoising steps in total (default: 128)")
    parser.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block (default: 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily (default: 0)")
    parser.add_argument("--remasking", choices=REMASKING, default="low_confidence",
                        help="which positions to unmask first (default: low_confidence)")
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance (default: 0, off)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="Fast-dLLM confidence threshold: dynamic steps (default: off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    add_lock_arguments(parser, several=False)


def run_generate(args: argparse.Namespace) -> int:
    """Load the checkpoint and its tokenizer, decode one answer (locked with ``--lock-eps``, through
    ``optimize(model, --backend)`` with ``--lock-eps`` or ``--backend``), print it; a locked decode's
    FLOPs ratio and mean active fraction go to stderr."""
    from .models import load_config, load_model
    from .sampler import generate

    config = load_config(args.model)  # cheap checks first: directory, config.json
    tokenizer = load_tokenizer(args.model)
    device = resolve_device(args.device)
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=device)
    prompt_ids = torch.tensor([encode_prompt(tokenizer, args.prompt, args.chat)], device=device)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    lock = None if args.lock_eps is None else lock_config(args, args.lock_eps)
    if lock is not None or args.backend is not None:
        model = optimize_with_backend(model, args)
    out = generate(model, prompt_ids, lock=lock, gen_length=args.gen_length, steps=args.steps,
                   block_length=args.block_length, temperature=args.temperature, remasking=args.remasking,
                   cfg_scale=args.cfg_scale, threshold=args.threshold, generator=generator, progress=True)
    generated = out.tokens[0, prompt_ids.shape[1]:].tolist()
    print(decode_answer(tokenizer, generated, (config.eos_token_id, config.eot_token_id)))
    if lock is not None:
        print(f"locked at KL {lock.kl_threshold:g}: FLOPs ratio {out.stats.flops_ratio:.3f}, mean active fraction "
              f"{out.stats.mean_active_fraction:.3f}, {out.stats.wall_time_s:.2f} s", file=sys.stderr)
    return 0


# --- the parser ----------------------------------------------------------------------------

# (name, help, add_arguments(parser), run(args) -> exit code)
SUBCOMMANDS = [
    ("generate", "decode an answer to one prompt with a LLaDA checkpoint", add_generate_arguments, run_generate),
    ("eval", "decode fresh problems dense and locked; compare accuracy, FLOPs and time",
     evaluate.add_eval_arguments, evaluate.run_eval),
    ("demo", "the main job: dense vs locked decoding of every task on the shipped model",
     evaluate.add_demo_arguments, evaluate.run_demo),
    ("export", "write a checkpoint's locked graph as ONNX or TensorRT engines", export.add_cli_arguments,
     export.run_cli),
]


def build_parser() -> argparse.ArgumentParser:
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
    except ValueError as err:  # CheckpointError, ConfigError, CLIError, generate's argument errors
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
