"""LLaDAModel against transformers' LlamaForCausalLM with bidirectional attention (docs/DESIGN.md §3)."""
import pytest
import torch
from torch.export import Dim

from helpers import hf_llama_from_llada, tiny_model

RTOL = 1e-5  # relative error bound, well under the 1e-4 the design allows

CONFIGS = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=2),
    "mqa-3-layers": dict(n_kv_heads=1, n_layers=3),
    "wide-heads": dict(d_model=48, n_heads=3, n_kv_heads=1, mlp_hidden_size=80, rope_theta=500000.0),
    "eps": dict(n_heads=8, n_kv_heads=4, rms_norm_eps=1e-3),
}
SHAPES = [(1, 7), (3, 13), (2, 1)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def random_ids(shape, seed=0, vocab=101) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request):
    """(our model, the transformers reference holding the same weights) for one config."""
    model = tiny_model(seed=len(request.param), **CONFIGS[request.param])
    return model, hf_llama_from_llada(model)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}xN{s[1]}")
def test_matches_transformers_llama(pair, shape):
    model, hf = pair
    ids = random_ids(shape, seed=shape[1])
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.shape == (*shape, model.config.embedding_size)
    assert ours.dtype == torch.float32
    assert relative_error(ours, ref) < RTOL


def test_attention_is_bidirectional_in_both(pair):
    """Changing the last token must change position 0's logits, in our model and in the reference."""
    model, hf = pair
    ids = random_ids((2, 9))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 101
    with torch.no_grad():
        for name, run in (("ours", model), ("transformers", lambda x: hf(x).logits)):
            delta = (run(changed)[:, 0] - run(ids)[:, 0]).abs().max().item()
            assert delta > 1e-3, f"{name}: position 0 ignores the last token (causal attention?)"


def left_padded_batch(seed=0):
    """ids [3, 10] with 0, 3 and 6 left-padding positions, and the matching key-padding mask."""
    ids = random_ids((3, 10), seed=seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 6)):
        mask[row, :pad] = 0
        ids[row, :pad] = 99
    return ids, mask


def test_attention_mask_matches_transformers(pair):
    model, hf = pair
    ids, mask = left_padded_batch()
    keep = mask.bool()
    with torch.no_grad():
        ours, ref = model(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits
    assert relative_error(ours[keep], ref[keep]) < RTOL


def test_attention_mask_hides_padded_keys():
    """With the mask, the padded tokens' ids do not reach the kept positions; without it they do."""
    model = tiny_model()
    ids, mask = left_padded_batch()
    other = ids.masked_fill(mask == 0, 5)
    keep = mask.bool()
    with torch.no_grad():
        assert torch.allclose(model(ids, attention_mask=mask)[keep], model(other, attention_mask=mask)[keep])
        assert not torch.allclose(model(ids)[keep], model(other)[keep])


def test_torch_export_dynamic_batch_and_sequence():
    model = tiny_model(n_kv_heads=2)
    batch, seq = Dim("batch", max=64), Dim("seq", max=512)
    ids, mask = left_padded_batch()
    exported = torch.export.export(
        model,
        (ids,),
        {"attention_mask": mask},
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    runnable = exported.module()
    for shape in ((2, 5), (4, 17)):
        other = random_ids(shape, seed=1)
        other_mask = torch.ones_like(other)
        other_mask[0, :2] = 0
        with torch.no_grad():
            got, want = runnable(other, attention_mask=other_mask), model(other, attention_mask=other_mask)
        assert got.shape == want.shape == (*shape, 101)
        assert relative_error(got, want) < RTOL


def test_weight_tying_shares_embedding_and_matches_transformers():
    model = tiny_model(weight_tying=True)
    assert "model.transformer.ff_out.weight" not in model.state_dict()
    assert model.lm_head_weight is model.model.transformer.wte.weight
    hf = hf_llama_from_llada(model)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = random_ids((2, 11))
    with torch.no_grad():
        assert relative_error(model(ids), hf(ids).logits) < RTOL


def test_explicit_position_ids_equal_default():
    """Passing 0..N-1 explicitly gives the default; stretched positions change it (RoPE is applied).

    (A constant shift would not: RoPE attention scores depend only on position differences.)
    """
    model = tiny_model()
    ids = random_ids((2, 8))
    positions = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        base = model(ids)
        assert torch.equal(model(ids, position_ids=positions), base)
        assert not torch.allclose(model(ids, position_ids=positions * 2), base)
