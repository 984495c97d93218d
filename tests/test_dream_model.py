"""DreamModel (docs/DESIGN.md §3, §7): against transformers' Qwen2ForCausalLM with bidirectional attention, its
config and checkpoint I/O, and ``surelock_fx.optimize`` computing the dense model's row logits."""
import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

import surelock_fx
from surelock_fx.models import (
    CheckpointError,
    ConfigError,
    DreamConfig,
    DreamModel,
    LLaDAConfig,
    from_hf_dream,
    load_config,
    load_model,
    random_dream,
    save_model,
)
from surelock_fx.models import llada as llada_module
from surelock_fx.reference import ReplaceLockedKV
from surelock_fx.signature import active_index, cache_specs, pack_index

from helpers import DREAM_TINY_DEFAULTS, hf_qwen2_from_dream, tiny_dream, tiny_dream_config

RTOL = 1e-5
CONFIGS = {
    "gqa": dict(),
    "mha": dict(num_key_value_heads=4),
    "mqa-3-layers": dict(num_key_value_heads=1, num_hidden_layers=3),
    "wide-heads": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, intermediate_size=80,
                       rope_theta=1000000.0),
    "eps": dict(num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-3),
}
SHAPES = [(1, 7), (3, 13), (2, 1)]
SHARD_BYTES = 40_000  # a tiny Dream is ~220 kB in float32, so this makes several shards
# Dream-v0-Instruct-7B's config.json, as published (keys that define no computation included)
OFFICIAL_CONFIG = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "mask_token_id": 151666, "max_position_embeddings": 131072,
    "max_window_layers": 28, "model_type": "Dream", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "pad_token_id": 151643, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def random_ids(shape, seed=0, vocab=97) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def left_padded_batch(seed=0):
    """ids [3, 10] with 0, 3 and 6 left-padding positions, the key-padding mask, and Dream's positions for them
    (cumsum(mask) - 1, padding positions 1: docs/DESIGN.md §7)."""
    ids = random_ids((3, 10), seed=seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 6)):
        mask[row, :pad] = 0
        ids[row, :pad] = 99
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, positions


# --- the model against transformers' Qwen2 ---

@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request):
    """(our model, the transformers reference holding the same weights) for one config."""
    model = tiny_dream(seed=len(request.param), **CONFIGS[request.param])
    return model, hf_qwen2_from_dream(model)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}xN{s[1]}")
def test_matches_transformers_qwen2(pair, shape):
    model, hf = pair
    ids = random_ids(shape, seed=shape[1])
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.shape == (*shape, model.config.vocab_size) and ours.dtype == torch.float32
    assert relative_error(ours, ref) <= RTOL


def test_attention_is_bidirectional_in_both(pair):
    """Changing the last token must change position 0's logits, in our model and in the reference."""
    model, hf = pair
    ids = random_ids((2, 9))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 97
    with torch.no_grad():
        for name, run in (("ours", model), ("transformers", lambda x: hf(x).logits)):
            delta = (run(changed)[:, 0] - run(ids)[:, 0]).abs().max().item()
            assert delta > 1e-3, f"{name}: position 0 ignores the last token (causal attention?)"


def test_left_padding_and_positions_match_transformers(pair):
    """Left padding (keys masked) at Dream's positions: the real rows agree with the reference's."""
    model, hf = pair
    ids, mask, positions = left_padded_batch()
    keep = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions)
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
    assert relative_error(ours[keep], ref[keep]) <= RTOL


def test_padding_mask_hides_padded_keys():
    model = tiny_dream()
    ids, mask, positions = left_padded_batch()
    other = ids.masked_fill(mask == 0, 5)
    keep = mask.bool()
    with torch.no_grad():
        assert torch.equal(model(ids, mask, positions)[keep], model(other, mask, positions)[keep])
        assert not torch.allclose(model(ids, position_ids=positions)[keep], model(other, position_ids=positions)[keep])


