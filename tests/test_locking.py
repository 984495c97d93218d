"""Locked decoding: the lock policy, exactness against dense decoding and the reference semantics, FLOPs."""
import pytest
import torch

import surelock_fx
from surelock_fx.backends import get_backend
from surelock_fx.lock import LockConfig, LockState, kl_divergence, log_sum_exp
from surelock_fx.reference import ReferenceModel
from surelock_fx.runtime import LockedForms, runs_packed
from surelock_fx.signature import active_index

from helpers import hf_llama_from_llada, locked_inputs, prompts, tiny_model

MASK = 100


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, n_kv_heads=2)


@pytest.fixture(scope="module")
def optimized(model):
    return surelock_fx.optimize(model)


SETTINGS = [
    dict(gen_length=16, steps=16, block_length=16),
    dict(gen_length=24, steps=12, block_length=8),
    dict(gen_length=16, steps=8, block_length=8, cfg_scale=1.5),
    dict(gen_length=16, steps=16, block_length=8, threshold=0.3),
    dict(gen_length=16, steps=16, block_length=16, logits_eos_inf=True, confidence_eos_eot_inf=True),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("B", [1, 3])
def test_unlocked_optimized_decode_equals_dense(model, optimized, settings, B):
    p = prompts(B, 5, seed=B)
    dense = surelock_fx.generate(model, p, **settings)
    fast = surelock_fx.generate(optimized, p, **settings)
    assert torch.equal(dense.tokens, fast.tokens)
    assert fast.stats.flops_ratio == 1.0


def test_unlocked_decode_with_padding_mask_equals_dense(model, optimized):
    p = prompts(2, 6, seed=7)
    mask = torch.ones_like(p)
    mask[1, :3] = 0
    kw = dict(gen_length=16, steps=16, block_length=16, attention_mask=mask)
    assert torch.equal(surelock_fx.generate(model, p, **kw).tokens, surelock_fx.generate(optimized, p, **kw).tokens)


LOCKS = [
    LockConfig(kl_threshold=5e-4),
    LockConfig(kl_threshold=5e-2),
    LockConfig(kl_threshold=1.0, confidence_gate=0.5),
    LockConfig(kl_threshold=5e-2, lock_prompt=False),
]


@pytest.mark.parametrize("lock", LOCKS, ids=repr)
@pytest.mark.parametrize("settings", SETTINGS[:4], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_locked_decode_equals_reference_semantics(model, optimized, lock, settings):
    p = prompts(3, 5, seed=11)
    fast = surelock_fx.generate(optimized, p, lock=lock, **settings)
    ref = surelock_fx.generate(ReferenceModel(model), p, lock=lock, **settings)
    assert torch.equal(fast.tokens, ref.tokens)
    assert fast.stats.active_counts == ref.stats.active_counts
    assert fast.stats.locked_counts == ref.stats.locked_counts


def test_packed_decode_computes_only_the_real_rows(model, optimized):
    """Batch rows lock at different rates: the graph computes their active rows only (packed), not
    B x M, and the decode still equals the reference semantics."""
    calls = []

    graph = optimized.forms.packed

    def recording(x, positions, index, key_mask, packed_rows, *rest):
        calls.append((len(packed_rows), index.numel()))
        return graph(x, positions, index, key_mask, packed_rows, *rest)

    recorded = optimized.with_forms(LockedForms(None, recording))

    p = prompts(3, 5, seed=11)
    kw = dict(gen_length=16, steps=16, block_length=16, lock=LockConfig(kl_threshold=5e-2))
    fast = surelock_fx.generate(recorded, p, **kw)
    assert torch.equal(fast.tokens, surelock_fx.generate(ReferenceModel(model), p, **kw).tokens)
    assert [rows for rows, _ in calls] == fast.stats.active_counts
    assert any(rows < entries for rows, entries in calls)


def test_locking_skips_work_and_is_accounted(optimized):
    p = prompts(2, 8, seed=4)
    out = surelock_fx.generate(optimized, p, gen_length=32, steps=32, block_length=32,
                               lock=LockConfig(kl_threshold=1.0))
    stats = out.stats
    N = p.shape[1] + 32
    assert stats.forward_passes == stats.steps == len(stats.active_counts) == 32
    assert [active + locked for active, locked in zip(stats.active_counts, stats.locked_counts)] == [2 * N] * 32
    assert stats.locked_counts[0] == 0 and stats.locked_counts[-1] > 0
    assert stats.locked_counts == sorted(stats.locked_counts)  # locking is permanent
    assert 0 < stats.flops_ratio < 1
    assert stats.mean_active_fraction < 1


def test_flops_follow_the_design_formula(optimized):
    cfg = optimized.config
    B, N, d, H, Hkv, dh, dff, V, L = 2, 40, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, \
        cfg.mlp_hidden_size, cfg.embedding_size, cfg.n_layers
    per_layer = (4 * B * H * N * N * dh + 2 * B * N * d * d + 2 * B * N * d * d + 4 * B * N * d * Hkv * dh
                 + 6 * B * N * d * dff)
    lm_head = 2 * B * N * d * V
    assert optimized.flops.step(B * N, N) == L * per_layer + lm_head
    out = surelock_fx.generate(optimized, prompts(B, 8), gen_length=32, steps=8, block_length=32)
    assert out.stats.flops_dense == 8 * (L * per_layer + lm_head)


def test_locked_decode_of_transformers_llama_equals_reference_semantics(model):
    llama = hf_llama_from_llada(model)
    llama.config.mask_token_id = MASK
    optimized = surelock_fx.optimize(llama)
    p = prompts(2, 5, seed=2)
    kw = dict(gen_length=16, steps=16, block_length=16, lock=LockConfig(kl_threshold=5e-2))
    reference = surelock_fx.generate(ReferenceModel(llama), p, **kw)
    assert torch.equal(surelock_fx.generate(optimized, p, **kw).tokens, reference.tokens)


def direct_kl(new, old):
    p, q = new.log_softmax(-1), old.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def test_kl_lock_rule_matches_a_direct_computation(logits_chunks):
    gen = torch.Generator().manual_seed(0)
    B, N, V = 2, 6, 11
    x = torch.full((B, N), MASK)
    x[:, :2] = 1  # prompt
    state = LockState(LockConfig(kl_threshold=0.05, lock_prompt=False), x, MASK)
    index, _ = active_index(state.locked)
    first = torch.randn(B, N, V, generator=gen)
    state.update(index, first, x != MASK)
    assert not state.locked.any()  # D_1 = +inf
    change = torch.tensor([0.3, 0.3, 0.3, 2.0, 0.3, 0.3])[:, None]  # position 3 stays unconverged
    second = first + change * torch.randn(B, N, V, generator=gen)
    unmasked = x != MASK
    unmasked[:, 2:4] = True  # decided before the second pass
    state.update(index, second, unmasked)
    kl = direct_kl(second, first)
    expected = (kl <= 0.05) & unmasked
    expected[:, :2] = False  # lock_prompt=False
    assert torch.equal(state.locked, expected)
    assert expected.any() and not expected[:, 3].any()
    assert torch.equal(state.lock_step, torch.where(expected, 1, -1))  # locked at the second update
    torch.testing.assert_close(state.lock_kl[expected], kl[expected])
    assert state.lock_kl[~expected].isnan().all()
    # A third pass: position 3, a candidate that did not lock, reuses its log-sum-exp from the second
    # update's KL; position 4, unmasked since, computes its stored row's afresh. Both against a direct KL.
    index, _ = active_index(state.locked)
    change = torch.tensor([0.2, 0.2, 0.2, 0.2, 2.0, 0.2, 0.0])[index, None]  # position 4 changes a lot
    third = (torch.stack([second[b, index[b]] for b in range(B)])
             + change * torch.randn(B, index.shape[1], V, generator=gen))
    unmasked[:, 4] = True
    state.update(index, third, unmasked)
    kl = torch.stack([direct_kl(third[b], second[b, index[b]]) for b in range(B)])
    candidate = torch.stack([unmasked[b, index[b]] for b in range(B)])
    candidate &= index >= 2
    sure = (kl <= 0.05) & candidate
    for b in range(B):
        assert torch.equal(state.lock_step[b, index[b]], torch.where(sure[b], 2, -1))
        torch.testing.assert_close(state.lock_kl[b, index[b]][sure[b]], kl[b][sure[b]])
    assert sure[index == 3].all() and not sure[index == 4].any()


def test_kl_after_a_pass_that_was_no_candidate_reads_the_stored_logits_afresh():
    """A row remasked for one pass (a sampler may remask) is stored without a KL: its next KL must
    not reuse the log-sum-exp of the logits before."""
    gen = torch.Generator().manual_seed(1)
    x = torch.full((1, 3), MASK)
    state = LockState(LockConfig(kl_threshold=1e-3), x, MASK)
    index, _ = active_index(state.locked)
    passes = [torch.randn(1, 3, 7, generator=gen) for _ in range(3)]
    passes[2] += 5.0 + 1e-3 * torch.randn(1, 3, 7, generator=gen)  # shifted: a different log-sum-exp
    for logits, unmasked in zip(passes, (False, True, False)):
        state.update(index, logits, torch.full((1, 3), unmasked))
    assert not state.locked.any()
    fourth = passes[2] + 1e-3 * torch.randn(1, 3, 7, generator=gen)
    state.update(index, fourth, torch.ones(1, 3, dtype=torch.bool))
    assert state.locked.all()
    torch.testing.assert_close(state.lock_kl[0], direct_kl(fourth[0], passes[2][0]))


def test_lock_state_hands_out_the_latest_pass_and_keeps_logits_at_lock():
    """``latest()`` maps each active position to its row of the latest pass (-1 once locked), and
    ``keep_locked_logits`` keeps a locked position's logits from the pass in which it locked."""
    gen = torch.Generator().manual_seed(8)
    B, N, V = 2, 5, 13
    x = torch.ones(B, N, dtype=torch.long)
    x[:, 3:] = MASK
    state = LockState(LockConfig(kl_threshold=1e-3, keep_locked_logits=True), x, MASK)
    first = torch.randn(B, N, V, generator=gen)
    second = first + 1e-4 * torch.randn(B, N, V, generator=gen)
    second[:, 1] += torch.randn(B, V, generator=gen)  # position 1 has not converged
    index, _ = active_index(state.locked)
    for logits in (first, second):
        state.update(index, logits.clone(), x != MASK)
        assert torch.equal(state.latest().to_dense(), logits)  # all computed, locking ones included
    locked = torch.tensor([True, False, True, False, False]).expand(B, N)
    assert torch.equal(state.locked, locked)
    assert torch.equal(state.locked_logits[locked], second[locked])
    assert state.locked_logits[~locked].isnan().all()
    index, _ = active_index(state.locked)
    third = torch.randn(B, 3, V, generator=gen)
    state.update(index, third, x != MASK)
    assert (state.latest().row[locked] == -1).all()
    assert torch.equal(state.latest().to_dense()[~locked].view(B, 3, V), third)
    assert torch.equal(state.locked_logits[locked], second[locked])  # kept from the lock pass


@pytest.mark.parametrize("config", [LockConfig(kl_threshold=0.05), LockConfig(kl_threshold=0.05, lock_prompt=False),
                                    None], ids=["lock", "prompt-unlocked", "no-lock"])
def test_release_keeps_the_rows_the_next_kl_reads_and_changes_no_decision(config):
    gen = torch.Generator().manual_seed(9)
    B, N, V = 2, 8, 17
    x = torch.full((B, N), MASK)
    x[:, :2] = 1  # prompt
    first = torch.randn(B, N, V, generator=gen)
    second = first + 0.2 * torch.randn(B, N, V, generator=gen)
    unmasked = x != MASK
    unmasked[:, 2] = True  # decided by the first step
    released, kept = LockState(config, x, MASK), LockState(config, x, MASK)
    index, _ = active_index(released.locked)
    for state in (released, kept):
        state.update(index, first.clone(), x != MASK)
    held = kept.logits
    kept.release(unmasked, 0)  # the latest rows and none new fit in B x N rows: nothing to release
    assert kept.logits is held
    released.release(unmasked, index.numel())
    assert len(released.logits) == (0 if config is None else (3 if config.lock_prompt else 1) * B)
    dense = released.latest().to_dense()
    assert torch.equal(dense[released.latest().row >= 0], first[released.latest().row >= 0])
    for state in (released, kept):
        state.update(index, second.clone(), unmasked)
    assert torch.equal(released.locked, kept.locked)
    torch.testing.assert_close(released.lock_kl, kept.lock_kl, equal_nan=True)
    assert config is None or kept.locked.any()


def test_a_graph_returning_its_previous_logits_tensor_is_a_clear_error():
    """A backend that reuses its output buffer would overwrite the logits the KL rule compares against."""
    x = torch.ones(1, 4, dtype=torch.long)
    state = LockState(LockConfig(), x, MASK)
    index, _ = active_index(state.locked)
    reused = torch.randn(1, 4, 6)
    state.update(index, reused, x != MASK)
    with pytest.raises(ValueError, match="fresh logits tensor per call"):
        state.update(index, reused, x != MASK)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_kl_divergence_matches_float64_reference(compiled):
    """Rows gathered from larger logits tensors, in any order, against a float64 KL of those rows."""
    kl = torch.compile(kl_divergence, dynamic=True) if compiled else kl_divergence
    gen = torch.Generator().manual_seed(5)
    for C, V, near in ((1, 7, False), (13, 301, False), (40, 1000, False), (40, 1000, True)):
        rows, prev_rows = torch.randperm(C + 3, generator=gen)[:C], torch.randperm(C + 5, generator=gen)[:C]
        prev_logits = 4 * torch.randn(C + 5, V, generator=gen)
        old = prev_logits[prev_rows]
        # near: a converged row, shifted by a constant (the KL is small, its float32 terms large)
        new = old + 0.01 * torch.randn(C, V, generator=gen) + 20 if near else 4 * torch.randn(C, V, generator=gen)
        logits = torch.randn(C + 3, V, generator=gen).index_copy(0, rows, new)
        p, q = new.double().softmax(-1), old.double().softmax(-1)
        expected = (p * (p.log() - q.log())).sum(-1)
        old_lse = log_sum_exp(old)
        torch.testing.assert_close(old_lse.double(), old.double().logsumexp(-1), rtol=1e-6, atol=1e-6)
        divergence, lse = kl(logits, rows, prev_logits, prev_rows, old_lse)
        torch.testing.assert_close(divergence.double(), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lse.double(), new.double().logsumexp(-1), rtol=1e-6, atol=1e-6)
        # bfloat16 logits are upcast: the KL is computed in float32
        torch.testing.assert_close(kl(logits.bfloat16(), rows, prev_logits.bfloat16(), prev_rows, old_lse)[0],
                                   kl_divergence(logits.bfloat16().float(), rows, prev_logits.bfloat16().float(),
                                                 prev_rows, old_lse)[0],
                                   rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def inductor_optimized(model):
    """``optimize(model)`` with the inductor backend, for the tests that run its compiled forms (each form
    compiles on its first call, in seconds): they share its compilations."""
    return surelock_fx.optimize(model, backend="inductor")


def test_inductor_locked_decode_equals_eager_locked_decode(inductor_optimized, optimized):
    """Inductor's decode runs its padded graph on some steps and its packed one on others."""
    p = prompts(3, 5, seed=21)
    kw = dict(gen_length=16, steps=16, block_length=16, lock=LockConfig(kl_threshold=5e-2))
    fast, eager = surelock_fx.generate(inductor_optimized, p, **kw), surelock_fx.generate(optimized, p, **kw)
    assert torch.equal(fast.tokens, eager.tokens)
    assert fast.stats.locked_counts[-1] > 0
    assert fast.stats.locked_counts == eager.stats.locked_counts
    assert 0 < fast.stats.packed_passes < fast.stats.forward_passes
    assert eager.stats.packed_passes == eager.stats.forward_passes


def test_inductor_compiles_the_locked_graph_once_for_every_active_count(inductor_optimized):
    """A decode's first pass has M = N active rows, its next ones fewer: one compiled graph serves them all
    (no duck sizing of M with N, which would specialize the first graph to M = N), here and in any decode
    that ran it before (the padded form is shared)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    gm, frozen = inductor_optimized.graph_module, inductor_optimized.forms.padded
    gen = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        for active in ([9, 9], [6, 2], [3, 3]):
            inputs = locked_inputs(gm, 9, active, gen)
            expected = gm(*inputs)[0]  # first: the compiled form writes the caches it is given
            torch.testing.assert_close(frozen(*inputs)[0], expected, rtol=1e-4, atol=1e-4)
    assert len(_debug_get_cache_entry_list(frozen.compiled._orig_mod.forward.__code__)) == 1


def decode_with_graphs(opt, prompt, graph, packed_graph, **kw):
    """generate() with a LockedRunner over ``opt``'s locked graph in the given compiled forms; also the
    (form, active index entries, active rows) each pass ran."""
    passes = []

    def recording(form, run):
        def call(x, positions, index, *rest):
            passes.append((form, index.numel(), int((index < x.shape[1]).sum())))
            return run(x, positions, index, *rest)
        return call if run is not None else None

    forms = LockedForms(recording("padded", graph), recording("packed", packed_graph))
    return surelock_fx.generate(opt.with_forms(forms), prompt, **kw), passes


def test_runner_runs_the_packed_graph_exactly_where_padding_pays(optimized):
    """Holding both forms of the locked graph, a runner runs the packed one on the steps whose padding
    reaches PACK_FROM, and decodes the tokens either form decodes alone."""
    padded = get_backend("eager").compile(optimized.graph_module)
    packed = get_backend("eager").compile(optimized.graph_module, packed=True)
    p = prompts(3, 5, seed=21)
    kw = dict(gen_length=16, steps=16, block_length=16, lock=LockConfig(kl_threshold=5e-2))
    both, passes = decode_with_graphs(optimized, p, padded, packed, **kw)
    assert [form == "packed" for form, _, _ in passes] == [runs_packed(True, True, n, real) for _, n, real in passes]
    assert 0 < both.stats.packed_passes < len(passes) == both.stats.forward_passes
    for alone in (dict(graph=padded, packed_graph=None), dict(graph=None, packed_graph=packed)):
        out, _ = decode_with_graphs(optimized, p, **alone, **kw)
        assert torch.equal(out.tokens, both.tokens)
        assert out.stats.locked_counts == both.stats.locked_counts
    with pytest.raises(ValueError, match="needs a graph"):
        LockedForms(None, None)


def test_confidence_gate_keeps_only_the_most_confident():
    B, N, V = 1, 5, 4
    x = torch.ones(B, N, dtype=torch.long)
    state = LockState(LockConfig(kl_threshold=1.0, confidence_gate=0.4), x, MASK)
    index, _ = active_index(state.locked)
    sharpness = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    logits = torch.zeros(B, N, V)
    logits[0, :, 0] = sharpness
    state.update(index, logits, x != MASK)
    state.update(index, logits.clone(), x != MASK)
    assert state.locked.tolist() == [[False, False, False, True, True]]


def test_active_index_pads_to_the_scratch_slot():
    locked = torch.tensor([[False, True, False, True], [True, True, True, True]])
    index, counts = active_index(locked, bucket=3)
    assert counts.tolist() == [2, 0]
    assert index.tolist() == [[0, 2, 4], [4, 4, 4]]


def test_bad_arguments_get_clear_errors(model):
    with pytest.raises(ValueError, match="optimize"):
        surelock_fx.generate(model, prompts(1, 3), gen_length=8, steps=8, block_length=8, lock=LockConfig())
    with pytest.raises(ValueError, match="backend"):
        surelock_fx.optimize(model, backend="tvm")
    with pytest.raises(ValueError, match="bucket"):
        surelock_fx.optimize(model, bucket=0)
    with pytest.raises(ValueError, match="kl_threshold"):
        LockConfig(kl_threshold=-1)
    with pytest.raises(ValueError, match="confidence_gate"):
        LockConfig(confidence_gate=1.5)


def test_a_schedule_decides_which_rows_each_pass_skips(model, optimized):
    """A LockSchedule's mask replaces the lock rule's from pass 1 on: each pass computes exactly the rows it
    leaves unlocked (here: the prompt from pass 1, a generated position two passes after it is unmasked)."""
    P, G = 5, 12
    seen, masks = [], []

    def schedule(step, x):
        seen.append(step)
        unmasked = x != MASK
        if step == 0:
            schedule.first = torch.where(unmasked, 0, 1 << 30)
        schedule.first = torch.where(unmasked & (schedule.first > step), step, schedule.first)
        locked = schedule.first + 2 <= step
        locked[:, :P] = step >= 1
        masks.append(locked)
        return locked

    p = prompts(3, P, seed=5)
    out = surelock_fx.generate(optimized, p, gen_length=G, steps=G, block_length=G, lock=LockConfig(),
                               schedule=schedule)
    assert seen == list(range(out.stats.forward_passes))
    assert out.stats.locked_counts == [0] + [int(m.sum()) for m in masks[1:]]
    assert out.stats.locked_counts[-1] > 3 * P
    assert out.stats.flops_computed >= out.stats.flops_locked
    with pytest.raises(ValueError, match="optimized model"):
        surelock_fx.generate(model, p, gen_length=G, steps=G, block_length=G, schedule=schedule)


def test_flops_computed_count_padding_only_where_a_pass_has_it(optimized):
    """One row: nothing is padded, the graph computes the active rows' FLOPs. Three rows locking at different
    rates: attention runs the padded queries, so the graph computes more."""
    kw = dict(gen_length=16, steps=16, block_length=16, lock=LockConfig(kl_threshold=5e-2))
    one = surelock_fx.generate(optimized, prompts(1, 5, seed=2), **kw).stats
    assert one.flops_computed == one.flops_locked < one.flops_dense
    three = surelock_fx.generate(optimized, prompts(3, 5, seed=11), **kw).stats
    assert three.flops_locked < three.flops_computed < three.flops_dense
