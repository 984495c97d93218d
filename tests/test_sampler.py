"""surelock_fx.generate against an independent transcription of LLaDA's official sampler (docs/DESIGN.md §2).

``reference_generate`` below follows LLaDA's ``generate.py`` (get_num_transfer_tokens, per-row top-k,
Gumbel noise in float64, CFG, logits_eos_inf) and Fast-dLLM's threshold decoding, written plainly
and without sharing code with ``surelock_fx.sampler``. ``confidence_eos_eot_inf`` follows the
design: EOS and EOT logits are -inf in the softmax that scores confidence.
"""
import pytest
import torch
import torch.nn.functional as F

import surelock_fx.decoding
from surelock_fx import generate
from surelock_fx.sampler import (
    ARGMAX_BLOCK,
    GumbelNoise,
    RowLogits,
    first_argmax,
    guided_logits,
    proposals_argmax,
    step_candidates,
)

from helpers import tiny_config, tiny_model

MASK, EOS, EOT, VOCAB = 100, 99, 98, 101


# --- the reference -------------------------------------------------------------------------

def get_num_transfer_tokens(mask_index, steps):
    """LLaDA: tokens to unmask per step; masked count // steps, the first (count % steps) get one more."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : remainder[i]] += 1
    return num_transfer_tokens


def add_gumbel_noise(logits, temperature, generator):
    """LLaDA: Gumbel-max with float64 noise; temperature 0 returns the logits unchanged."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def model_logits(model, x, attention_mask, prompt_index, cfg_scale):
    if cfg_scale > 0.0:
        un_x = x.clone()
        un_x[prompt_index] = MASK
        x_ = torch.cat([x, un_x], dim=0)
        mask_ = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
        logits, un_logits = torch.chunk(model(x_, attention_mask=mask_), 2, dim=0)
        return un_logits + (cfg_scale + 1) * (logits - un_logits)
    return model(x, attention_mask=attention_mask)


def threshold_transfer(confidence_row, threshold):
    """Fast-dLLM: the most confident candidate, plus every other one with confidence >= threshold."""
    transfer = torch.zeros_like(confidence_row, dtype=torch.bool)
    if torch.isinf(confidence_row).all():  # this row's block is already fully decoded
        return transfer
    order = torch.argsort(confidence_row, descending=True)
    transfer[order[0]] = True
    for index in order[1:]:
        if confidence_row[index] < threshold:
            break
        transfer[index] = True
    return transfer


@torch.no_grad()
def reference_generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128,
                       temperature=0.0, cfg_scale=0.0, remasking="low_confidence", threshold=None,
                       logits_eos_inf=False, confidence_eos_eot_inf=False, generator=None):
    """Returns (tokens [B, P + gen_length], number of steps taken)."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), MASK, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask, torch.ones((prompt.shape[0], gen_length), dtype=attention_mask.dtype)], dim=-1
        )
    prompt_index = x != MASK
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    steps_taken = 0
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        end = prompt.shape[1] + (num_block + 1) * block_length
        num_transfer_tokens = get_num_transfer_tokens(x[:, start:end] == MASK, steps)
        i = 0
        while (i < steps) if threshold is None else (x[:, start:end] == MASK).any():
            mask_index = x == MASK
            logits = model_logits(model, x, attention_mask, prompt_index, cfg_scale)
            if logits_eos_inf:
                logits[:, :, EOS] = -torch.inf
            x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)
            if remasking == "low_confidence":
                scored = logits.clone()
                if confidence_eos_eot_inf:
                    scored[:, :, EOS] = scored[:, :, EOT] = -torch.inf
                p = F.softmax(scored, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), generator=generator)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                if threshold is None:
                    _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                    transfer_index[j, select_index] = True
                else:
                    transfer_index[j] = threshold_transfer(confidence[j], threshold)
            x[transfer_index] = x0[transfer_index]
            i += 1
            steps_taken += 1
    return x, steps_taken


# --- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    """A random tiny LLaDA that never proposes the mask token."""
    model = tiny_model(seed=3, n_kv_heads=2)
    with torch.no_grad():
        # A trained LLaDA never predicts [MASK]; if it did, threshold decoding would never finish.
        model.lm_head_weight[MASK] = 0.0
    return model


class EosHeavyModel(torch.nn.Module):
    """A stand-in model whose top prediction is EOS or EOT at many positions, often confidently.

    Logits are a fixed per-position table plus a term depending on the whole sequence (its mean
    token one-hot times a random matrix), so decoding still depends on what was unmasked. It makes
    ``logits_eos_inf`` and ``confidence_eos_eot_inf`` change the outcome, which a random
    transformer rarely does for EOT.
    """

    def __init__(self, seed=0, max_length=64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.config = tiny_config()
        table = 2.0 * torch.randn(max_length, VOCAB, generator=gen)
        table[:, EOS] += 3.0
        table[:, EOT] += 3.5
        table[:, MASK] = -30.0
        self.register_buffer("table", table)
        self.register_buffer("mixing", 2.0 * torch.randn(VOCAB, VOCAB, generator=gen))

    def forward(self, input_ids, attention_mask=None):
        context = F.one_hot(input_ids, VOCAB).float().mean(dim=1) @ self.mixing
        return self.table[: input_ids.shape[1]] + context[:, None, :]


def make_prompt(batch, length=5, seed=0):
    return torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padding_mask(batch, length=5):
    """Row r has r padding positions on the left (capped at length - 1)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, : min(row, length - 1)] = 0
    return mask


