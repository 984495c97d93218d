"""surelock_fx.diffusion_generate (Dream-v0's sampler) against ``dream_reference``, an independent transcription of
the official ``diffusion_generate``: token for token, for every alg, greedy and sampled (the same seeded
generator for both: ``dream_reference`` fixes the order of the draws), top_p / top_k, left padding; the
optimized model with locking off and on; and the rejection of bad arguments.

The sampler's rules do not depend on the model family: every test runs on a tiny random LLaDA whose config is
made to read its logits shifted (position i predicted by row i - 1, as Dream's), and on a tiny random Dream.
Our models take the [B, N] key mask where Dream builds a 4-D one; the two differ only in the query rows of
padding positions, which no step reads (see ``dream_reference``).
"""
import dataclasses

import pytest
import torch

import surelock_fx
from surelock_fx import models as model_families

from dream_reference import ALGS, attention_inputs, dream_generate, sample_tokens, top_k_logits, top_p_logits
from helpers import tiny_config, tiny_dream_config

MASK, PAD, VOCAB = 100, 99, 101
FAMILIES = ["dream"]  # the family whose rules these are (LLaDA with the flags set ran them too, in review)
needs_api = pytest.mark.skipif(not hasattr(surelock_fx, "diffusion_generate"),
                               reason="surelock_fx.diffusion_generate is not there yet")


def shifted_llada(seed: int):
    """A tiny random LLaDA whose config reads as Dream's: its logits shifted, and left-padded rows given the
    positions of their real tokens (``shifted_logits`` and ``positions_skip_padding`` are class constants of the
    frozen LLaDAConfig: set on this one instance), so that Dream's reading is exercised. (With RoPE and padding
    keys masked, positions shifted by the padding give the same logits up to rounding anyway.)"""
    model = model_families.random_llada(tiny_config(), seed=seed)
    for flag in ("shifted_logits", "positions_skip_padding"):
        object.__setattr__(model.config, flag, True)
        assert getattr(model.config, flag) is True and getattr(type(model.config), flag) is False
    return model


def make_model(family: str, seed: int = 0):
    if family == "llada":
        return shifted_llada(seed)
    model = model_families.random_dream(tiny_dream_config(), seed=seed)
    assert model.config.shifted_logits is True and model.config.positions_skip_padding is True
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return make_model(request.param, seed=7)


@pytest.fixture(scope="module")
def optimized(model):
    return surelock_fx.optimize(model)


def plain_forward(model):
    return lambda x, attention_mask, position_ids: model(x, attention_mask=attention_mask, position_ids=position_ids)


def batch(kind: str, seed: int, P: int = 6):
    """(input_ids, attention_mask or None) of a batch: "B1", "B3", or "B3-left-padded" (0, 2 and 4 padding
    positions of PAD on the left, mask 0 there). Fresh random prompt ids below the special ids (97 and up)."""
    gen = torch.Generator().manual_seed(seed)
    B = 1 if kind == "B1" else 3
    ids = torch.randint(0, 97, (B, P), generator=gen)
    if kind != "B3-left-padded":
        return ids, None
    mask = torch.ones(B, P, dtype=torch.long)
    for row, pad in enumerate((0, 2, 4)):
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    return ids, mask


def run_reference(model, ids, mask, seed, **kw):
    history = []
    tokens = dream_generate(plain_forward(model), ids, model.config.mask_token_id, mask,
                            generator=torch.Generator().manual_seed(seed), history=history, **kw)
    return tokens, history


def run_ours(model, ids, mask, seed, **kw):
    return surelock_fx.diffusion_generate(model, ids, attention_mask=mask,
                                          generator=torch.Generator().manual_seed(seed), **kw)


def describe_mismatch(ours: torch.Tensor, expected: torch.Tensor, history, prompt_length: int) -> str:
    """Where two final sequences differ, and the reference step at which each differing position was set."""
    if ours.shape != expected.shape:
        return f"shape {tuple(ours.shape)} != reference {tuple(expected.shape)}"
    diff = (ours != expected).nonzero().tolist()
    details = []
    for b, n in diff[:8]:
        step = next((i for i, x in enumerate(history) if x[b, n] != MASK), None)
        details.append(f"(row {b}, position {n} = generated {n - prompt_length}: ours {ours[b, n].item()}, "
                       f"reference {expected[b, n].item()}, set by reference step {step})")
    return f"{len(diff)} positions differ; first: " + ", ".join(details)


def assert_same_tokens(ours, expected, history, prompt_length):
    assert torch.equal(ours, expected), describe_mismatch(ours, expected, history, prompt_length)


