"""Dream-v0's sampler, ``diffusion_generate`` (docs/DESIGN.md §2), on any model ``generate`` decodes.

The input is right-padded with masks to prompt + ``max_new_tokens``; the noise level goes from 1 to
``eps`` over ``steps`` steps (``timesteps``), and each step unmasks, among the masked positions, either
each one independently with probability 1 - s/t (``alg="origin"``) or the k = int(mean masked count per
row x (1 - s/t)) most confident (``maskgit_plus``: the chosen token's probability, ``topk_margin``: top-1
minus top-2, ``entropy``: the negative entropy; sampled without replacement from softmax(confidence /
alg_temp) when ``alg_temp`` > 0); the last step unmasks every remaining position. Tokens: logits /
temperature, ``top_p``, ``top_k``, then the most probable at temperature 0, else a sample.

Random draws, all from ``generator``, in this order per step: "origin" draws the transfer decisions
(``torch.rand`` over the masked positions, row-major) and then the transferred positions' tokens; the
other algorithms draw the masked positions' tokens (at temperature > 0) and then, with ``alg_temp`` > 0,
the positions to unmask (one ``torch.multinomial`` over the [B, N] batch).

The forward is ``sampler.decode_forward``'s, so the logits are read by the position they predict (row
p - 1 for position p with Dream) and a locked model locks by the same rule as under ``generate``.
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .decoding import RowLogits, special_ids
from .sampler import DecodeStats, GenerateOutput, check_prompt, decode_forward, vocab_size

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


@dataclasses.dataclass(frozen=True)
class TokenRule:
    """How a step picks tokens from logits: temperature, top-p and top-k filtering."""

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The filtered distribution [R, V] in float32."""
        logits = logits.float()
        if self.temperature > 0:
            logits = logits / self.temperature
        if self.top_p is not None and self.top_p < 1:
            logits = top_p_logits(logits, self.top_p)
        if self.top_k is not None:
            logits = top_k_logits(logits, self.top_k)
        return torch.softmax(logits, dim=-1)

    def sample(self, probs: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, its probability) per row: the most probable at temperature 0, else a draw."""
        if self.temperature > 0:
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)
        confidence, tokens = probs.max(dim=-1)
        return tokens, confidence


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most probable tokens whose cumulative probability first exceeds ``top_p``."""
    sorted_logits, order = torch.sort(logits, descending=True)
    remove = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(remove).scatter_(-1, order, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row."""
    kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def confidence_of(alg: str, probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """A masked position's confidence under ``alg``, given its distribution and its chosen token's probability."""
    if alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if alg == "entropy":
        return (probs * torch.log(probs + 1e-10)).sum(-1)
    return chosen


def check_dream_args(input_ids, attention_mask, *, max_new_tokens, steps, eps, alg, alg_temp, temperature, top_p,
                     top_k, mask_id, vocab) -> None:
    """Reject impossible settings and bad prompts with an error naming the fix."""
    check_prompt(input_ids, attention_mask, mask_id=mask_id, vocab=vocab)
    for name, value in (("max_new_tokens", max_new_tokens), ("steps", steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0 < eps < 1:
        raise ValueError(f"eps (the last noise level) must be in (0, 1), got {eps}")
    if alg not in ALGS:
        raise ValueError(f"alg must be one of {ALGS}, got {alg!r}")
    if alg_temp is not None and alg_temp < 0:
        raise ValueError(f"alg_temp must be None or >= 0, got {alg_temp}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")


def diffusion_generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, steps: int, eps: float = 1e-3,
                       alg: str = "origin", alg_temp: float | None = None, temperature: float = 0.0,
                       top_p: float | None = None, top_k: int | None = None, lock=None, generator=None,
                       progress: bool = False) -> GenerateOutput:
    """Decode ``max_new_tokens`` tokens after ``input_ids`` [B, P] with Dream's sampler (module docstring).

    ``model`` is a plain model (dense decode) or a ``Decodable`` such as ``surelock_fx.optimize(model)``
    (locked decode when ``lock`` is a LockConfig). ``attention_mask`` [B, P] (1 keep, 0 left padding).
    Returns the tokens [B, P + max_new_tokens] and the DecodeStats, as ``generate`` does.
    """
    config = model.config
    mask_id = special_ids(config)[0]
    check_dream_args(input_ids, attention_mask, max_new_tokens=max_new_tokens, steps=steps, eps=eps, alg=alg,
                     alg_temp=alg_temp, temperature=temperature, top_p=top_p, top_k=top_k, mask_id=mask_id,
                     vocab=vocab_size(config))
    stats = DecodeStats()
    forward = decode_forward(model, lock, stats)
    rule = TokenRule(temperature, top_p, top_k)
    B, P = input_ids.shape
    device = input_ids.device
    with torch.inference_mode():
        x = torch.nn.functional.pad(input_ids, (0, max_new_tokens), value=mask_id)
    if attention_mask is not None and bool((attention_mask == 0).any()):
        attention_mask = torch.nn.functional.pad(attention_mask.long(), (0, max_new_tokens), value=1)
    else:
        attention_mask = None
    timesteps = torch.linspace(1, eps, steps + 1, device=device)
    stats.unmask_step = torch.full_like(x, -1)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(steps), disable=not progress, unit="step", desc="decoding"):
            mask_index = x == mask_id
            logits = RowLogits.of(forward(x, attention_mask))
            rows = logits.rows.index_select(0, logits.rows_at(mask_index))
            del logits  # not held through the next forward pass
            t, s = timesteps[i], timesteps[i + 1]
            last = i == steps - 1
            if alg == "origin":
                proposals = _origin_step(rows, rule, 1 - s / t, last, mask_id, generator)
                new = torch.zeros_like(x, dtype=torch.bool)
                new[mask_index] = proposals != mask_id
                x[mask_index] = proposals
            else:
                new = _confident_step(x, mask_index, rows, rule, alg, alg_temp, 1 - s / t, last, mask_id, generator)
            stats.unmask_step[new] = stats.steps
            stats.steps += 1
    stats.wall_time_s = time.perf_counter() - start
    return GenerateOutput(tokens=x, stats=stats)


def _origin_step(rows, rule: TokenRule, p_transfer, last: bool, mask_id: int, generator) -> torch.Tensor:
    """The masked positions' new tokens: each transferred with probability ``p_transfer`` (1 at the last
    step) and sampled; the others stay masked."""
    transfer = torch.rand(len(rows), device=rows.device, generator=generator) < (1.0 if last else p_transfer)
    proposals = torch.full((len(rows),), mask_id, dtype=torch.long, device=rows.device)
    if transfer.any():
        proposals[transfer] = rule.sample(rule.probabilities(rows[transfer]), generator)[0]
    return proposals


def _confident_step(x, mask_index, rows, rule: TokenRule, alg: str, alg_temp, fraction, last: bool, mask_id: int,
                    generator) -> torch.Tensor:
    """Unmask the k most confident masked positions of each row of ``x`` in place (drawn by confidence with
    ``alg_temp``); returns the positions unmasked."""
    probs = rule.probabilities(rows)
    tokens, chosen = rule.sample(probs, generator)
    confidence = confidence_of(alg, probs, chosen)
    masked_per_row = mask_index.sum() / x.shape[0]
    k = int(masked_per_row) if last else int(masked_per_row * fraction)
    new = torch.zeros_like(mask_index)
    if k <= 0:
        return new
    scores = torch.full(x.shape, -torch.inf, device=x.device)
    scores[mask_index] = confidence
    if not alg_temp:
        index = torch.topk(scores, k).indices
    else:
        index = torch.multinomial(torch.softmax(scores / alg_temp, dim=-1), k, generator=generator)
    proposed = torch.full_like(x, mask_id)
    proposed[mask_index] = tokens
    batch = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(index)
    x[batch, index] = proposed[batch, index]
    new[batch, index] = True
    return new & (x != mask_id)
