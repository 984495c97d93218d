"""Fast-dLLM's prefix and dual caches as active-set schedules of the locked graph, and their composition
with SureLock, against references that share no code with surelock_fx's runtime.

``fastdllm_generate`` below transcribes Fast-dLLM's ``generate_with_prefix_cache`` and
``generate_with_dual_cache`` (LLaDA, temperature 0, low-confidence remasking) on transformers'
bidirectional Llama with its own K/V cache: at each block start a full pass whose logits serve the block's
first step; then the block and the suffix over the prefix's cached K/V ("prefix"), or the block alone over
the prefix's and the suffix's cached K/V ("dual": attention does not depend on the order of its keys,
so the cache holds them side by side and the block's fresh K/V are appended). As in our sampler, the mask
token is never proposed, and confidences are float32 softmax probabilities as in LLaDA's sampler.
"""
import pytest
import torch
from transformers import DynamicCache

import surelock_fx
from surelock_fx.lock import LockConfig, LockState
from surelock_fx.reference import ReferenceModel
from surelock_fx.runtime import LockedForms

from helpers import hf_llama_from_llada, prompts, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
MASK = 100


# --- the reference -------------------------------------------------------------------------------

def num_transfer_tokens(mask_index, steps):
    count = mask_index.sum(dim=1, keepdim=True)
    base, remainder = count // steps, count % steps
    out = base.expand(-1, steps).clone()
    for row in range(out.shape[0]):
        out[row, : remainder[row]] += 1
    return out


def transfer_index(logits, mask_index, x, k, threshold):
    """Fast-dLLM's get_transfer_index at temperature 0: top-k confident masked positions, or with a
    threshold the most confident one and every other one at or above it."""
    proposable = logits.clone()
    proposable[..., MASK] = -torch.inf
    x0 = torch.where(mask_index, proposable.argmax(-1), x)
    p = torch.softmax(logits, dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    confidence = torch.where(mask_index, p, -torch.inf)
    if threshold is not None:
        k = mask_index.sum(dim=1)
    transfer = torch.zeros_like(mask_index)
    for row in range(x.shape[0]):
        _, chosen = torch.topk(confidence[row], k=int(k[row]))
        transfer[row, chosen] = True
        if threshold is not None:
            for other in chosen[1:]:
                if confidence[row, other] < threshold:
                    transfer[row, other] = False
    return x0, transfer


def sliced_cache(past, keep):
    """A DynamicCache holding the positions ``keep`` (a list of slices) of every layer of ``past``."""
    cache = DynamicCache()
    for i, layer in enumerate(past.layers):
        cache.update(torch.cat([layer.keys[:, :, s] for s in keep], 2),
                     torch.cat([layer.values[:, :, s] for s in keep], 2), i)
    return cache


def fastdllm_generate(hf, prompt, *, gen_length, steps, block_length, cache, threshold=None):
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, gen_length), MASK)], dim=1)
    N = x.shape[1]
    blocks = gen_length // block_length
    per_block = steps // blocks
    with torch.no_grad():
        for block in range(blocks):
            s, e = P + block * block_length, P + (block + 1) * block_length
            k = num_transfer_tokens(x[:, s:e] == MASK, per_block)
            out = hf(x, use_cache=True)
            mask_index = x == MASK
            mask_index[:, e:] = False
            x0, transfer = transfer_index(out.logits, mask_index, x, k[:, 0], threshold)
            x[transfer] = x0[transfer]
            i = 1
            while (x[:, s:e] == MASK).any() and (threshold is not None or i < per_block):
                end = N if cache == "prefix" else e
                keep = [slice(0, s)] if cache == "prefix" else [slice(0, s), slice(e, N)]
                positions = torch.arange(s, end).expand(B, -1)
                logits = hf(x[:, s:end], past_key_values=sliced_cache(out.past_key_values, keep),
                            position_ids=positions, use_cache=True).logits
                mask_index = x[:, s:end] == MASK
                mask_index[:, block_length:] = False
                x0, transfer = transfer_index(logits, mask_index, x[:, s:end], k[:, i], threshold)
                x[:, s:end][transfer] = x0[transfer]
                i += 1
    return x


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, n_kv_heads=2)


@pytest.fixture(scope="module")
def hf(model):
    return hf_llama_from_llada(model)


@pytest.fixture(scope="module")
def eager(model):
    return surelock_fx.optimize(model)


SETTINGS = [
    dict(gen_length=16, steps=16, block_length=8),
    dict(gen_length=24, steps=12, block_length=8),
    dict(gen_length=16, steps=16, block_length=16),
    dict(gen_length=16, steps=16, block_length=4, threshold=0.3),
    dict(gen_length=24, steps=24, block_length=8, threshold=0.6),
]


def settings_id(settings):
    return "-".join(f"{k}={v}" for k, v in settings.items())


# --- the policies against the reference -------------------------------------------------------

@pytest.mark.parametrize("settings", SETTINGS, ids=settings_id)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_policy_decodes_fastdllm_reference_tokens(model, hf, eager, cache, B, settings):
    p = prompts(B, 5, seed=B + len(settings))
    want = fastdllm_generate(hf, p, cache=cache, **settings)
    got = surelock_fx.generate(eager, p, cache=cache, **settings)
    assert torch.equal(got.tokens, want)
    assert torch.equal(surelock_fx.generate(model, p, cache=cache, **settings).tokens, want)  # the dense reference