def run_both(model, prompt, seed=None, **kwargs):
    """(generate's output, reference tokens, reference step count) on the same inputs and RNG seed."""
    gens = [None if seed is None else torch.Generator().manual_seed(seed) for _ in range(2)]
    out = generate(model, prompt, generator=gens[0], **kwargs)
    tokens, steps = reference_generate(model, prompt, generator=gens[1], **kwargs)
    return out, tokens, steps


# --- token-for-token agreement -------------------------------------------------------------

SCHEDULES = [  # (gen_length, steps, block_length)
    (8, 8, 8),
    (8, 4, 8),
    (10, 4, 5),
    (12, 6, 4),
    (16, 16, 4),
]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "gen{}-steps{}-block{}".format(*s))
def test_matches_reference_across_schedules(model, schedule, batch, logits_chunks):
    gen_length, steps, block_length = schedule
    prompt = make_prompt(batch)
    out, tokens, ref_steps = run_both(model, prompt, gen_length=gen_length, steps=steps,
                                      block_length=block_length)
    assert torch.equal(out.tokens, tokens)
    assert not (out.tokens == MASK).any()
    assert out.stats.steps == out.stats.forward_passes == ref_steps == steps


OPTION_CASES = {
    "random-remasking": dict(remasking="random", seed=11),
    "cfg": dict(cfg_scale=1.5),
    "threshold": dict(threshold=0.4),
    "threshold-cfg": dict(threshold=0.4, cfg_scale=0.5),
    "threshold-random": dict(threshold=0.4, remasking="random", seed=5),
    "temperature": dict(temperature=0.8, seed=2),
    "temperature-random-cfg": dict(temperature=1.0, remasking="random", cfg_scale=0.5, seed=4),
}


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_matches_reference_with_options(model, case, batch, padded, logits_chunks):
    prompt = make_prompt(batch, seed=batch)
    mask = left_padding_mask(batch) if padded else None
    out, tokens, ref_steps = run_both(model, prompt, gen_length=12, steps=6, block_length=4,
                                      attention_mask=mask, **OPTION_CASES[case])
    assert torch.equal(out.tokens, tokens)
    assert out.stats.steps == out.stats.forward_passes == ref_steps


def test_options_change_the_output(model):
    """Guards against a vacuous comparison: each option really alters what the tiny model decodes."""
    prompt = make_prompt(3)
    base = reference_generate(model, prompt, steps=6, gen_length=12, block_length=4)[0]
    assert len(base[:, 5:].unique()) > 4, "the model's predictions are trivial"
    seeded = torch.Generator().manual_seed(0)
    for options in ({"cfg_scale": 1.5}, {"threshold": 0.4}, {"remasking": "random", "generator": seeded}):
        changed = reference_generate(model, prompt, steps=6, gen_length=12, block_length=4, **options)[0]
        assert not torch.equal(changed, base), options


EOS_FLAGS = {
    "logits-eos-inf": dict(logits_eos_inf=True),
    "confidence-eos-eot-inf": dict(confidence_eos_eot_inf=True),
    "both": dict(logits_eos_inf=True, confidence_eos_eot_inf=True),
}


@pytest.mark.parametrize("options", [{}, {"cfg_scale": 1.0}, {"threshold": 0.3}],
                         ids=["plain", "cfg", "threshold"])
@pytest.mark.parametrize("flags", list(EOS_FLAGS))
def test_eos_flags_match_reference(flags, options, logits_chunks):
    model, prompt = EosHeavyModel(), make_prompt(3)
    schedule = dict(gen_length=12, steps=6, block_length=4, **options)
    out, tokens, ref_steps = run_both(model, prompt, **schedule, **EOS_FLAGS[flags])
    assert torch.equal(out.tokens, tokens)
    assert out.stats.steps == ref_steps
    unflagged = reference_generate(model, prompt, **schedule)[0]
    assert not torch.equal(tokens, unflagged), "the flags should change what this model decodes"
    if "logits_eos_inf" in EOS_FLAGS[flags]:
        assert (unflagged[:, 5:] == EOS).any() and not (tokens[:, 5:] == EOS).any()


