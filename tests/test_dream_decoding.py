"""LLaDA's sampler (``surelock_fx.generate``) on Dream, whose logits row p - 1 predicts position p (position 0 its
own row): the shift against a hand-written loop, locked decodes against the dense reference semantics under every
cache policy, the frozen predictions of locked rows whose next position is still masked (``LockState``'s
``keep_predictions``), the cache rows one row early (``cache_rows(..., shift=1)``), and LLaDA left as it was.

``hand_generate`` shares no code with surelock_fx: a full forward each step, the logits shifted (or not) by hand,
LLaDA's transfer schedule (masked count // steps per step, the first count % steps steps one more) and its top-k
of softmax confidences, the mask token never proposed, as ``sampler.step_candidates`` does.
"""
import pytest
import torch

import surelock_fx
from surelock_fx import runtime
from surelock_fx.lock import LockConfig, LockState
from surelock_fx.reference import ReferenceModel
from surelock_fx.sampler import cache_rows

from helpers import prompts, tiny_dream, tiny_model

MASK, PAD = 100, 99
P = 6


@pytest.fixture(scope="module")
def dream():
    return tiny_dream(seed=1)  # seed 3 decodes left to right, repeating one token: no row locks before the next


@pytest.fixture(scope="module")
def optimized(dream):
    return surelock_fx.optimize(dream)


@pytest.fixture(scope="module")
def llada():
    return tiny_model(seed=3)


def batch(kind: str, seed: int):
    """(prompt [B, P], attention mask or None): "B1", or "B3-left-padded" (rows padded by 0, 2 and 4 PADs)."""
    if kind == "B1":
        return prompts(1, P, seed), None
    ids = prompts(3, P, seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 2, 4)):
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    return ids, mask


def hand_positions(mask: torch.Tensor) -> torch.Tensor:
    """Dream's positions of a left-padded batch, one token at a time: real tokens count the real tokens before
    them, padding gets 1."""
    positions = torch.ones_like(mask)
    for b in range(mask.shape[0]):
        seen = 0
        for n in range(mask.shape[1]):
            if mask[b, n]:
                positions[b, n] = seen
                seen += 1
    return positions


