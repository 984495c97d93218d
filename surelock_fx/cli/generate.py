"""``surelock generate``: decode an answer to one prompt with a LLaDA or Dream checkpoint."""
from __future__ import annotations

import argparse
import sys

import torch

from ..dream import ALGS, diffusion_generate
from ..models import load_config, load_model
from ..sampler import REMASKING, generate
from ..text import decode_answer, encode_prompt, load_tokenizer
from .options import (
    CACHE_HELP,
    DTYPES,
    CLIError,
    add_lock_arguments,
    add_model_arguments,
    lock_config,
    optimize_with_backend,
    resolve_device,
)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``surelock generate``."""
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
    parser.add_argument("--cache", choices=("prefix", "dual"), default=None, help=CACHE_HELP + " (default: none)")
    parser.add_argument("--alg", choices=ALGS, default=None,
                        help="decode with Dream's sampler (diffusion_generate) and this unmasking order instead of "
                             "LLaDA's; --gen-length is then max_new_tokens (default: LLaDA's sampler)")
    parser.add_argument("--alg-temp", type=float, default=None, help="with --alg: draw positions by confidence")
    parser.add_argument("--top-p", type=float, default=None, help="with --alg: nucleus filtering")
    parser.add_argument("--top-k", type=int, default=None, help="with --alg: top-k filtering")
    add_lock_arguments(parser, several=False)


def run_generate(args: argparse.Namespace) -> int:
    """Load the checkpoint and its tokenizer, decode one answer (locked with ``--lock-eps``, with a cache policy
    with ``--cache``; through ``optimize(model, --backend)`` with any of them or ``--backend``), print it; the
    FLOPs ratio and mean active fraction of a decode that skipped rows go to stderr."""
    config = load_config(args.model)  # cheap checks first: directory, config.json
    tokenizer = load_tokenizer(args.model)
    device = resolve_device(args.device)
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=device)
    prompt_ids = torch.tensor([encode_prompt(tokenizer, args.prompt, args.chat)], device=device)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    lock = None if args.lock_eps is None else lock_config(args, args.lock_eps)
    if lock is not None or args.cache is not None or args.backend is not None:
        model = optimize_with_backend(model, args)
    if args.alg is not None:
        if args.cache is not None or args.threshold is not None or args.cfg_scale:
            raise CLIError("--alg (Dream's sampler) takes no --cache, --threshold or --cfg-scale: those are "
                           "options of LLaDA's sampler; drop --alg to use them")
        out = diffusion_generate(model, prompt_ids, max_new_tokens=args.gen_length, steps=args.steps, alg=args.alg,
                                 alg_temp=args.alg_temp, temperature=args.temperature, top_p=args.top_p,
                                 top_k=args.top_k, lock=lock, generator=generator, progress=True)
    else:
        out = generate(model, prompt_ids, lock=lock, cache=args.cache, gen_length=args.gen_length,
                       steps=args.steps, block_length=args.block_length, temperature=args.temperature,
                       remasking=args.remasking, cfg_scale=args.cfg_scale, threshold=args.threshold,
                       generator=generator, progress=True)
    generated = out.tokens[0, prompt_ids.shape[1]:].tolist()
    print(decode_answer(tokenizer, generated, (config.eos_token_id, config.eot_token_id)))
    if lock is not None or args.cache is not None:
        how = " and ".join(filter(None, (lock and f"locked at KL {lock.kl_threshold:g}", args.cache and
                                         f"{args.cache} cache")))
        print(f"{how}: FLOPs ratio {out.stats.flops_ratio:.3f}, mean active fraction "
              f"{out.stats.mean_active_fraction:.3f}, {out.stats.wall_time_s:.2f} s", file=sys.stderr)
    return 0
