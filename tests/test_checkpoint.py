"""Checkpoint I/O: save/load round trips, dtype casting, HF in-memory conversion, and clear errors."""
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from surelock_fx.models import CheckpointError, ConfigError, LLaDAModel, from_hf_llada, load_model, save_model
from surelock_fx.models import checkpoint as checkpoint_module

from helpers import tiny_model

IDS = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
SHARD_BYTES = 40_000  # a tiny model is ~200 kB in float32, so this makes several shards


def logits(model):
    with torch.no_grad():
        return model(IDS)


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_kv_heads=2)


@pytest.mark.parametrize("max_shard_bytes", [None, SHARD_BYTES], ids=["single-file", "sharded"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_is_exact(tmp_path, max_shard_bytes, tied):
    source = tiny_model(weight_tying=tied)
    save_model(source, tmp_path, max_shard_bytes=max_shard_bytes)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    if max_shard_bytes:
        assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    else:
        assert not shards and (tmp_path / "model.safetensors").is_file()
    loaded = load_model(tmp_path)
    assert loaded.config == source.config
    assert loaded.state_dict().keys() == source.state_dict().keys()
    assert torch.equal(logits(loaded), logits(source))


def test_loaded_model_is_materialized_and_in_eval_mode(tmp_path, model):
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert not loaded.training
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert tensors and all(not t.is_meta and t.device.type == "cpu" for t in tensors)


def test_load_builds_the_skeleton_on_meta(tmp_path, model, monkeypatch):
    """The model is constructed without storage, so weights are held once, not twice, while loading."""
    built_on = []
    original_init = LLaDAModel.__init__

    def spying_init(self, config):
        original_init(self, config)
        built_on.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(checkpoint_module.LLaDAModel, "__init__", spying_init)
    save_model(model, tmp_path)
    load_model(tmp_path)
    assert built_on == [{"meta"}]


def test_dtype_argument_casts_on_load(tmp_path, model):
    save_model(model, tmp_path, max_shard_bytes=SHARD_BYTES)
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    out = logits(loaded)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, logits(copy.deepcopy(model).to(torch.bfloat16)))


class FakeLLaDAConfig(PretrainedConfig):
    """Stands in for the remote-code LLaDA config class (model_type 'llada')."""

    model_type = "llada"


class FakeHFLLaDA(torch.nn.Module):
    """An in-memory HF LLaDA: a ``config`` and state dict keys ``model.transformer...``."""

    def __init__(self, source: LLaDAModel, model_type="llada"):
        super().__init__()
        self.config = FakeLLaDAConfig(**source.config.to_dict())
        self.config.model_type = model_type
        self.model = copy.deepcopy(source.model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hf_llada_matches(model, dtype):
    fake = FakeHFLLaDA(model).to(dtype)
    converted = from_hf_llada(fake)
    assert converted.config == model.config and not converted.training
    assert {p.dtype for p in converted.parameters()} == {dtype}
    assert torch.equal(logits(converted), logits(copy.deepcopy(model).to(dtype)))


def test_from_hf_llada_rejects_other_model_types(model):
    with pytest.raises(ConfigError, match="'llama'"):
        from_hf_llada(FakeHFLLaDA(model, model_type="llama"))


def test_from_hf_llada_names_missing_tensors(model):
    fake = FakeHFLLaDA(model)
    del fake.model.transformer["ln_f"]
    with pytest.raises(CheckpointError, match=r"model\.transformer\.ln_f\.weight"):
        from_hf_llada(fake)


# --- error cases: each breaks a saved checkpoint one way and expects the message to name it ---

def rewrite_weights(path: Path, edit) -> None:
    """Apply ``edit(tensors)`` to the single-file weights in place."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def rewrite_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


Q_PROJ = "model.transformer.blocks.0.q_proj.weight"
BREAKERS = {
    "missing-config": (lambda p: (p / "config.json").unlink(), CheckpointError, "no config.json"),
    "missing-weights": (lambda p: (p / "model.safetensors").unlink(), CheckpointError, "no weights"),
    "malformed-json": (lambda p: (p / "config.json").write_text("{\"d_model\": 64,"), ConfigError,
                       "not valid JSON"),
    "unknown-model-type": (lambda p: rewrite_config(p, model_type="dream"), ConfigError,
                           "unknown model_type 'dream'"),
    "missing-tensor": (lambda p: rewrite_weights(p, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight")),
                       CheckpointError, r"missing tensors: model\.transformer\.blocks\.1\.up_proj\.weight"),
    "unexpected-tensor": (lambda p: rewrite_weights(p, lambda t: t.update(extra=torch.zeros(3))),
                          CheckpointError, "unexpected tensors: extra"),
    "mis-shaped-tensor": (lambda p: rewrite_weights(p, lambda t: t.update({Q_PROJ: torch.zeros(64, 60)})),
                          CheckpointError, r"tensor model\.transformer\.blocks\.0\.q_proj\.weight .*\(64, 60\)"),
}


@pytest.mark.parametrize("case", list(BREAKERS))
def test_broken_checkpoint_error_names_the_problem(tmp_path, model, case):
    breaker, error, message = BREAKERS[case]
    save_model(model, tmp_path)
    breaker(tmp_path)
    with pytest.raises(error, match=message):
        load_model(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere.*does not exist"):
        load_model(tmp_path / "nowhere")


def test_missing_shard_is_named(tmp_path, model):
    save_model(model, tmp_path, max_shard_bytes=SHARD_BYTES)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shard.name}"):
        load_model(tmp_path)

