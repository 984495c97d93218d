"""The LLaDA reference sampler (docs/DESIGN.md §2), with Fast-dLLM threshold decoding.

``generate`` only sees a forward function ``(x [B, N], attention_mask) -> logits``: for a plain
model that is its forward, returning [B, N, V]; for a ``Decodable`` (an optimized model, the dense
reference semantics) it is the runner its ``decode_runner`` makes, which keeps its own lock state and
caches (see ``surelock_fx.runtime``) and returns the logits of the rows it computed (``RowLogits``). The
sampler is the same for both: it reads masked positions only.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import decoding
from .decoding import (
    Decodable,
    DecodeStats,
    Forward,
    RowLogits,
    model_forward,
    predicts_next,
    row_chunks,
    rows_per_chunk,
    special_ids,
)
from .reference import ReferenceModel

REMASKING = ("low_confidence", "random")
CACHES = (None, "prefix", "dual")


@dataclasses.dataclass
class GenerateOutput:
    tokens: torch.Tensor
    stats: DecodeStats


def vocab_size(config) -> int:
    return getattr(config, "vocab_size")


def check_prompt(prompt_ids, attention_mask, *, mask_id: int, vocab: int) -> None:
    """Reject a prompt that is not [batch, length] token ids of this model, holds the mask token, or does not
    match its attention mask, with an error naming the fix."""
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2:
        raise ValueError("prompt_ids must be a 2-D tensor [batch, prompt_length] of token ids")
    if prompt_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"prompt_ids must hold integer token ids (int64), got dtype {prompt_ids.dtype}")
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"the prompt is empty (shape {tuple(prompt_ids.shape)}); give at least one token per row")
    if (prompt_ids == mask_id).any():
        rows = (prompt_ids == mask_id).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"the prompt contains the mask token id {mask_id} (rows {rows}); the mask token is reserved "
            "for the positions to generate: remove it from the prompt"
        )
    bad = (prompt_ids < 0) | (prompt_ids >= vocab)
    if bad.any():
        raise ValueError(
            f"prompt token id {prompt_ids[bad][0].item()} is outside the vocabulary [0, {vocab}); "
            "was the prompt made with this model's tokenizer?"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(prompt_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but prompt_ids has shape "
            f"{tuple(prompt_ids.shape)}; give one mask entry per prompt token"
        )


def check_generate_args(prompt_ids, attention_mask, *, gen_length, steps, block_length, temperature,
                        remasking, cfg_scale, threshold, mask_id, vocab, cache=None):
    """Reject impossible settings and bad prompts with an error naming the fix."""
    check_prompt(prompt_ids, attention_mask, mask_id=mask_id, vocab=vocab)
    for name, value in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if gen_length % block_length:
        raise ValueError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length}); "
            f"for example block_length={gen_length} (one block)"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps ({steps}) must be divisible by the number of blocks gen_length/block_length = {num_blocks}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")


def num_transfer_tokens(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps]: masked count // steps per step, the first (count % steps) steps one more."""
    count = block_mask.sum(dim=1, keepdim=True)
    base, remainder = count // steps, count % steps
    extra = torch.arange(steps, device=block_mask.device)[None, :] < remainder
    return base + extra.long()


