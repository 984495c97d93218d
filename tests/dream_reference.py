"""An independent transcription of Dream-v0's ``diffusion_generate`` (HKUNLP Dream, ``generation_utils.py``:
``DreamGenerationMixin._sample``, ``sample_tokens``, ``top_p_logits``, ``top_k_logits``), to test
``surelock_fx.diffusion_generate`` against. It shares no code with ``surelock_fx.sampler`` or ``surelock_fx.dream``
and is written plainly, one official line after another, for reading rather than speed.

Departures from the official code, none of which changes a result:

* The model is a callable ``forward(x, attention_mask, position_ids) -> logits [B, N, V]``. Dream builds a 4-D
  boolean mask ``mask[:, None, None, :] & mask[:, None, :, None]`` (``attention_inputs`` returns it too); our
  models take the [B, N] key mask, which differs from it only in the query rows of padding positions. Those rows
  are prompt rows, and no step reads a prompt row's logits (a prompt position is never masked), so the tokens
  are the same. Without padding (no zero in ``attention_mask``, or no mask) the call gets ``None, None``: full
  attention and positions 0..N-1, as the official ``attention_mask = "full"``, ``tok_idx = None``.
* Every random draw comes from the ``generator`` argument instead of torch's global generator (below).
* ``dists.Categorical(probs=probs).sample()`` is ``torch.multinomial(probs, 1, generator=g)``: Categorical draws
  exactly that (``torch.multinomial(probs_2d, 1, True)``; with one sample torch takes the same exponential-race
  path with or without replacement), so under ``torch.manual_seed(s)`` the official code draws what this draws
  with ``torch.Generator().manual_seed(s)``. The official ``try/except`` fallback to the argmax (taken only when
  the probabilities are invalid, e.g. NaN) is left out.
* In "origin", when no masked position transfers at a step, ``sample_tokens`` is not called on the empty set of
  rows (the official code calls it; on zero rows it draws nothing and returns nothing).

Random draws, in order (the implementation under test must make the same calls on the same generator):

For each step i = 0 .. steps - 1, after the model call:

* alg "origin":
    1. ``torch.rand(num_masked, generator=g)``, num_masked = the number of masked positions of the whole batch
       at this step (row-major order of ``x == mask_id``); position j transfers if its draw < p_transfer
       (``1 - s / t``, or 1 at the last step: every draw is still made then).
    2. if temperature > 0 and at least one position transfers: ``torch.multinomial(probs, 1, generator=g)``, one
       call on the [num_transferred, V] probabilities of the transferring positions, in row-major order.
* alg "maskgit_plus", "topk_margin", "entropy":
    1. if temperature > 0: ``torch.multinomial(probs, 1, generator=g)``, one call on the [num_masked, V]
       probabilities of all masked positions of the batch, in row-major order.
    2. if alg_temp is not None and alg_temp > 0 and k > 0 (k = the number to transfer per row this step):
       ``torch.multinomial(softmax(full_confidence / alg_temp, -1), k, generator=g)``, one call on the [B, N]
       matrix (without replacement), as the official code makes it. (On CPU this draws the same as B calls on
       the rows one at a time, in row order.)

At temperature 0 with alg_temp None or 0, nothing is drawn.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the most probable tokens up to and including the first whose cumulative probability
    exceeds top_p; the others get the dtype's lowest value (as the official code; a zero probability either way)."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_indices_to_remove = cumulative_probs > top_p
    # shift right, so that the first token above the threshold is kept, and the most probable always
    sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
    sorted_indices_to_remove[..., 0] = False
    remove = torch.zeros_like(logits, dtype=torch.bool)
    remove = remove.scatter(-1, sorted_indices, sorted_indices_to_remove)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the tokens whose logit is at least the k-th largest (ties with it kept); the others the lowest value."""
    top_k = min(top_k, logits.size(-1))
    kth_largest = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth_largest, torch.finfo(logits.dtype).min)


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: float | None = None,
                  top_k: int | None = None, margin_confidence: bool = False, neg_entropy: bool = False,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [R], x0 [R]) of logits [R, V], as Dream's ``sample_tokens``."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)

    if temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # = Categorical(probs=probs).sample()
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)

    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        top1_probs = sorted_probs[:, 0]
        top2_probs = sorted_probs[:, 1]
        confidence = top1_probs - top2_probs

    if neg_entropy:
        epsilon = 1e-10
        log_probs = torch.log(probs + epsilon)
        confidence = torch.sum(probs * log_probs, dim=-1)

    return confidence, x0