# --- the cases --------------------------------------------------------------------------------

ALG_SETTINGS = [("origin", None), ("maskgit_plus", None), ("maskgit_plus", 0.5), ("topk_margin", None),
                ("topk_margin", 0.5), ("entropy", None), ("entropy", 0.5)]
TEMPERATURES = [0.0, 0.8]
FILTERS = [dict(), dict(top_p=0.9), dict(top_k=5), dict(top_p=0.8, top_k=12)]
BATCHES = ["B1", "B3", "B3-left-padded"]
LENGTHS = [dict(steps=12, max_new_tokens=12), dict(steps=5, max_new_tokens=12)]  # steps == and < max_new_tokens


def cases():
    for a, (alg, alg_temp) in enumerate(ALG_SETTINGS):
        for t, temperature in enumerate(TEMPERATURES):
            for f, filters in enumerate(FILTERS):
                for b, kind in enumerate(BATCHES):
                    lengths = LENGTHS[(f + b) % 2]  # each length with every alg, temperature and batch kind
                    settings = dict(alg=alg, alg_temp=alg_temp, temperature=temperature, **filters, **lengths)
                    name = "-".join(f"{k}={v}" for k, v in settings.items()) + f"-{kind}"
                    yield pytest.param(settings, kind, 100 * a + 10 * t + 3 * f + b, id=name)


@needs_api
@pytest.mark.parametrize("settings,kind,seed", list(cases()))
def test_matches_reference(model, settings, kind, seed):
    ids, mask = batch(kind, seed)
    expected, history = run_reference(model, ids, mask, seed, **settings)
    out = run_ours(model, ids, mask, seed, **settings)
    assert_same_tokens(out.tokens, expected, history, ids.shape[1])


@needs_api
@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("steps,max_new_tokens", [(1, 8), (16, 8)])  # one step; more steps than tokens
def test_matches_reference_at_extreme_step_counts(model, alg, temperature, steps, max_new_tokens):
    ids, mask = batch("B3-left-padded", seed=steps)
    kw = dict(alg=alg, temperature=temperature, steps=steps, max_new_tokens=max_new_tokens)
    expected, history = run_reference(model, ids, mask, 5, **kw)
    assert_same_tokens(run_ours(model, ids, mask, 5, **kw).tokens, expected, history, ids.shape[1])


@needs_api
def test_all_ones_attention_mask_is_no_mask(model):
    """A mask without zeros is full attention and positions 0..N-1, as no mask (Dream's "full")."""
    ids, _ = batch("B3", seed=11)
    kw = dict(alg="maskgit_plus", steps=6, max_new_tokens=6)
    with_ones = run_ours(model, ids, torch.ones_like(ids), 0, **kw).tokens
    assert torch.equal(with_ones, run_ours(model, ids, None, 0, **kw).tokens)
    assert torch.equal(with_ones, run_reference(model, ids, None, 0, **kw)[0])


# --- the optimized model, locking off and on ---------------------------------------------------------

@needs_api
@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("kind", ["B1", "B3-left-padded"])
def test_unlocked_optimized_equals_plain(model, optimized, alg, kind):
    ids, mask = batch(kind, seed=21)
    kw = dict(alg=alg, steps=8, max_new_tokens=12)
    plain = run_ours(model, ids, mask, 0, **kw).tokens
    assert torch.equal(run_ours(optimized, ids, mask, 0, lock=None, **kw).tokens, plain)


LOCKED_CASES = [
    dict(alg="origin", temperature=0.0),
    dict(alg="maskgit_plus", temperature=0.0),
    dict(alg="entropy", temperature=0.0, alg_temp=0.5),
    dict(alg="topk_margin", temperature=0.8, top_p=0.9),
]


@needs_api
@pytest.mark.parametrize("settings", LOCKED_CASES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("kind", ["B1", "B3-left-padded"])
def test_locked_optimized_equals_reference_semantics(model, optimized, settings, kind):
    from surelock_fx.lock import LockConfig
    from surelock_fx.reference import ReferenceModel

    ids, mask = batch(kind, seed=31)
    kw = dict(steps=16, max_new_tokens=16, lock=LockConfig(kl_threshold=5e-2), **settings)
    fast = run_ours(optimized, ids, mask, 3, **kw)
    reference = run_ours(ReferenceModel(model), ids, mask, 3, **kw)
    assert torch.equal(fast.tokens, reference.tokens)
    assert fast.stats.flops_ratio is not None and fast.stats.flops_ratio < 1, "nothing was locked"


# --- bad arguments ----------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (dict(steps=0), r"\bsteps\b"),
    (dict(steps=-2), r"\bsteps\b"),
    (dict(max_new_tokens=0), r"\bmax_new_tokens\b"),
    (dict(max_new_tokens=-4), r"\bmax_new_tokens\b"),
    (dict(alg="greedy"), r"\balg\b"),
    (dict(alg_temp=-0.5), r"\balg_temp\b"),
    (dict(top_p=0.0), r"\btop_p\b"),
    (dict(top_p=1.5), r"\btop_p\b"),
    (dict(top_p=-0.1), r"\btop_p\b"),
    (dict(top_k=0), r"\btop_k\b"),
    (dict(top_k=-3), r"\btop_k\b"),
]


