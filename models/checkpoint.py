"""Hugging Face-format LLaDA checkpoints: config.json plus safetensors, single file or sharded."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .llada import ConfigError, LLaDAConfig, LLaDAModel

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or holds tensors that do not fit the model."""


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{path / INDEX_FILE} is malformed ({err}); it needs a 'weight_map'") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path} is missing shard(s) listed in {INDEX_FILE}: {', '.join(missing)}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise CheckpointError(
        f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards "
        "(save one with surelock_fx.models.save_model)"
    )


def load_config(path: str | Path) -> LLaDAConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; a Hugging Face-format LLaDA checkpoint needs one")
    return LLaDAConfig.from_json(path / "config.json")


def load_model(path, dtype: torch.dtype | None = None, device=None) -> LLaDAModel:
    """Load a checkpoint directory into an eval-mode LLaDAModel.

    The model is built on the meta device and each tensor is read from disk straight into its
    place (cast to ``dtype`` if given), so the weights are never held twice.
    """
    path = Path(path)
    config = load_config(path)
    with torch.device("meta"):
        model = LLaDAModel(config)
    expected = {name: p for name, p in model.named_parameters()}
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in _weight_files(path):
        with safe_open(file, framework="pt", device=str(device or "cpu")) as f:
            for name in f.keys():
                if name not in expected:
                    unexpected.append(name)
                    continue
                tensor = f.get_tensor(name)
                want = tuple(expected[name].shape)
                if tuple(tensor.shape) != want:
                    raise CheckpointError(
                        f"tensor {name} in {file.name} has shape {tuple(tensor.shape)}, but config.json "
                        f"implies {want}; the config and the weights do not belong together"
                    )
                _assign(model, name, tensor.to(dtype) if dtype is not None else tensor)
                seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            more = " ..." if len(unexpected) > 8 else ""
            parts.append(f"unexpected tensors: {', '.join(sorted(unexpected)[:8])}{more}")
        raise CheckpointError(f"{path} does not match a LLaDA model: " + "; ".join(parts))
    return model.eval()


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(tensor, requires_grad=False))


def save_model(model: LLaDAModel, path, max_shard_bytes: int | None = None) -> Path:
    """Write config.json and safetensors weights; shard when the weights exceed max_shard_bytes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})
        return path
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return path


def from_hf_llada(hf_model: torch.nn.Module) -> LLaDAModel:
    """Convert an in-memory Hugging Face LLaDA model (remote code, model_type 'llada') by its state dict."""
    hf_config = getattr(hf_model, "config", None)
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "llada":
        raise ConfigError(
            f"from_hf_llada expects a LLaDA model (config.model_type 'llada'), got {model_type!r}"
        )
    config = LLaDAConfig.from_dict(hf_config.to_dict())
    model = LLaDAModel(config)
    state = hf_model.state_dict()
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"the model's state dict does not match LLaDA: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return model.to(next(iter(state.values())).dtype).eval()