def test_threshold_steps_are_dynamic(model):
    """Threshold decoding commits several tokens per step: fewer steps than tokens, at least one per block."""
    out = generate(model, make_prompt(1), gen_length=16, steps=16, block_length=8, threshold=0.3)
    assert 2 <= out.stats.steps < 16
    assert out.stats.forward_passes == out.stats.steps


# --- sampling, stats, progress -------------------------------------------------------------

def test_temperature_sampling_is_reproducible_with_a_seeded_generator(model):
    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(model, make_prompt(2), gen_length=8, steps=8, block_length=8, temperature=1.0,
                        generator=gen).tokens

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_stats_count_one_forward_per_step(model, cfg_scale):
    """CFG runs conditional and unconditional rows as one forward pass of batch 2B."""
    batches = []
    handle = model.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        out = generate(model, make_prompt(3), gen_length=12, steps=6, block_length=4, cfg_scale=cfg_scale)
    finally:
        handle.remove()
    assert out.stats.steps == out.stats.forward_passes == len(batches) == 6
    assert set(batches) == {6 if cfg_scale else 3}
    assert out.stats.wall_time_s > 0


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_flag(model, capsys, progress):
    generate(model, make_prompt(1), gen_length=8, steps=4, block_length=8, progress=progress)
    err = capsys.readouterr().err
    if progress:
        assert "decoding" in err and "4/4" in err
    else:
        assert err == ""


def test_inputs_are_not_modified(model):
    prompt, mask = make_prompt(3), left_padding_mask(3)
    prompt_before, mask_before = prompt.clone(), mask.clone()
    out = generate(model, prompt, gen_length=8, steps=4, block_length=4, attention_mask=mask, cfg_scale=1.0)
    assert torch.equal(prompt, prompt_before) and torch.equal(mask, mask_before)
    assert torch.equal(out.tokens[:, :5], prompt)


# --- bad input -----------------------------------------------------------------------------

GOOD = dict(gen_length=8, steps=4, block_length=4)
BAD_INPUTS = {
    "block-does-not-divide": (dict(gen_length=10, block_length=4), "multiple of block_length"),
    "steps-not-divisible": (dict(steps=3), r"steps \(3\) must be divisible by the number of blocks"),
    "mask-in-prompt": (dict(prompt=torch.tensor([[1, MASK, 2]])), f"mask token id {MASK}"),
    "id-too-large": (dict(prompt=torch.tensor([[1, VOCAB]])), f"{VOCAB} is outside the vocabulary"),
    "negative-id": (dict(prompt=torch.tensor([[-1, 2]])), "-1 is outside the vocabulary"),
    "empty-prompt": (dict(prompt=torch.zeros(1, 0, dtype=torch.long)), "prompt is empty"),
    "mask-shape": (dict(attention_mask=torch.ones(1, 4, dtype=torch.long)), "attention_mask has shape"),
    "zero-gen-length": (dict(gen_length=0), "gen_length must be a positive integer"),
    "negative-steps": (dict(steps=-4), "steps must be a positive integer"),
    "zero-block-length": (dict(block_length=0), "block_length must be a positive integer"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_error_names_the_problem(model, case):
    overrides, message = BAD_INPUTS[case]
    kwargs = {"prompt": make_prompt(1), **GOOD, **overrides}
    prompt = kwargs.pop("prompt")
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, **kwargs)


def test_proposals_never_take_the_mask_token():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 9, 20, generator=gen)
    mask_id = 7
    scores[0, :4, mask_id] = 50.0  # the mask token would win these rows
    scores[1, 2, [mask_id, 3]] = 60.0  # a tie between the mask token and token 3
    before = scores.clone()
    expected = scores.clone()
    expected[..., mask_id] = -torch.inf
    x0 = proposals_argmax(scores, mask_id)
    assert torch.equal(x0, expected.argmax(-1)) and not (x0 == mask_id).any()
    assert torch.equal(scores, before), "the scores are not modified"