@needs_api
@pytest.mark.parametrize("change,names", BAD_ARGUMENTS, ids=lambda c: str(c))
def test_bad_arguments_raise_naming_the_argument(model, change, names):
    ids, _ = batch("B1", seed=0)
    kw = {**dict(steps=4, max_new_tokens=4, alg="maskgit_plus"), **change}
    with pytest.raises(ValueError, match=names):
        surelock_fx.diffusion_generate(model, ids, **kw)


@needs_api
def test_prompt_with_the_mask_id_raises(model):
    ids, _ = batch("B3", seed=0)
    ids[1, 2] = model.config.mask_token_id
    with pytest.raises(ValueError, match=r"(input_ids|prompt).*mask|mask.*(input_ids|prompt)"):
        surelock_fx.diffusion_generate(model, ids, steps=4, max_new_tokens=4)


@needs_api
def test_good_boundary_arguments_are_accepted(model):
    ids, _ = batch("B1", seed=0)
    for kw in (dict(top_p=1.0), dict(top_k=1), dict(alg_temp=0.0), dict(top_k=10 * VOCAB)):
        out = surelock_fx.diffusion_generate(model, ids, steps=2, max_new_tokens=4, alg="maskgit_plus", **kw)
        assert out.tokens.shape == (1, ids.shape[1] + 4)


# --- the reference alone ------------------------------------------------------------------------

def never_predicting_the_mask(model):
    """The plain forward of ``model`` with the mask id's logit at -inf: a model that never predicts the mask."""
    def forward(x, attention_mask, position_ids):
        logits = model(x, attention_mask=attention_mask, position_ids=position_ids)
        return logits.index_fill(-1, torch.tensor([MASK]), float("-inf"))
    return forward


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("kind", BATCHES)
def test_reference_shapes_prompt_kept_and_no_mask_left(model, alg, kind):
    ids, mask = batch(kind, seed=3)
    for temperature in (0.0, 0.8):
        history = []
        tokens = dream_generate(never_predicting_the_mask(model), ids, MASK, mask, alg=alg, temperature=temperature,
                                steps=5, max_new_tokens=10, alg_temp=None if alg == "origin" else 0.5,
                                generator=torch.Generator().manual_seed(1), history=history)
        assert tokens.shape == (ids.shape[0], ids.shape[1] + 10) and tokens.dtype == torch.long
        assert torch.equal(tokens[:, :ids.shape[1]], ids)
        assert not (tokens == MASK).any() and len(history) == 5
        masked = [int((x == MASK).sum()) for x in history]
        assert masked == sorted(masked, reverse=True) and masked[-1] == 0


def test_reference_may_commit_the_mask_id_as_the_official_code():
    """Dream's sampler does not keep the mask id out of the predictions: a position given the mask id stays
    masked (and is predicted again at the next step). This random model does predict it (here, a mask is left
    at the end), so the tests against the reference cover that case too."""
    ids, mask = batch("B3-left-padded", seed=3)
    tokens, _ = run_reference(shifted_llada(7), ids, mask, 1, alg="entropy", temperature=0.0, steps=5,
                              max_new_tokens=10, alg_temp=0.5)
    assert (tokens == MASK).any()


def test_reference_origin_in_one_step_unmasks_everything(model):
    ids, mask = batch("B3-left-padded", seed=4)
    tokens, history = run_reference(model, ids, mask, 0, alg="origin", temperature=0.8, steps=1, max_new_tokens=9)
    assert len(history) == 1 and not (tokens == MASK).any()


@pytest.mark.parametrize("alg", ALGS)
def test_reference_greedy_is_deterministic_and_draws_nothing(model, alg):
    ids, mask = batch("B3-left-padded", seed=5)
    kw = dict(alg=alg, steps=6, max_new_tokens=6)
    if alg == "origin":  # origin's transfers are random even when greedy
        a, _ = run_reference(model, ids, mask, 0, **kw)
        assert torch.equal(a, run_reference(model, ids, mask, 0, **kw)[0])
        return
    gen = torch.Generator().manual_seed(0)
    a = dream_generate(plain_forward(model), ids, MASK, mask, generator=gen, **kw)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())
    assert torch.equal(a, dream_generate(plain_forward(model), ids, MASK, mask, **kw))