def test_explicit_position_ids_equal_default_and_stretched_ones_differ(pair):
    model, hf = pair
    ids = random_ids((2, 8))
    positions = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        base = model(ids)
        assert torch.equal(model(ids, position_ids=positions), base)
        stretched = model(ids, position_ids=positions * 2)
        assert not torch.allclose(stretched, base)
        assert relative_error(stretched, hf(ids, position_ids=positions * 2).logits) <= RTOL


def test_state_dict_has_the_official_names():
    model = tiny_dream(num_hidden_layers=1)
    layer = "model.layers.0."
    assert list(model.state_dict()) == [
        "model.embed_tokens.weight",
        *(f"{layer}self_attn.{p}_proj.{leaf}" for p in "qkv" for leaf in ("weight", "bias")),
        f"{layer}self_attn.o_proj.weight",
        *(f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        f"{layer}input_layernorm.weight", f"{layer}post_attention_layernorm.weight",
        "model.norm.weight", "lm_head.weight",
    ]


def test_random_dream_is_seeded_and_fills_biases():
    a, b = random_dream(tiny_dream_config(), seed=3), random_dream(tiny_dream_config(), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    bias = a.model.layers[0].self_attn.q_proj.bias
    assert not a.training and bias.min() >= 0.5 and bias.max() < 1.5


# --- the config ---

def test_official_config_gives_the_7b_defaults():
    config = DreamConfig.from_dict(OFFICIAL_CONFIG)
    assert config == DreamConfig()
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim) == (3584, 28, 28, 4,
                                                                                                      128)
    assert (config.mlp_hidden_size, config.vocab_size, config.embedding_size) == (18944, 152064, 152064)
    assert (config.mask_token_id, config.eos_token_id, config.pad_token_id, config.bos_token_id) == (151666, 151643,
                                                                                                      151643, 151643)
    assert config.eot_token_id == 151645 and config.max_sequence_length == 131072 and not config.weight_tying


def test_shifted_logits_is_a_class_flag_not_a_key():
    assert DreamConfig.shifted_logits is True and LLaDAConfig.shifted_logits is False
    assert tiny_dream_config().shifted_logits and "shifted_logits" not in tiny_dream_config().to_dict()


def test_to_dict_is_the_official_layout_and_round_trips():
    config = tiny_dream_config()
    out = config.to_dict()
    assert out["model_type"] == "Dream" and out["architectures"] == ["DreamModel"]
    assert out["rope_scaling"] is None and out["use_sliding_window"] is False and out["tie_word_embeddings"] is False
    assert out["hidden_act"] == "silu"
    assert set(OFFICIAL_CONFIG) - set(out) == {"auto_map", "initializer_range", "torch_dtype", "transformers_version",
                                               "use_cache"}
    assert DreamConfig.from_dict(json.loads(json.dumps(out))) == config


def test_transformers_5_rope_parameters_are_read():
    raw = {**tiny_dream_config().to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    del raw["rope_theta"]
    assert DreamConfig.from_dict(raw).rope_theta == 5e5


BAD_CONFIGS = {  # config.json change -> what the error must say
    "rope-scaling": (dict(rope_scaling={"type": "linear", "factor": 2.0}),
                     r"config key 'rope_scaling' is \{'type': 'linear', 'factor': 2.0\}: this model implements only "
                     "rope_scaling=None"),
    "rope-parameters-yarn": (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
                             "config key 'rope_parameters' .* implements only rope_type 'default'"),
    "sliding-window": (dict(use_sliding_window=True, sliding_window=4),
                       "config key 'use_sliding_window' is True: this model implements only use_sliding_window=False"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported: .* use 'silu'"),
    "tied": (dict(tie_word_embeddings=True), "tie_word_embeddings=true is not supported: .* set it to false"),
    "tied-string": (dict(tie_word_embeddings="false"), "'tie_word_embeddings' must be true or false, got 'false'"),
    "heads-do-not-divide": (dict(num_attention_heads=5), r"hidden_size \(64\) must be divisible by "
                                                         r"num_attention_heads \(5\)"),
    "kv-heads-do-not-divide": (dict(num_key_value_heads=3), r"num_attention_heads \(4\) must be a multiple of "
                                                            r"num_key_value_heads \(3\)"),
    "hidden-size-true": (dict(hidden_size=True), "'hidden_size' must be a positive integer, got True"),
    "rope-theta-null": (dict(rope_theta=None), "'rope_theta' must be a positive number, got None"),
    "mask-null": (dict(mask_token_id=None), "'mask_token_id' must be an integer token id, got None"),
    "mask-outside": (dict(mask_token_id=151666), r"mask_token_id 151666 is outside the vocabulary \[0, 101\)"),
    "mask-is-eos": (dict(mask_token_id=99), "mask_token_id and eos_token_id are both 99"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_values_are_one_clear_sentence(tmp_path, case):
    change, message = BAD_CONFIGS[case]
    save_model(tiny_dream(), tmp_path)
    rewrite_config(tmp_path, **change)
    with pytest.raises(ConfigError, match=message) as caught:
        load_model(tmp_path)
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / 'config.json'}: ") and "\n" not in text


# --- checkpoints ---

def rewrite_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def rewrite_weights(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize("max_shard_bytes", [None, SHARD_BYTES], ids=["single-file", "sharded"])
def test_round_trip_is_exact(tmp_path, max_shard_bytes):
    source = tiny_dream(seed=4)
    save_model(source, tmp_path, max_shard_bytes=max_shard_bytes)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    if max_shard_bytes:
        assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    else:
        assert not shards and (tmp_path / "model.safetensors").is_file()
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "Dream" and written["architectures"] == ["DreamModel"]
    assert isinstance(load_config(tmp_path), DreamConfig)
    loaded = load_model(tmp_path)
    assert isinstance(loaded, DreamModel) and loaded.config == source.config and not loaded.training
    assert loaded.state_dict().keys() == source.state_dict().keys()
    ids = random_ids((2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), source(ids))


def test_dtype_argument_casts_on_load(tmp_path):
    source = tiny_dream()
    save_model(source, tmp_path, max_shard_bytes=SHARD_BYTES)
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = random_ids((2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), copy.deepcopy(source).to(torch.bfloat16)(ids))


Q_BIAS = "model.layers.1.self_attn.q_proj.bias"
BREAKERS = {  # break a saved Dream checkpoint -> (error, message)
    "other-model-type": (lambda p: rewrite_config(p, model_type="qwen2"), ConfigError,
                         r"config\.json: unknown model_type 'qwen2': surelock_fx\.models loads LLaDA \(model_type "
                         r"'llada'\) and Dream \(model_type 'Dream'\) checkpoints"),
    "lower-case-dream": (lambda p: rewrite_config(p, model_type="dream"), ConfigError,
                         "unknown model_type 'dream' .*did you mean 'Dream'"),
    "model-type-a-list": (lambda p: rewrite_config(p, model_type=["Dream"]), ConfigError,
                          r"unknown model_type \['Dream'\]"),
    "missing-bias": (lambda p: rewrite_weights(p, lambda t: t.pop(Q_BIAS)), CheckpointError,
                     rf"does not match a Dream model: missing tensors: {Q_BIAS}$"),
    "llada-tensor": (lambda p: rewrite_weights(p, lambda t: t.update({"model.transformer.ln_f.weight": t.pop(
        "model.norm.weight")})), CheckpointError, r"missing tensors: model\.norm\.weight; unexpected tensors: "
                                                  r"model\.transformer\.ln_f\.weight"),
    "mis-shaped-bias": (lambda p: rewrite_weights(p, lambda t: t.update({Q_BIAS: torch.zeros(60)})), CheckpointError,
                        rf"tensor {Q_BIAS} in \S+ has shape \(60,\), but config\.json implies \(64,\)"),
    "nan": (lambda p: rewrite_weights(p, lambda t: t[Q_BIAS].fill_(float("nan"))), CheckpointError,
            rf"holds NaN or inf in tensor\(s\) {Q_BIAS}"),
}


@pytest.mark.parametrize("case", list(BREAKERS))
def test_broken_checkpoint_is_one_clear_sentence(tmp_path, case):
    breaker, error, message = BREAKERS[case]
    save_model(tiny_dream(), tmp_path)
    breaker(tmp_path)
    with pytest.raises(error, match=message) as caught:
        load_model(tmp_path)
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)


def test_unset_keys_warn_with_dream_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(llada_module, "_warned", set())
    save_model(tiny_dream(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_config(tmp_path).rope_theta == 1000000.0
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'config.json'} sets no rope_theta: using Dream-v0-7B's rope_theta=1000000.0; if this model "
        "was trained with other values, add them there"
    ]


class FakeDreamConfig(PretrainedConfig):
    """Stands in for the remote-code Dream config class (model_type 'Dream')."""

    model_type = "Dream"


class FakeHFDream(torch.nn.Module):
    """An in-memory HF Dream: a ``config`` and the official state dict names."""

    def __init__(self, source: DreamModel, model_type="Dream"):
        super().__init__()
        official = {k: v for k, v in source.config.to_dict().items() if k != "rope_scaling"}  # null: transformers 5
        self.config = FakeDreamConfig(**official)  # warns that the key is deprecated
        self.config.model_type = model_type
        self.model, self.lm_head = copy.deepcopy(source.model), copy.deepcopy(source.lm_head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hf_dream_matches(dtype):
    source = tiny_dream()
    fake = FakeHFDream(source).to(dtype)
    converted = from_hf_dream(fake)
    assert isinstance(converted, DreamModel) and converted.config == source.config and not converted.training
    assert {p.dtype for p in converted.parameters()} == {dtype}
    ids = random_ids((2, 9))
    with torch.no_grad():
        assert torch.equal(converted(ids), copy.deepcopy(source).to(dtype)(ids))


def test_from_hf_dream_rejects_other_model_types_and_names_missing_tensors():
    source = tiny_dream()
    with pytest.raises(ConfigError, match="from_hf_dream expects a Dream model .* got FakeHFDream with "
                                          "config.model_type 'llada'"):
        from_hf_dream(FakeHFDream(source, model_type="llada"))
    fake = FakeHFDream(source)
    fake.model.layers[0].self_attn.k_proj.bias = None
    with pytest.raises(CheckpointError, match=r"FakeHFDream does not match a Dream model: missing tensors: "
                                              r"model\.layers\.0\.self_attn\.k_proj\.bias"):
        from_hf_dream(fake)


# --- optimize(): the locked graph computes the dense model's row logits ---

OPTIMIZED = {"gqa": dict(), "mha": dict(num_key_value_heads=4), "mqa-3-layers": dict(num_key_value_heads=1,
                                                                                     num_hidden_layers=3)}


@pytest.fixture(scope="module", params=list(OPTIMIZED), ids=list(OPTIMIZED))
def optimized(request):
    """(dense DreamModel, surelock_fx.optimize of it with the eager backend), one capture per config."""
    model = tiny_dream(seed=7 + len(request.param), **OPTIMIZED[request.param])
    return model, surelock_fx.optimize(model)


def empty_caches(gm, B, N):
    return [torch.zeros(B, s.heads, N + 1, s.head_dim, dtype=s.dtype) for s in cache_specs(gm)]


def test_config_is_kept(optimized):
    model, opt = optimized
    assert opt.config is model.config and opt.config.shifted_logits


@pytest.mark.parametrize("B, N", [(1, 7), (3, 12)])
def test_every_row_active_equals_the_dense_model(optimized, B, N):
    """The functional locked graph and the eager backend's packed form, every row active, empty caches."""
    model, opt = optimized
    x = random_ids((B, N), seed=B * N)
    positions = torch.arange(N).expand(B, N)
    keys = torch.ones(B, N, dtype=torch.bool)
    with torch.no_grad():
        dense = model(x)
        graph = opt.graph_module(x, positions, positions, keys, *empty_caches(opt.graph_module, B, N))[0]
        packed = opt(x, positions, positions, keys, *empty_caches(opt.graph_module, B, N))[0]
    assert relative_error(graph, dense) <= RTOL
    assert relative_error(packed.reshape(B, N, -1), dense) <= RTOL


def test_left_padding_equals_the_dense_model(optimized):
    """Key padding and Dream's positions as graph inputs: the real rows' logits are the dense model's."""
    model, opt = optimized
    x, mask, positions = left_padded_batch(seed=3)
    B, N = x.shape
    keep = mask.bool()
    with torch.no_grad():
        dense = model(x, attention_mask=mask, position_ids=positions)
        got = opt.graph_module(x, positions, torch.arange(N).expand(B, N), keep, *empty_caches(opt.graph_module, B, N))
    assert relative_error(got[0][keep], dense[keep]) <= RTOL


def reference_step(model, x, skipped, caches):
    """The dense model with the ``skipped`` rows' K/V replaced by ``caches`` (filled on the first call)."""
    with ReplaceLockedKV(caches, skipped):
        return model(x)


def locked_step(opt, x, locked, caches, packed: bool):
    """(index, logits [B, M, V], caches) of one step of the locked graph (``packed``: the eager backend's form)."""
    index, _ = active_index(locked)
    B, N = x.shape
    inputs = (x, torch.arange(N).expand(B, N), index, torch.ones(B, N, dtype=torch.bool))
    if not packed:
        logits, *caches = opt.graph_module(*inputs, *caches)
        return index, logits, caches
    logits, *caches = opt(*inputs, *caches)
    return index, logits[0][pack_index(index, N)[1]], caches


@pytest.mark.parametrize("packed", [False, True], ids=["functional", "eager-packed"])
@pytest.mark.parametrize("B, N, active", [(1, 9, [3]), (3, 13, [1, 13, 5]), (2, 6, [0, 4])])
def test_locked_rows_match_the_reference_semantics(optimized, B, N, active, packed):
    """A full pass fills the caches; then, with random rows locked and the input changed, the active rows'
    logits and every cache equal the dense model's with locked rows' K/V from the first pass."""
    model, opt = optimized
    gen = torch.Generator().manual_seed(B * 100 + N)
    x1 = torch.randint(0, 97, (B, N), generator=gen)
    x2 = x1.clone()
    x2[:, ::2] = torch.randint(0, 97, x2[:, ::2].shape, generator=gen)
    locked = torch.ones(B, N, dtype=torch.bool)
    for row, count in enumerate(active):
        locked[row, torch.randperm(N, generator=gen)[:count]] = False
    nothing = torch.zeros(B, N, dtype=torch.bool)
    ref_caches = []
    with torch.no_grad():
        reference_step(model, x1, nothing, ref_caches)
        _, _, caches = locked_step(opt, x1, nothing, empty_caches(opt.graph_module, B, N), packed)
        expected = reference_step(model, x2, locked, ref_caches)
        index, got, caches = locked_step(opt, x2, locked, caches, packed)
    for row in range(B):
        rows = index[row][index[row] < N]
        torch.testing.assert_close(got[row, :len(rows)], expected[row, rows], rtol=RTOL, atol=RTOL)
        for layer, kv in enumerate(ref_caches):
            for cache, ref in zip(caches[2 * layer: 2 * layer + 2], kv, strict=True):
                ref = ref.repeat_interleave(cache.shape[1] // ref.shape[1], dim=1)
                torch.testing.assert_close(cache[row, :, :N], ref[row], rtol=RTOL, atol=RTOL)


def test_tiny_defaults_are_a_valid_dream_config():
    assert DreamConfig(**DREAM_TINY_DEFAULTS).num_key_value_heads == 2