def attention_inputs(attention_mask: torch.Tensor | None, max_length: int):
    """Dream's attention inputs for a right-padded sequence of ``max_length``: (key mask [B, N] or None, the 4-D
    mask [B, 1, N, N] or None, position ids [B, N] or None). None, None, None without a zero in the mask."""
    if attention_mask is not None and torch.any(attention_mask == 0.0):
        # the [MASK] positions appended on the right are attended: pad with ones
        attention_mask = F.pad(attention_mask, (0, max_length - attention_mask.shape[1]), value=1.0)
        tok_idx = attention_mask.long().cumsum(-1) - 1
        tok_idx.masked_fill_(attention_mask == 0, 1)
        mask_4d = torch.logical_and(
            attention_mask.unsqueeze(1).unsqueeze(-2),
            attention_mask.unsqueeze(1).unsqueeze(-1),
        )
        return attention_mask, mask_4d, tok_idx
    return None, None, None


@torch.no_grad()
def dream_generate(forward, input_ids: torch.Tensor, mask_token_id: int, attention_mask: torch.Tensor | None = None,
                   *, max_new_tokens: int, steps: int, eps: float = 1e-3, alg: str = "origin",
                   alg_temp: float | None = None, temperature: float = 0.0, top_p: float | None = None,
                   top_k: int | None = None, generator: torch.Generator | None = None,
                   history: list | None = None) -> torch.Tensor:
    """Dream-v0's ``diffusion_generate``: the final x [B, prompt + max_new_tokens].

    forward(x, attention_mask, position_ids) -> logits [B, N, V] (raw rows; shifted here). ``history``: if a
    list, x after each step is appended to it (a copy), to locate the first step where two decodes differ.
    """
    if alg not in ALGS:
        raise RuntimeError(f"Unknown alg: {alg}")
    max_length = input_ids.shape[1] + max_new_tokens
    x = F.pad(input_ids, (0, max_length - input_ids.shape[1]), value=mask_token_id)
    key_mask, _mask_4d, tok_idx = attention_inputs(attention_mask, max_length)

    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)

    for i in range(steps):
        mask_index = x == mask_token_id
        logits = forward(x, key_mask, tok_idx)
        # position i is predicted by row i - 1, position 0 by its own row
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t = timesteps[i]
        s = timesteps[i + 1]

        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_token_id
            transfer_index_t_s = torch.rand(*x0.shape, generator=generator, device=x.device) < p_transfer
            if transfer_index_t_s.any():
                _, x0[transfer_index_t_s] = sample_tokens(mask_logits[transfer_index_t_s], temperature=temperature,
                                                          top_p=top_p, top_k=top_k, generator=generator)
            x[mask_index] = x0.clone()
        else:
            if alg == "maskgit_plus":
                confidence, x0 = sample_tokens(mask_logits, temperature=temperature, top_p=top_p, top_k=top_k,
                                               generator=generator)
            elif alg == "topk_margin":
                confidence, x0 = sample_tokens(mask_logits, temperature=temperature, top_p=top_p, top_k=top_k,
                                               margin_confidence=True, generator=generator)
            else:  # entropy
                confidence, x0 = sample_tokens(mask_logits, temperature, top_p=top_p, top_k=top_k,
                                               neg_entropy=True, generator=generator)
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
                else:
                    full_confidence = full_confidence / alg_temp
                    full_confidence = F.softmax(full_confidence, dim=-1)
                    transfer_index = torch.multinomial(full_confidence, num_samples=number_transfer_tokens,
                                                       generator=generator)
                x_ = torch.zeros_like(x, dtype=torch.long) + mask_token_id
                x_[mask_index] = x0.clone()
                row_indices = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(transfer_index)
                x[row_indices, transfer_index] = x_[row_indices, transfer_index]
        if history is not None:
            history.append(x.clone())
    return x
