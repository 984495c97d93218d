"""``surelock_fx.optimize`` on the modules ``AutoModel.from_pretrained(path, trust_remote_code=True)`` gives for
LLaDA and Dream, through stand-ins shaped like the official classes (their class name, config, state dict
names and forward signature), and ``models.from_remote_code``'s errors."""
import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import PretrainedConfig

import surelock_fx
from surelock_fx import models
from surelock_fx.signature import cache_specs

from helpers import hf_llama_from_llada, hf_qwen2_from_dream, tiny_dream, tiny_model

RTOL = 1e-5


class RemoteLLaDAConfig(PretrainedConfig):
    """Stands in for LLaDA's remote-code config class."""

    model_type = "llada"


class RemoteDreamConfig(PretrainedConfig):
    """Stands in for Dream's remote-code config class."""

    model_type = "Dream"


class LLaDAModelLM(torch.nn.Module):
    """Shaped like LLaDA's remote-code class: ``model.transformer...`` tensors and a forward without position_ids.
    Its forward runs transformers' bidirectional Llama on the same weights (an independent implementation)."""

    def __init__(self, source: models.LLaDAModel):
        super().__init__()
        self.config = RemoteLLaDAConfig(**source.config.to_dict())
        self.model = copy.deepcopy(source.model)
        self._reference = (hf_llama_from_llada(source),)  # a tuple: not a submodule, not in the state dict

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self._reference[0](input_ids, attention_mask=attention_mask).logits)


class DreamModel(torch.nn.Module):
    """Shaped like Dream's remote-code class: ``model`` (embed_tokens, layers, norm, a rotary embedding without
    persistent buffers) and ``lm_head``, run by transformers' bidirectional Qwen2 modules."""

    def __init__(self, source: models.DreamModel):
        super().__init__()
        official = {k: v for k, v in source.config.to_dict().items() if k != "rope_scaling"}  # null: off
        self.config = RemoteDreamConfig(**official)
        qwen = hf_qwen2_from_dream(source)
        self.model, self.lm_head = qwen.model, qwen.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return SimpleNamespace(logits=self.lm_head(hidden.last_hidden_state))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def random_ids(shape, seed=0) -> torch.Tensor:
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llada_remote():
    return LLaDAModelLM(tiny_model(seed=11, n_kv_heads=2)).eval()


@pytest.fixture(scope="module")
def dream_remote():
    return DreamModel(tiny_dream(seed=12)).eval()


@pytest.fixture(scope="module", params=["llada", "dream"])
def remote(request, llada_remote, dream_remote):
    return llada_remote if request.param == "llada" else dream_remote


OURS = {"LLaDAModelLM": (models.LLaDAModel, models.LLaDAConfig), "DreamModel": (models.DreamModel, models.DreamConfig)}


def test_stand_ins_are_recognised_and_ours_are_not(llada_remote, dream_remote):
    assert models.is_remote_code(llada_remote) and models.is_remote_code(dream_remote)
    assert not models.is_remote_code(tiny_model()) and not models.is_remote_code(tiny_dream())
    assert not models.is_remote_code(hf_llama_from_llada(tiny_model()))  # a transformers model: optimized as it is


def test_from_remote_code_shares_the_weights_and_computes_the_same(remote):
    converted = models.from_remote_code(remote)
    model_class, config_class = OURS[type(remote).__name__]
    assert type(converted) is model_class and type(converted.config) is config_class and not converted.training
    state = remote.state_dict()
    assert converted.state_dict().keys() == state.keys()
    assert all(t.data_ptr() == state[name].data_ptr() for name, t in converted.state_dict().items())
    ids = random_ids((2, 9))
    with torch.no_grad():
        assert relative_error(converted(ids), remote(ids).logits) <= RTOL


def test_bfloat16_remote_model_stays_bfloat16():
    remote = DreamModel(tiny_dream(seed=13)).to(torch.bfloat16)
    assert {p.dtype for p in models.from_remote_code(remote).parameters()} == {torch.bfloat16}


@pytest.fixture(scope="module")
def optimized(remote):
    return remote, surelock_fx.optimize(remote)


def test_optimize_takes_the_remote_model(optimized):
    """Its locked graph with every row active (and the eager backend's packed form) computes the stand-in's
    forward; the OptimizedModel carries our config."""
    remote, opt = optimized
    assert type(opt.config) is OURS[type(remote).__name__][1] and opt.config.mask_token_id == 100
    B, N = 2, 11
    x = random_ids((B, N), seed=5)
    positions = torch.arange(N).expand(B, N)
    keys = torch.ones(B, N, dtype=torch.bool)
    with torch.no_grad():
        want = remote(x).logits
        for run in (opt.graph_module, opt):
            caches = [torch.zeros(B, s.heads, N + 1, s.head_dim) for s in cache_specs(opt.graph_module)]
            got = run(x, positions, positions, keys, *caches)[0]
            assert relative_error(got.reshape(want.shape), want) <= RTOL


class NoPositions(torch.nn.Module):
    """A model of no family here whose forward takes no position_ids."""

    def __init__(self, model_type="mdlm"):
        super().__init__()
        self.config = PretrainedConfig(mask_token_id=3)
        self.config.model_type = model_type
        self.embed = torch.nn.Embedding(10, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.embed(input_ids)


def test_an_unknown_model_without_positions_gets_the_clear_error():
    with pytest.raises(ValueError, match="NoPositions.forward takes no position_ids: the locking rewrite needs "
                                         "positions as an input"):
        surelock_fx.optimize(NoPositions())


def test_from_remote_code_refuses_other_models_in_one_sentence():
    with pytest.raises(models.ConfigError, match=r"from_remote_code converts the official remote-code models of "
                                                 r"LLaDA \(model_type 'llada'\) and Dream \(model_type 'Dream'\), "
                                                 r"i\.e\. LLaDAModelLM and DreamModel; NoPositions has "
                                                 r"config\.model_type 'mdlm'") as caught:
        models.from_remote_code(NoPositions())
    assert "\n" not in str(caught.value)


def test_an_official_class_name_with_another_model_type_is_refused(llada_remote):
    impostor = copy.deepcopy(llada_remote)
    impostor.config.model_type = "llama"
    with pytest.raises(models.ConfigError, match="LLaDAModelLM has config.model_type 'llama'"):
        surelock_fx.optimize(impostor)


def test_a_remote_model_missing_a_tensor_is_named(dream_remote):
    broken = copy.deepcopy(dream_remote)
    broken.model.layers[1].self_attn.v_proj.bias = None
    with pytest.raises(models.CheckpointError, match=r"the state dict of DreamModel does not match a Dream model: "
                                                     r"missing tensors: model\.layers\.1\.self_attn\.v_proj\.bias"):
        surelock_fx.optimize(broken)


def test_a_remote_config_the_model_cannot_run_is_refused(dream_remote):
    sliding = copy.deepcopy(dream_remote)
    sliding.config.use_sliding_window = True
    with pytest.raises(models.ConfigError, match="DreamModel.config: config key 'use_sliding_window' is True: this "
                                                 "model implements only use_sliding_window=False"):
        models.from_remote_code(sliding)