@pytest.mark.parametrize("vocab", [1, 2, 7, 101, ARGMAX_BLOCK**2, ARGMAX_BLOCK**2 + 1, 32000, 32003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_argmax_is_torch_argmax(vocab, dtype):
    """The same index as torch.argmax on ties (a few distinct values), NaN and all -inf rows."""
    gen = torch.Generator().manual_seed(vocab)
    for trial in range(4):
        scores = torch.randint(-3, 3, (2, 5, vocab), generator=gen).to(dtype)
        scores[0, 1, torch.randint(vocab, (2,), generator=gen)] = torch.nan
        scores[1, 2] = -torch.inf
        scores[1, 3, -1] = 9.0  # the maximum in the last (possibly shorter) block
        assert torch.equal(first_argmax(scores), scores.argmax(-1)), trial
    fresh = torch.randn(7, vocab, generator=gen, dtype=dtype)
    assert torch.equal(first_argmax(fresh), fresh.argmax(-1))


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 7 * 8, 1 << 20], ids=["row-blocks", "3-row-blocks", "one-block"])
def test_gumbel_noise_drawn_in_blocks_is_one_whole_draw(monkeypatch, chunk_bytes):
    """Rows taken in ascending chunks, then ``finish``: the reference's numbers, and the generator
    left where the reference's one draw of all rows leaves it."""
    monkeypatch.setattr(surelock_fx.decoding, "CHUNK_BYTES", chunk_bytes)
    rows, vocab, temperature = 11, 7, 0.7
    generator = torch.Generator().manual_seed(3)
    whole = (-torch.log(torch.rand(rows, vocab, dtype=torch.float64, generator=generator))) ** temperature
    after_whole = torch.rand(4, generator=generator)
    generator.manual_seed(3)
    noise = GumbelNoise(rows, vocab, temperature, "cpu", generator)
    for taken in ([1, 2], [5], [6, 7, 9]):  # rows 0, 3, 4, 8 and 10 are never taken
        assert torch.equal(noise.take(torch.tensor(taken)), whole[taken])
    noise.finish()
    assert torch.equal(torch.rand(4, generator=generator), after_whole)


def compact(logits: torch.Tensor, computed: torch.Tensor, seed: int) -> RowLogits:
    """RowLogits holding the ``computed`` [B, N] positions of dense ``logits``, in shuffled row order."""
    B, N, V = logits.shape
    positions = computed.flatten().nonzero().squeeze(1)
    order = positions[torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed))]
    row = torch.full((B * N,), -1)
    row[order] = torch.arange(len(order))
    return RowLogits(logits.reshape(B * N, V)[order].clone(), row.view(B, N))


def random_step(B=3, N=9, V=23, seed=0):
    """(logits [B, N, V], x [B, N], masked [B, N], computed [B, N]): masked positions and some others computed."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, N, V, generator=gen)
    masked = torch.rand(B, N, generator=gen) < 0.5
    masked[:, 0] = True
    x = torch.where(masked, MASK, torch.randint(0, MASK, (B, N), generator=gen))
    return logits, x, masked, masked | (torch.rand(B, N, generator=gen) < 0.5)


@pytest.mark.parametrize("options", [dict(temperature=0.0, remasking="low_confidence"),
                                     dict(temperature=0.9, remasking="low_confidence"),
                                     dict(temperature=0.5, remasking="random")], ids=["greedy", "gumbel", "random"])
def test_step_candidates_on_row_logits_equal_the_dense_tensor(options, logits_chunks):
    logits, x, masked, computed = random_step(seed=1)
    results = []
    for given in (logits, compact(logits, computed, seed=2)):
        results.append(step_candidates(given, x, masked, 6, mask_id=MASK, eos=None, eot=None, logits_eos_inf=False,
                                       confidence_eos_eot_inf=False, generator=torch.Generator().manual_seed(3),
                                       **options))
    for dense, rows in zip(*results):
        assert torch.equal(dense, rows)


def test_guided_row_logits_equal_dense_cfg_at_masked_positions():
    logits, x, masked, computed = random_step(B=2, seed=4)
    prompt_index = ~masked & (torch.arange(x.shape[1]) < 3)
    both = torch.cat([logits, logits.flip(-1)])  # the unconditional half: other logits
    both_computed = torch.cat([computed, computed | prompt_index])
    dense = guided_logits(lambda x2, m: both, x, None, prompt_index, 1.5, MASK)
    rows = guided_logits(lambda x2, m: compact(both, both_computed, seed=5), x, None, prompt_index, 1.5, MASK)
    assert torch.equal(rows.to_dense()[masked], dense[masked])
    assert rows.to_dense()[~masked].isnan().all()


def test_row_logits_without_a_masked_position_is_a_clear_error():
    logits, x, masked, _ = random_step(seed=6)
    missing = masked.clone()
    missing[0, 0] = False
    with pytest.raises(ValueError, match="no logits for a position the sampler reads"):
        step_candidates(compact(logits, missing, seed=7), x, masked, 9, mask_id=MASK, temperature=0.0,
                        remasking="low_confidence", eos=None, eot=None, logits_eos_inf=False,
                        confidence_eos_eot_inf=False, generator=None)