def test_reference_schedule_of_top_k_algs():
    """k = int(masked * (1 - s / t)) per step, the rest at the last step: with steps == max_new_tokens and a
    model that predicts token 5 everywhere, the masked count goes down by the official schedule."""
    V, steps, new = VOCAB, 8, 8

    def forward(x, attention_mask, position_ids):
        logits = torch.zeros(*x.shape, V)
        logits[..., 5] = 4.0
        return logits

    history = []
    dream_generate(forward, torch.zeros(2, 3, dtype=torch.long), MASK, steps=steps, max_new_tokens=new,
                   alg="maskgit_plus", history=history)
    timesteps = torch.linspace(1, 1e-3, steps + 1)
    masked, expected = new, []
    for i in range(steps):
        k = int(torch.tensor(masked, dtype=torch.float) * (1 - timesteps[i + 1] / timesteps[i])) if i < steps - 1 \
            else masked
        masked -= k
        expected.append(masked)
    assert [int((x[0] == MASK).sum()) for x in history] == expected


def test_reference_reads_shifted_rows():
    """The masked position n is predicted by logits row n - 1 (position 0 by row 0)."""
    def forward(x, attention_mask, position_ids):
        logits = torch.zeros(*x.shape, VOCAB)
        logits[0, torch.arange(x.shape[1]), torch.arange(x.shape[1])] = 5.0  # row n predicts token n
        return logits

    tokens = dream_generate(forward, torch.tensor([[50, 51, 52]]), MASK, steps=4, max_new_tokens=4,
                            alg="maskgit_plus")
    assert tokens[0, 3:].tolist() == [2, 3, 4, 5]


def test_reference_multinomial_draws_what_categorical_draws():
    """``torch.multinomial(probs, 1, generator)`` (the reference's token draw) equals the official
    ``Categorical(probs=probs).sample()`` under the same seed of torch's global generator."""
    probs = torch.softmax(torch.randn(40, VOCAB, generator=torch.Generator().manual_seed(0)) * 3, -1)
    torch.manual_seed(123)
    official = torch.distributions.Categorical(probs=probs).sample()
    _, ours = sample_tokens(torch.log(probs), temperature=1.0, generator=torch.Generator().manual_seed(123))
    assert torch.equal(official, ours)


def test_reference_filters_and_confidences():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_logits(logits, 0.7) > torch.finfo(torch.float32).min
    assert kept.tolist() == [[True, True, False, False]]  # the first token above 0.7 is kept
    assert (top_p_logits(logits, 0.4) > -1e30).tolist() == [[True, False, False, False]]
    assert (top_k_logits(logits, 3) > -1e30).tolist() == [[True, True, True, False]]
    confidence, x0 = sample_tokens(logits)
    assert x0.item() == 0 and abs(confidence.item() - 0.5) < 1e-6
    margin, _ = sample_tokens(logits, margin_confidence=True)
    assert abs(margin.item() - 0.2) < 1e-6
    entropy, _ = sample_tokens(logits, neg_entropy=True)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert abs(entropy.item() - (p * p.log()).sum().item()) < 1e-5
    filtered, _ = sample_tokens(logits, top_p=0.7)  # the confidence of the renormalised distribution
    assert abs(filtered.item() - 0.5 / 0.8) < 1e-6


def test_reference_attention_inputs():
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    key_mask, mask_4d, positions = attention_inputs(mask, 5)
    assert key_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert positions.tolist() == [[0, 1, 2, 3, 4], [1, 1, 0, 1, 2]]
    assert mask_4d.shape == (2, 1, 5, 5)
    # it differs from the key mask (broadcast over queries) only in padding query rows
    key_only = key_mask.bool()[:, None, None, :].expand(2, 1, 5, 5)
    differs = (mask_4d != key_only).any(-1)[:, 0]
    assert not differs[key_mask.bool()].any()
    assert attention_inputs(torch.ones(2, 3), 5) == (None, None, None)
    assert attention_inputs(None, 5) == (None, None, None)


def test_llada_config_flag_is_per_instance():
    model = shifted_llada(0)
    assert model.config.shifted_logits and not tiny_config().shifted_logits
    assert dataclasses.replace(model.config).shifted_logits is False  # a copy loses it: keep the instance