def hand_generate(model, prompt, mask, *, gen_length, steps, block_length, shift=True):
    """Greedy low-confidence decoding with a full forward per step; ``shift`` (Dream): position p reads row p - 1,
    and left-padded rows take Dream's positions (else 0..N-1, as LLaDA's)."""
    B, prompt_length = prompt.shape
    x = torch.cat([prompt, torch.full((B, gen_length), MASK)], dim=1)
    N = x.shape[1]
    full_mask = None if mask is None else torch.cat([mask, torch.ones(B, gen_length, dtype=mask.dtype)], dim=1)
    positions = torch.arange(N).expand(B, N) if mask is None or not shift else hand_positions(full_mask)
    blocks = gen_length // block_length
    per_block = steps // blocks
    with torch.no_grad():
        for block in range(blocks):
            lo, hi = prompt_length + block * block_length, prompt_length + (block + 1) * block_length
            count = (x[:, lo:hi] == MASK).sum(1)
            schedule = [[int(count[b]) // per_block + (s < int(count[b]) % per_block) for s in range(per_block)]
                        for b in range(B)]
            for step in range(per_block):
                raw = model(x, attention_mask=full_mask, position_ids=positions)
                logits = torch.cat([raw[:, :1], raw[:, :-1]], dim=1) if shift else raw
                proposable = logits.clone()
                proposable[..., MASK] = -torch.inf
                x0 = proposable.argmax(-1)
                p = torch.softmax(logits.float(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
                live = x == MASK
                live[:, hi:] = False
                confidence = torch.where(live, p, -torch.inf)
                for b in range(B):
                    _, chosen = torch.topk(confidence[b], k=schedule[b][step])
                    x[b, chosen] = x0[b, chosen]
    return x


# --- 1. the shift, against the hand-written loop ---------------------------------------------------------

SHIFT_CASES = [
    dict(gen_length=8, steps=8, block_length=8),  # one block, one token a step
    dict(gen_length=10, steps=4, block_length=5),  # two blocks, 3 then 2 tokens (a remainder)
    dict(gen_length=12, steps=6, block_length=6),  # two blocks, 2 tokens a step
]
KINDS = ["B1", "B3-left-padded"]


def case_id(settings):
    return "-".join(f"{k}={v}" for k, v in settings.items())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("settings", SHIFT_CASES, ids=case_id)
def test_generate_reads_dream_logits_shifted(dream, settings, kind):
    ids, mask = batch(kind, seed=len(kind) + settings["gen_length"])
    want = hand_generate(dream, ids, mask, **settings)
    got = surelock_fx.generate(dream, ids, attention_mask=mask, **settings)
    assert torch.equal(got.tokens, want)
    assert not (got.tokens == MASK).any()


def test_the_unshifted_reading_decodes_other_tokens(dream):
    """The hand loop discriminates: reading row p for position p decodes other tokens."""
    differs = []
    for settings in SHIFT_CASES:
        for kind in KINDS:
            ids, mask = batch(kind, seed=len(kind) + settings["gen_length"])
            shifted = hand_generate(dream, ids, mask, **settings)
            differs.append(not torch.equal(shifted, hand_generate(dream, ids, mask, shift=False, **settings)))
    assert all(differs), differs


# --- 2. locked decodes against the reference semantics ----------------------------------------------------

def frozen_reads(lock_state, unmask_step):
    """(b, p, u, t): position p of batch row b locked at update u, its next position still masked until it was
    committed at step t > u, so that passes u + 1 .. t read p + 1 from row p's frozen logits."""
    found = []
    B, N = lock_state.lock_step.shape
    for b in range(B):
        for p in range(N - 1):
            u, t = int(lock_state.lock_step[b, p]), int(unmask_step[b, p + 1])
            if u >= 0 and t > u:
                found.append((b, p, u, t))
    return found


DECODE = dict(gen_length=16, steps=16, block_length=4)  # four blocks
LOCK = LockConfig(kl_threshold=5e-2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("threshold", [None, 0.3])  # 0.3: several tokens in some steps (0.5: one per step)
@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_locked_dream_decode_equals_reference_semantics(dream, optimized, cache, threshold, kind):
    ids, mask = batch(kind, seed=7)
    kw = dict(attention_mask=mask, cache=cache, threshold=threshold, lock=LOCK, **DECODE)
    fast = surelock_fx.generate(optimized, ids, **kw)
    ref = surelock_fx.generate(ReferenceModel(dream), ids, **kw)
    assert torch.equal(fast.tokens, ref.tokens)
    assert fast.stats.active_counts == ref.stats.active_counts
    assert torch.equal(fast.stats.lock_state.lock_step, ref.stats.lock_state.lock_step)
    assert fast.stats.flops_ratio < 1, "nothing locked"
    assert frozen_reads(fast.stats.lock_state, fast.stats.unmask_step), "no frozen prediction was read"
    assert not (fast.tokens == MASK).any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_unlocked_optimized_dream_equals_plain_dream(dream, optimized, cache, kind):
    """Locking off, the rewritten graph decodes what the plain model does (with a cache policy: by the dense
    reference semantics); without a policy both equal the hand loop."""
    ids, mask = batch(kind, seed=8)
    kw = dict(attention_mask=mask, cache=cache, **DECODE)
    plain = surelock_fx.generate(dream, ids, **kw)
    fast = surelock_fx.generate(optimized, ids, **kw)
    assert torch.equal(fast.tokens, plain.tokens)
    state = fast.stats.lock_state
    assert not state.locked.any() and state.frozen is None and (state.lock_step == -1).all()
    assert fast.stats.flops_ratio == 1.0 if cache is None else fast.stats.flops_ratio < 1  # a policy skips rows
    if cache is None:
        assert torch.equal(plain.tokens, hand_generate(dream, ids, mask, **DECODE))


# --- 3. frozen predictions ----------------------------------------------------------------------------------

class Recording:
    """A Decodable running ``inner``'s runner and recording each pass's input and returned logits (dense)."""

    def __init__(self, inner):
        self.inner, self.config, self.passes = inner, inner.config, []

    def decode_runner(self, lock, stats, schedule=None):
        run = self.inner.decode_runner(lock, stats, schedule)

        def call(x, attention_mask, rows=None):
            out = run(x, attention_mask) if rows is None else run(x, attention_mask, rows)
            self.passes.append((x.clone(), out.to_dense()))
            return out

        return call


@pytest.mark.parametrize("cache", [None, "dual"])
def test_locked_rows_hand_their_frozen_predictions_to_the_next_position(dream, optimized, cache):
    ids, mask = batch("B3-left-padded", seed=5)
    kw = dict(attention_mask=mask, cache=cache, lock=LockConfig(kl_threshold=5e-2, keep_locked_logits=True),
              **DECODE)
    recorded = Recording(optimized)
    fast = surelock_fx.generate(recorded, ids, **kw)
    ref = surelock_fx.generate(ReferenceModel(dream), ids, **kw)
    assert torch.equal(fast.tokens, ref.tokens)
    state = fast.stats.lock_state
    assert len(recorded.passes) == fast.stats.steps  # one pass a step: update u is step u
    reads = frozen_reads(state, fast.stats.unmask_step)
    assert any(p == P - 1 for _, p, _, _ in reads)  # the prompt's last row, predicting the first generated token
    assert any(p >= P for _, p, _, _ in reads)  # a generated position, locked before the one after it
    for b, p, u, t in reads:
        for later in range(u + 1, t + 1):
            x, logits = recorded.passes[later]
            assert x[b, p + 1] == MASK
            assert torch.equal(logits[b, p], state.locked_logits[b, p])  # the logits of the pass it locked in
    torch.testing.assert_close(state.locked_logits, ref.stats.lock_state.locked_logits, equal_nan=True,
                               rtol=1e-4, atol=1e-4)


def test_without_frozen_predictions_a_locked_dream_decode_cannot_read(optimized, monkeypatch):
    """The frozen predictions are what a locked Dream decode reads: a runner keeping none fails to read the
    position after a locked row."""
    monkeypatch.setattr(runtime, "predicts_next", lambda config: False)
    ids, mask = batch("B3-left-padded", seed=5)
    with pytest.raises(ValueError, match="no logits for a position the sampler reads"):
        surelock_fx.generate(optimized, ids, attention_mask=mask, lock=LOCK, **DECODE)


def test_a_schedule_that_skips_the_prompt_decodes_dream(optimized):
    """A schedule skipping the prompt from pass 1 (as test_locking's does on LLaDA): Dream's first generated
    position is read from the prompt's last row, which the schedule skips."""
    def schedule(step, x):
        locked = torch.zeros_like(x, dtype=torch.bool)
        locked[:, :P] = step >= 1
        return locked

    recorded = Recording(optimized)
    out = surelock_fx.generate(recorded, prompts(2, P, seed=11), gen_length=8, steps=8, block_length=8,
                               lock=LockConfig(), schedule=schedule)
    assert not (out.tokens == MASK).any()
    first = recorded.passes[0][1]
    read = 0
    for x, logits in recorded.passes[1:]:
        for b in range(2):
            if x[b, P] == MASK:  # read from the prompt's last row, as it was when the schedule first skipped it
                assert torch.equal(logits[b, P - 1], first[b, P - 1])
                read += 1
    assert read, "the first generated position was decided at the first pass"


def lock_state_case(keep_predictions: bool):
    """A LockState over x = [prompt, prompt, mask, mask, mask] after two passes whose rows 0 and 1 agree (KL 0),
    so that both lock at update 1: row 0's next position is the prompt, row 1's is masked."""
    gen = torch.Generator().manual_seed(0)
    B, N, V = 1, 5, 7
    x = torch.tensor([[3, 4, MASK, MASK, MASK]])
    state = LockState(LockConfig(kl_threshold=1e-6), x, MASK, keep_predictions=keep_predictions)
    first = torch.randn(B, N, V, generator=gen)
    second = torch.randn(B, N, V, generator=gen)
    second[:, :2] = first[:, :2]
    everything = torch.arange(N)[None]
    state.update(everything, first, x != MASK)
    state.update(everything, second.clone(), x != MASK)
    assert state.locked.tolist() == [[True, True, False, False, False]]
    return state, x, second, gen


def test_lock_state_freezes_a_locked_rows_prediction_while_its_next_position_is_masked():
    state, x, second, gen = lock_state_case(keep_predictions=True)
    assert state.frozen_row.tolist() == [[-1, 0, -1, -1, -1]]  # row 0's next position is decided: not kept
    assert torch.equal(state.frozen, second[0, 1:2])
    third = torch.randn(1, 3, 7, generator=gen)
    state.update(torch.tensor([[2, 3, 4]]), third.clone(), x != MASK)
    latest = state.latest()
    assert latest.row[0, 0] == -1  # locked, its next position decided: nothing to read
    assert torch.equal(latest.rows[latest.row[0, 1]], second[0, 1])  # the frozen row, exactly
    assert torch.equal(latest.to_dense()[0, 2:], third[0])
    # position 2 decided; at the next update the frozen row is dropped
    x = x.clone()
    x[0, 2] = 11
    state.update(torch.tensor([[2, 3, 4]]), torch.randn(1, 3, 7, generator=gen), x != MASK)
    assert state.frozen_row.tolist() == [[-1, -1, -1, -1, -1]]
    assert state.frozen is None
    assert state.latest().row[0, 1] == -1


def test_lock_state_freezes_nothing_without_keep_predictions():
    state, x, _, gen = lock_state_case(keep_predictions=False)
    state.update(torch.tensor([[2, 3, 4]]), torch.randn(1, 3, 7, generator=gen), x != MASK)
    assert state.frozen is None
    assert (state.frozen_row == -1).all()
    assert state.latest().row[0, :2].tolist() == [-1, -1]


# --- 4. the cache rows of a model that predicts the next position --------------------------------------------

def test_cache_rows_start_one_row_before_the_block():
    shape = (2, 12)
    for cache in ("prefix", "dual"):
        assert cache_rows(cache, 0, shape, 4, 8, shift=1) is None  # the block's first pass computes everything
    assert cache_rows(None, 3, shape, 4, 8, shift=1) is None
    prefix = cache_rows("prefix", 2, shape, 4, 8, shift=1)
    assert prefix.shape == shape
    assert prefix[0].tolist() == [n >= 3 for n in range(12)]
    dual = cache_rows("dual", 1, shape, 4, 8, shift=1)
    assert dual[1].tolist() == [3 <= n < 8 for n in range(12)]  # row lo - 1, no earlier prefix row
    assert cache_rows("dual", 1, shape, 4, 8)[0].tolist() == [4 <= n < 8 for n in range(12)]  # LLaDA: no shift
    assert cache_rows("prefix", 1, shape, 0, 4, shift=1)[0].all()  # clamped at 0
    assert cache_rows("dual", 1, shape, 0, 4, shift=1)[0].tolist() == [n < 4 for n in range(12)]


@pytest.mark.parametrize("model_name", ["dream", "llada"])
def test_cache_passes_compute_the_row_predicting_the_block(request, model_name):
    """Per pass, locking off: every row at a block start, then from one row before the block (Dream) or the
    block's start (LLaDA) to the end ("prefix") or the block's end ("dual"), in the reference semantics."""
    model = request.getfixturevalue(model_name)
    shift = int(model_name == "dream")
    ids = prompts(2, 4)
    N, B = 4 + 16, 2
    for cache, count in (("prefix", lambda lo: B * (N - lo + shift)), ("dual", lambda lo: B * (8 + shift))):
        out = surelock_fx.generate(model, ids, gen_length=16, steps=8, block_length=8, cache=cache)
        assert out.stats.active_counts == [B * N] + [count(4)] * 3 + [B * N] + [count(12)] * 3


# --- 5. LLaDA is unaffected ----------------------------------------------------------------------------------

def test_llada_reads_its_logits_unshifted_and_freezes_nothing(llada):
    ids, mask = batch("B3-left-padded", seed=2)
    settings = SHIFT_CASES[1]
    plain = surelock_fx.generate(llada, ids, attention_mask=mask, **settings)
    assert torch.equal(plain.tokens, hand_generate(llada, ids, mask, shift=False, **settings))
    optimized = surelock_fx.optimize(llada)
    kw = dict(attention_mask=mask, cache="dual", lock=LOCK, **DECODE)
    fast = surelock_fx.generate(optimized, ids, **kw)
    ref = surelock_fx.generate(ReferenceModel(llada), ids, **kw)
    assert torch.equal(fast.tokens, ref.tokens)
    assert fast.stats.active_counts == ref.stats.active_counts
    assert fast.stats.flops_ratio < 1
    for state in (fast.stats.lock_state, ref.stats.lock_state):
        assert state.keep_predictions is False and state.frozen is None
        assert (state.frozen_row == -1).all()
