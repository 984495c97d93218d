"""Code infilling: the prompt format of the shipped tiny-code model and its held-out evaluation.

A prompt is the code before the missing span, ``<|hole|>``, and the code after it; the answer, decoded
after the prompt as any answer is, is the missing span. The held-out evaluation
(``assets/infill/eval.jsonl``, made by ``benchmarks/make_infill_eval.py`` from standard-library modules
the model never saw) is a JSON-lines task file like any other, with two extra fields: ``kind`` (line,
lines, body) and, for function bodies, ``function`` (the source up to the body, so that ``function +
answer`` is a whole function for ``ast.parse``).

Scores of a decode (``scores``): exact match per kind (surrounding whitespace ignored, as
``evaluate.accuracy``), the share of body infills that parse (``parses``), and Gen-PPL, the perplexity of
the generated tokens under the dense model read left to right (``generated_nll``).
"""
from __future__ import annotations

import ast
import math
import textwrap
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .decoding import model_forward, predicts_next
from .text import encode_batch

HOLE = "<|hole|>"
MAX_ANSWER_CHARS = 48  # the longest span the evaluation cuts out (and training asks for)
GEN_LENGTH = 24  # answer region in tokens: the longest span and its EOS
DEFAULT_DECODE = dict(gen_length=GEN_LENGTH, steps=GEN_LENGTH, block_length=GEN_LENGTH, temperature=0.0,
                      remasking="low_confidence")


def infill_prompt(prefix: str, suffix: str) -> str:
    return f"{prefix}{HOLE}{suffix}"


def assets_dir() -> Path:
    return Path(__file__).resolve().parent / "assets"


def default_model_dir() -> Path:
    """The tiny LLaDA trained on the standard library's source, shipped with the package."""
    return assets_dir() / "tiny-code"


def eval_file() -> Path:
    return assets_dir() / "infill" / "eval.jsonl"


def is_infill(records: list[dict]) -> bool:
    """Whether task records carry the infill fields (``kind`` or ``function``), and so get ``scores``."""
    return any("kind" in r or "function" in r for r in records)


def parses(function: str, answer: str) -> bool:
    """Whether ``function + answer`` (a function's source up to its body, and a body) dedented is valid Python."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # e.g. invalid escape sequences in generated strings
            ast.parse(textwrap.dedent(function + answer))
    except (SyntaxError, ValueError):  # ValueError: a null byte
        return False
    return True


def leading_spaces(text: str) -> str:
    return text[:len(text) - len(text.lstrip(" "))]


def exact_match(answers: list[str], records: list[dict]) -> dict[str, float]:
    """Exact match per ``kind`` (records without one count under ``all``), surrounding whitespace ignored."""
    hits: dict[str, list[bool]] = {}
    for answer, record in zip(answers, records, strict=True):
        hits.setdefault(record.get("kind", "all"), []).append(answer.strip() == record["answer"].strip())
    return {kind: sum(h) / len(h) for kind, h in hits.items()}


def parse_rate(answers: list[str], records: list[dict]) -> float | None:
    """The share of the records with a ``function`` whose answer completes it into valid Python (None: there
    are none). An answer is compared stripped (as decoded answers are): its first line gets the indentation
    of the true answer's, so that an exact match always parses."""
    results = [parses(r["function"], leading_spaces(r["answer"]) + a.strip())
               for a, r in zip(answers, records, strict=True) if r.get("function") is not None]
    return sum(results) / len(results) if results else None


@torch.inference_mode()
def generated_nll(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None, generated: torch.Tensor,
                  stop_ids, chunk_bytes: int = 64 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Per problem, the negative log-likelihood (float64 sum) and count of the generated tokens up to and
    including the first stop token (all of them if none), under the plain ``model`` by the chain rule left
    to right: token j given the prompt, generated tokens < j and every position >= j masked.

    ``prompt_ids``, ``attention_mask`` [B, P] (left-padded, as ``encode_batch`` makes them), ``generated``
    [B, G]. The prefixes of all problems are batched into forwards of about ``chunk_bytes`` of logits each.
    Gen-PPL of a set of problems is ``exp(sum of NLLs / sum of counts)``."""
    B, P = prompt_ids.shape
    G = generated.shape[1]
    device = prompt_ids.device
    generated = generated.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(prompt_ids)
    stops = torch.isin(generated, torch.tensor([s for s in stop_ids if s is not None], device=device))
    counts = torch.where(stops.any(1), stops.int().argmax(1) + 1, G)
    problem = torch.repeat_interleave(torch.arange(B, device=device), counts)  # one row per (problem, token j)
    token = torch.cat([torch.arange(int(c), device=device) for c in counts])
    forward, shift = model_forward(model), int(predicts_next(model.config))
    per_chunk = max(1, chunk_bytes // ((P + G) * model.config.vocab_size * 4))
    nll = torch.zeros(B, dtype=torch.float64, device=device)
    for lo in range(0, len(problem), per_chunk):
        b, j = problem[lo:lo + per_chunk], token[lo:lo + per_chunk]
        hidden = torch.arange(G, device=device) >= j[:, None]
        region = generated[b].masked_fill(hidden, model.config.mask_token_id)
        x = torch.cat([prompt_ids[b], region], 1)
        mask = torch.cat([attention_mask[b].long(), torch.ones_like(region)], 1)
        logits = forward(x, mask)[torch.arange(len(b), device=device), P + j - shift].float()
        target = generated[b, j]
        nll.index_add_(0, b, F.cross_entropy(logits, target, reduction="none").double())
    return nll.cpu(), counts.cpu()


def gen_ppl(model, tokenizer, prompts: list[str], generated: list[torch.Tensor], batch_size: int = 64) -> float:
    """Gen-PPL of decoded answers (``generated``: the answer-region ids of each prompt) under the plain ``model``:
    exp(total ``generated_nll`` / total tokens)."""
    config = model.config
    stops = (config.eos_token_id, getattr(config, "eot_token_id", None))
    device = next(model.parameters()).device
    nll = tokens = 0.0
    for lo in range(0, len(prompts), batch_size):
        ids, mask = encode_batch(tokenizer, prompts[lo:lo + batch_size])
        sums, counts = generated_nll(model, ids.to(device), mask.to(device),
                                     torch.stack(generated[lo:lo + batch_size]), stops)
        nll, tokens = nll + float(sums.sum()), tokens + float(counts.sum())
    return math.exp(nll / tokens)


def scores(model, tokenizer, records: list[dict], answers: list[str], generated: list[torch.Tensor],
           batch_size: int = 64) -> dict:
    """``exact_match`` per kind, ``parse_rate`` of the body infills and ``gen_ppl`` (by the plain ``model``) of
    one decode of ``records`` (``answers``: decoded and stripped; ``generated``: their token ids)."""
    return dict(exact_match=exact_match(answers, records), parse_rate=parse_rate(answers, records),
                gen_ppl=gen_ppl(model, tokenizer, [r["prompt"] for r in records], generated, batch_size))