@pytest.mark.parametrize("backend", ["inductor", "onnxruntime"])
def test_other_backends_decode_the_policies_exactly(model, hf, eager, backend):
    """The same compiled graph serves every policy: one optimize() per backend decodes each policy as
    Fast-dLLM's reference does, and each locked policy as eager does."""
    optimized = surelock_fx.optimize(model, backend=backend)
    p = prompts(3, 5, seed=9)
    for cache, settings in (("prefix", SETTINGS[0]), ("dual", SETTINGS[3]), ("dual", SETTINGS[0])):
        plain = surelock_fx.generate(optimized, p, cache=cache, **settings)
        assert torch.equal(plain.tokens, fastdllm_generate(hf, p, cache=cache, **settings))
        kw = dict(cache=cache, lock=LockConfig(kl_threshold=5e-2), **settings)
        want = surelock_fx.generate(eager, p, **kw)
        got = surelock_fx.generate(optimized, p, **kw)
        assert torch.equal(got.tokens, want.tokens)
        assert got.stats.active_counts == want.stats.active_counts


def test_policies_compute_the_rows_they_name(eager):
    """Per pass: every row at a block start, then the block and the suffix (prefix) or the block (dual)."""
    p = prompts(2, 4)
    for cache, per_step in (("prefix", lambda lo: 2 * (20 - lo)), ("dual", lambda lo: 2 * 8)):
        out = surelock_fx.generate(eager, p, gen_length=16, steps=8, block_length=8, cache=cache)
        assert out.stats.active_counts == [2 * 20] + [per_step(4)] * 3 + [2 * 20] + [per_step(12)] * 3


# --- composed with SureLock ----------------------------------------------------------------------

@pytest.mark.parametrize("settings", [SETTINGS[0], SETTINGS[3], dict(gen_length=16, steps=8, block_length=8,
                                                                      cfg_scale=1.0)], ids=settings_id)
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_locked_policy_equals_the_reference_semantics(model, eager, cache, settings):
    """Rows outside the active set (locked, or left out by the policy) attend with the K/V of the last pass
    that computed them; a row's KL compares its two latest computations."""
    p = prompts(3, 5, seed=13)
    kw = dict(cache=cache, lock=LockConfig(kl_threshold=5e-2), **settings)
    got = surelock_fx.generate(eager, p, **kw)
    want = surelock_fx.generate(ReferenceModel(model), p, **kw)
    assert torch.equal(got.tokens, want.tokens)
    assert got.stats.active_counts == want.stats.active_counts
    assert torch.equal(got.stats.lock_state.lock_step, want.stats.lock_state.lock_step)
    assert got.stats.locked_counts[-1] > 3 * 5  # rows locked


def test_a_refresh_never_recomputes_a_locked_row(eager):
    passes = []

    def recording(x, positions, index, key_mask, *rest):
        passes.append(index.clone())
        return eager.forms.packed(x, positions, index, key_mask, *rest)

    p = prompts(2, 6, seed=4)
    out = surelock_fx.generate(eager.with_forms(LockedForms(None, recording)), p, gen_length=24, steps=24,
                               block_length=8, cache="prefix", lock=LockConfig(kl_threshold=5e-2))
    lock_step = out.stats.lock_state.lock_step
    N = p.shape[1] + 24
    for t, index in enumerate(passes):
        for b in range(2):
            rows = index[b][index[b] < N]
            assert not ((lock_step[b, rows] >= 0) & (lock_step[b, rows] < t)).any()
    block_starts = [0, 8, 16]
    assert all(out.stats.active_counts[t] < 2 * N for t in block_starts[1:])  # locked rows skipped by refreshes
    assert ((lock_step[:, :6] >= 8) & (lock_step[:, :6] >= 0)).any()  # prompt rows locked at a later refresh


def test_held_logits_serve_the_kl_of_a_row_a_pass_left_out():
    """A row computed at pass 0, left out at pass 1 and computed again at pass 2 with the same logits has
    KL 0 against its pass-0 logits (held), and locks; without a policy nothing is held."""
    B, N, V = 1, 4, 6
    x = torch.ones(B, N, dtype=torch.long)
    state = LockState(LockConfig(kl_threshold=1e-6), x, MASK)
    logits = torch.randn(B, N, V, generator=torch.Generator().manual_seed(0))
    everything = torch.ones(B, N, dtype=torch.bool)
    state.update(torch.arange(N)[None], logits, x != MASK)
    assert state.held is None
    some = torch.tensor([[True, True, False, False]])
    state.hold(some, x != MASK)
    assert state.held.shape == (2, V)
    state.update(torch.tensor([[0, 1]]), torch.randn(B, 2, V), x != MASK)
    assert not state.locked.any()
    state.hold(everything, x != MASK)
    state.update(torch.arange(N)[None], torch.cat([torch.randn(B, 2, V), logits[:, 2:]], dim=1), x != MASK)
    assert state.locked.tolist() == [[False, False, True, True]]


def test_no_logits_are_held_without_a_policy(eager):
    out = surelock_fx.generate(eager, prompts(2, 5), gen_length=16, steps=16, block_length=8,
                               lock=LockConfig(kl_threshold=5e-2))
    assert out.stats.lock_state.held is None and out.stats.locked_counts[-1] > 0


def test_bad_cache_gets_a_clear_error(eager):
    with pytest.raises(ValueError, match="cache must be one of"):
        surelock_fx.generate(eager, prompts(1, 3), gen_length=8, steps=8, block_length=8, cache="both")