class GumbelNoise:
    """The reference's Gumbel denominators (-log U)^temperature for [rows, V] logits, U uniform in
    float64 from one ``torch.rand`` of all rows, handed out a few rows at a time (``take``).

    On CPU a generator fills a tensor sequentially, so U is drawn a block of rows at a time and only
    the rows taken are kept and transformed: the same numbers as one whole draw, without holding
    rows x V float64 (2 GB at B=8, N=1088, V=32000). Other devices draw U whole.
    """

    def __init__(self, rows: int, vocab: int, temperature: float, device, generator):
        self.rows, self.vocab, self.temperature = rows, vocab, temperature
        self.device, self.generator = torch.device(device), generator
        self.whole = None if self.device.type == "cpu" else self._draw(rows)
        self.drawn = 0  # rows of U drawn so far, on CPU

    def _draw(self, rows: int) -> torch.Tensor:
        return torch.rand((rows, self.vocab), dtype=torch.float64, device=self.device, generator=self.generator)

    def _blocks(self, end: int):
        """(first row, block of U) for the rows from ``drawn`` up to ``end``, CHUNK_BYTES at a time."""
        per_block = max(1, decoding.CHUNK_BYTES // (self.vocab * 8))
        while self.drawn < end:
            start, self.drawn = self.drawn, min(end, self.drawn + per_block)
            yield start, self._draw(self.drawn - start)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The denominators [len(rows), V] of ``rows``: ascending, after every row taken before."""
        if self.whole is not None:
            uniform = self.whole.index_select(0, rows)
        else:
            uniform = torch.cat([block.index_select(0, rows[(rows >= start) & (rows < start + len(block))] - start)
                                 for start, block in self._blocks(int(rows[-1]) + 1)])
        return (-torch.log(uniform)) ** self.temperature

    def finish(self) -> None:
        """Draw the rows never taken, so that the generator ends where one whole draw leaves it."""
        for _ in self._blocks(self.rows):
            pass


def add_gumbel_noise(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Gumbel-max scores in float64: exp(logits) / noise, for ``noise`` from ``GumbelNoise``."""
    return logits.to(torch.float64).exp() / noise


def guided_logits(forward: Forward, x, attention_mask, prompt_index, cfg_scale, mask_id, read=None, rows=None):
    """Logits of one step, of the positions ``rows`` [B, N] if given (a cache policy's; the forward then
    takes them as its third argument); with CFG the unconditional half has its prompt replaced by masks, and
    RowLogits are combined at the positions the sampler reads only (``read``, default: the masked ones)."""
    if cfg_scale <= 0:
        return forward(x, attention_mask) if rows is None else forward(x, attention_mask, rows)
    un_x = x.masked_fill(prompt_index, mask_id)
    mask2 = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    both = forward(torch.cat([x, un_x]), mask2) if rows is None else forward(torch.cat([x, un_x]), mask2,
                                                                             torch.cat([rows, rows]))
    if isinstance(both, torch.Tensor):
        cond, uncond = both.chunk(2)
        return uncond + (cfg_scale + 1) * (cond - uncond)
    read = x == mask_id if read is None else read
    halves = [RowLogits(both.rows, half).rows_at(read) for half in both.row.chunk(2)]
    cond, uncond = (both.rows.index_select(0, rows) for rows in halves)
    row = torch.full_like(x, -1)
    row[read] = torch.arange(len(halves[0]), device=x.device)
    return RowLogits(uncond + (cfg_scale + 1) * (cond - uncond), row)


def step_candidates(logits, x, mask_index, block_end, *, mask_id, temperature, remasking, eos, eot,
                    logits_eos_inf, confidence_eos_eot_inf, generator):
    """(x0, confidence) of one step: proposals and their confidence, -inf where nothing may change.

    ``logits`` is [B, N, V] or RowLogits. Only the masked positions of the current block (before
    ``block_end``: earlier blocks are done) take a proposal and a confidence; their logits are read once,
    a few rows at a time (``row_chunks``), never copied whole. The Gumbel noise is drawn for every
    position, as the reference draws it (``GumbelNoise``). The mask token is never proposed:
    committing it would leave the position masked (and stall threshold decoding forever). Trained
    models give it no mass, so this changes nothing for them.
    """
    logits = RowLogits.of(logits)
    B, N = x.shape
    V = logits.rows.shape[-1]
    noise = None if temperature == 0 else GumbelNoise(B * N, V, temperature, x.device, generator)
    live = block_masked(mask_index, block_end)
    live_rows = live.flatten()
    scored = remasking == "low_confidence"
    logits_banned = [eos] if logits_eos_inf and eos is not None else []
    confidence_banned = [tok for tok in (eos, eot) if tok is not None] if confidence_eos_eot_inf else []
    x0 = x.flatten().clone()
    x0_p = torch.full((B * N,), -torch.inf, device=x.device)
    positions = live_rows.nonzero().squeeze(1)
    for rows, chunk in zip(positions.split(rows_per_chunk(logits.rows)), row_chunks(logits.rows, logits.rows_at(live))):
        chunk[:, logits_banned] = -torch.inf
        scores = chunk if noise is None else add_gumbel_noise(chunk, noise.take(rows))
        x0[rows] = proposals_argmax(scores, mask_id)
        if scored:
            chunk[:, confidence_banned] = -torch.inf
            x0_p[rows] = F.softmax(chunk.float(), dim=-1).gather(-1, x0[rows, None]).squeeze(-1)
    if noise is not None:
        noise.finish()
    if not scored:
        x0_p[live_rows] = torch.rand(x.shape, device=x.device, generator=generator)[live]
    return x0.view(B, N), x0_p.view(B, N)


def proposals_argmax(scores: torch.Tensor, mask_id: int) -> torch.Tensor:
    """argmax over the vocabulary without the mask token (as if its score were -inf), without
    copying ``scores``: only rows whose argmax is the mask token are rescored."""
    x0 = first_argmax(scores)
    hit = x0 == mask_id
    if hit.any():
        rows = scores[hit]
        rows[:, mask_id] = -torch.inf
        x0[hit] = first_argmax(rows)
    return x0


ARGMAX_BLOCK = 128  # columns per block of ``first_argmax``'s first reduction


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(-1)``, the same index (the first maximum; NaN counts as the maximum), from two
    short reductions: the first block of columns that holds the row's maximum, then the first
    maximum inside it. On CPU, ATen's argmax over a long row is several times slower than its max."""
    vocab = scores.shape[-1]
    width = max(1, min(ARGMAX_BLOCK, math.isqrt(vocab)))
    full = vocab - vocab % width
    maxima = scores[..., :full].unflatten(-1, (full // width, width)).amax(-1)
    if full < vocab:  # a last, shorter block
        maxima = torch.cat([maxima, scores[..., full:].amax(-1, keepdim=True)], dim=-1)
    # The last block's window starts early enough to be full width; the columns it takes from the
    # block before hold no maximum, or that block would have been the first to hold one.
    start = (maxima.argmax(-1, keepdim=True) * width).clamp(max=vocab - width)
    window = start + torch.arange(width, device=scores.device)
    return (start + scores.gather(-1, window).argmax(-1, keepdim=True)).squeeze(-1)


def select_topk(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the k[row] most confident positions."""
    transfer = torch.zeros_like(confidence, dtype=torch.bool)
    for row in range(confidence.shape[0]):
        _, index = torch.topk(confidence[row], k=int(k[row]))
        transfer[row, index] = True
    return transfer


def select_threshold(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every candidate with confidence >= threshold, and at least the most confident one per row."""
    transfer = confidence >= threshold
    has_candidate = torch.isfinite(confidence).any(dim=1)
    best = F.one_hot(confidence.argmax(dim=1), confidence.shape[1]).bool()
    need = has_candidate & ~transfer.any(dim=1)
    return transfer | (best & need[:, None])


def generate(model, prompt_ids, *, gen_length, steps, block_length, temperature=0.0,
             remasking="low_confidence", cfg_scale=0.0, threshold=None, logits_eos_inf=False,
             confidence_eos_eot_inf=False, attention_mask=None, generator=None, progress=False,
             lock=None, cache=None, schedule=None) -> GenerateOutput:
    """Decode ``gen_length`` tokens after ``prompt_ids`` [B, P] with LLaDA's sampler.

    ``model`` is a plain model (dense decode) or a ``Decodable`` such as the result of
    ``surelock_fx.optimize`` (locked decode when ``lock`` is a LockConfig, its rewritten graph with nothing
    locked when ``lock`` is None). ``cache``: Fast-dLLM's "prefix" or "dual" cache as the rows each pass
    computes (``cache_rows``; docs/DESIGN.md §2): each block starts with a pass over every position and
    runs until it has no mask left; a plain model runs them by the dense reference semantics
    (``surelock_fx.reference``). ``schedule``: a ``runtime.LockSchedule`` deciding which rows each pass
    skips instead of the lock rule (replaying a recorded decode; needs a Decodable).
    """
    config = model.config
    mask_id, eos, eot = special_ids(config)
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.unsqueeze(0)
    check_generate_args(prompt_ids, attention_mask, gen_length=gen_length, steps=steps,
                        block_length=block_length, temperature=temperature, remasking=remasking,
                        cfg_scale=cfg_scale, threshold=threshold, mask_id=mask_id, vocab=vocab_size(config),
                        cache=cache)
    stats = DecodeStats()
    forward = decode_forward(model, lock, stats, schedule, cache)
    B, P = prompt_ids.shape
    device = prompt_ids.device
    with torch.inference_mode():  # every step's input an inference tensor: one compiled graph serves all
        x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=device)
        x[:, :P] = prompt_ids
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask.to(torch.long), torch.ones(B, gen_length, dtype=torch.long, device=device)], dim=1
        )
    prompt_index = x != mask_id
    stats.unmask_step = torch.full_like(x, -1)
    stats.commit_confidence = torch.full(x.shape, float("nan"), device=device)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    candidates = dict(mask_id=mask_id, temperature=temperature, remasking=remasking, eos=eos, eot=eot,
                      logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
                      generator=generator)
    bar = tqdm(total=gen_length if threshold else steps, disable=not progress, unit="tok" if threshold else "step",
               desc="decoding")
    start = time.perf_counter()
    with torch.inference_mode():
        for block in range(num_blocks):
            lo, hi = P + block * block_length, P + (block + 1) * block_length
            transfers = num_transfer_tokens(x[:, lo:hi] == mask_id, steps_per_block)
            step = 0
            while block_runs(x[:, lo:hi] == mask_id, step, steps_per_block, threshold, cache):
                mask_index = x == mask_id
                rows = cache_rows(cache, step, x.shape, lo, hi, x.device, shift=int(predicts_next(config)))
                logits = guided_logits(forward, x, attention_mask, prompt_index, cfg_scale, mask_id,
                                       block_masked(mask_index, hi), rows)
                x0, confidence = step_candidates(logits, x, mask_index, hi, **candidates)
                del logits  # not held through the next forward pass
                if threshold:
                    transfer = select_threshold(confidence, threshold)
                else:
                    transfer = select_topk(confidence, transfers[:, step])
                x = torch.where(transfer, x0, x)
                stats.unmask_step[transfer] = stats.steps
                if remasking == "low_confidence":  # else the confidence is a random draw
                    stats.commit_confidence[transfer] = confidence[transfer]
                step += 1
                stats.steps += 1
                bar.update(int(transfer.sum(1).max()) if threshold else 1)
    bar.close()
    stats.wall_time_s = time.perf_counter() - start
    return GenerateOutput(tokens=x, stats=stats)


def block_runs(block_masked: torch.Tensor, step: int, steps_per_block: int, threshold, cache) -> bool:
    """Whether a block takes another step: with ``threshold``, while any row has a mask in it; with a cache
    policy, for at most ``steps_per_block`` steps, and while any row has a mask in it (Fast-dLLM's loops);
    else for ``steps_per_block`` steps (LLaDA's)."""
    if threshold:
        return bool(block_masked.any())
    return step < steps_per_block and (cache is None or bool(block_masked.any()))


def block_masked(mask_index: torch.Tensor, block_end: int) -> torch.Tensor:
    """The masked positions before ``block_end``: the current block's (earlier blocks are done), those a
    step reads."""
    live = mask_index.clone()
    live[:, block_end:] = False
    return live


def cache_rows(cache, step: int, shape, lo: int, hi: int, device=None, shift: int = 0) -> torch.Tensor | None:
    """The positions [B, N] a pass of a cache policy computes at ``step`` of the block [lo, hi): None (every
    position) at the block's first step and without a policy; then from the block's start to the end
    ("prefix") or the block only ("dual"), starting ``shift`` rows earlier for a model whose row i predicts
    position i + 1 (the row that predicts the block's first position). The rows left out keep the keys and
    values of the pass that last computed them."""
    if cache is None or step == 0:
        return None
    lo = max(lo - shift, 0)
    positions = torch.arange(shape[1], device=device)
    rows = positions >= lo if cache == "prefix" else (positions >= lo) & (positions < hi)
    return rows.expand(shape)


def decode_forward(model, lock, stats: DecodeStats, schedule=None, cache=None) -> Forward:
    """The forward function a decode runs, its logits by the position they predict (``RowLogits.shifted``
    for a model whose row i predicts position i + 1): a Decodable's runner, the dense reference semantics of
    a cache policy for a plain model, or a plain model's own forward."""
    forward = _row_forward(model, lock, stats, schedule, cache)
    if not predicts_next(model.config):
        return forward
    return lambda *args: RowLogits.of(forward(*args)).shifted()


def _row_forward(model, lock, stats: DecodeStats, schedule=None, cache=None) -> Forward:
    if isinstance(model, Decodable):
        return model.decode_runner(lock, stats, schedule)
    if lock is not None or schedule is not None:
        raise ValueError(
            "locking needs an optimized model: call surelock_fx.optimize(model) and pass its result to generate()"
        )
    if cache is not None:
        return ReferenceModel(model).decode_runner(None, stats)
    forward = model_forward(model)

    def counted(x, attention_mask):
        stats.forward_passes += 1
        return forward(x, attention_mask)

    return counted
