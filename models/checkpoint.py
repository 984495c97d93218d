"""Hugging Face-format LLaDA and Dream checkpoints: config.json plus safetensors, single file or sharded; and
the conversion of the official remote-code models (``AutoModel.from_pretrained(..., trust_remote_code=True)``)."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Iterator, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .dream import DreamConfig, DreamModel
from .llada import ConfigError, LLaDAConfig, LLaDAModel, read_json_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # dtypes the model can run in
Config = Union[LLaDAConfig, DreamConfig]
Model = Union[LLaDAModel, DreamModel]


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or holds tensors that do not fit the model."""


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its config.json ``model_type``, our config and model classes, and the class name of the
    official remote-code model."""

    name: str
    model_type: str
    config: type
    model: type
    remote_class: str


FAMILIES = (Family("LLaDA", "llada", LLaDAConfig, LLaDAModel, "LLaDAModelLM"),
            Family("Dream", "Dream", DreamConfig, DreamModel, "DreamModel"))
DEFAULT_MODEL_TYPE = "llada"  # a config.json without model_type is LLaDA's, as the first versions wrote them
SUPPORTED = " and ".join(f"{f.name} (model_type {f.model_type!r})" for f in FAMILIES)


def family_of(model_type) -> Family:
    """The family of a config.json ``model_type``; a ConfigError listing the supported types for another."""
    for family in FAMILIES:
        if model_type == family.model_type:
            return family
    hint = ""
    if isinstance(model_type, str):
        near = [f.model_type for f in FAMILIES if f.model_type.lower() == model_type.lower()]
        hint = f" (model_type is case-sensitive: did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(f"unknown model_type {model_type!r}{hint}: surelock_fx.models loads {SUPPORTED} "
                      "checkpoints; for another transformers model, load it with transformers and pass it to "
                      "surelock_fx.optimize() directly")


def _family_of_config(config) -> Family:
    for family in FAMILIES:
        if isinstance(config, family.config):
            return family
    raise TypeError(f"{type(config).__name__} is not the config of a model surelock_fx.models saves ({SUPPORTED})")


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        weight_map = read_json_object(path / INDEX_FILE, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{path / INDEX_FILE} is malformed: it needs a 'weight_map' object of tensor "
                                  "name -> shard file name; restore it or re-save the checkpoint")
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


def load_config(path: str | Path) -> Config:
    """The checkpoint directory's config.json, checked: a LLaDAConfig or a DreamConfig by its ``model_type``
    ('llada', the default, or 'Dream'); a CheckpointError or ConfigError says what is wrong."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path} is a file: give the checkpoint directory that holds config.json and the weights")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} has no config.json; a Hugging Face-format LLaDA or Dream checkpoint needs one")
    try:
        family = family_of(read_json_object(file).get("model_type", DEFAULT_MODEL_TYPE))
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None
    return family.config.from_json(file)


def load_model(path, dtype: torch.dtype | None = None, device=None) -> Model:
    """Load a checkpoint directory into an eval-mode LLaDAModel or DreamModel (config.json's ``model_type``); the
    directory is only read.

    The model is built on the meta device and each tensor is read from disk straight into its
    place (cast to ``dtype`` if given), so the weights are never held twice. Each tensor is checked as
    it loads: floating point, the shape config.json implies, and finite after the cast
    (``torch.isfinite``: one more pass over the weights, cheap next to reading them). A corrupt file,
    NaN or inf weights, or (without ``dtype``) weights of mixed dtypes raise a CheckpointError naming them.
    config.json's ``torch_dtype`` is not read: without ``dtype`` the model keeps the weights' own dtype. A
    config.json without rope_theta, rms_norm_eps or a required token id warns once: LLaDA-8B's (Dream-v0-7B's)
    value is used.
    """
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype} is not one the model computes in; use one of {COMPUTE_DTYPES}")
    path = Path(path)
    config = load_config(path)
    family = _family_of_config(config)
    files = _weight_files(path)
    with torch.device("meta"):
        model = family.model(config)
    expected = dict(model.named_parameters())
    unexpected, nonfinite, overflow = [], [], []
    for file in files:
        for name, tensor in _tensors(file, expected, device):
            if tensor is None:
                unexpected.append(name)
                continue
            _check_tensor(file, name, tensor, tuple(expected[name].shape), dtype, family)
            kept = tensor if dtype is None else tensor.to(dtype)
            if not torch.isfinite(kept).all():
                (overflow if torch.isfinite(tensor).all() else nonfinite).append(name)
            _assign(model, name, kept)
    _check_complete(str(path), family, _missing(model), unexpected)
    _check_finite(path, nonfinite, overflow, dtype)
    if dtype is None:
        _check_one_dtype(path, model)
    return model.eval()


def _tensors(file: Path, wanted, device) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, tensor) for each tensor in a safetensors file, read one at a time; None for names not in ``wanted``
    (not read). An unreadable file is a CheckpointError naming it."""
    try:
        with safe_open(file, framework="pt", device=str(device or "cpu")) as f:
            for name in f.keys():
                yield name, f.get_tensor(name) if name in wanted else None
    except SafetensorError as err:
        raise CheckpointError(f"{file} is corrupt or incomplete (safetensors: {err}); re-download or re-save "
                              "it") from None


def _check_tensor(file: Path, name: str, tensor: torch.Tensor, want: tuple, dtype, family: Family) -> None:
    if not tensor.is_floating_point():
        raise CheckpointError(f"tensor {name} in {file} has dtype {tensor.dtype}, but weights must be floating "
                              f"point (a quantized or non-{family.name} file?); save the weights in bfloat16 or "
                              "float32")
    if dtype is None and tensor.dtype not in COMPUTE_DTYPES:
        raise CheckpointError(f"tensor {name} in {file} is {tensor.dtype}, which the model cannot compute in; "
                              "load it with dtype=torch.bfloat16 or torch.float32 (--dtype)")
    if tuple(tensor.shape) != want:
        raise CheckpointError(
            f"tensor {name} in {file} has shape {tuple(tensor.shape)}, but config.json "
            f"implies {want}; the config and the weights do not belong together"
        )


def _names(names: list[str]) -> str:
    return ", ".join(sorted(names)[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")


def _missing(model: torch.nn.Module) -> list[str]:
    return sorted(name for name, p in model.named_parameters() if p.is_meta)


def _check_complete(source: str, family: Family, missing: list[str], unexpected: list[str]) -> None:
    parts = [f"{what} tensors: {_names(names)}" for what, names in (("missing", missing), ("unexpected", unexpected))
             if names]
    if parts:
        raise CheckpointError(f"{source} does not match a {family.name} model: " + "; ".join(parts))


def _check_finite(path: Path, nonfinite: list[str], overflow: list[str], dtype) -> None:
    if nonfinite:
        raise CheckpointError(f"{path} holds NaN or inf in tensor(s) {_names(nonfinite)}; these weights cannot "
                              "decode: re-download them or export them again from a healthy model")
    if overflow:
        raise CheckpointError(f"tensor(s) {_names(overflow)} in {path} exceed the range of {dtype} "
                              f"(at most {torch.finfo(dtype).max:g}); load them in bfloat16 or float32 (--dtype)")


def _check_one_dtype(path: Path, model: torch.nn.Module) -> None:
    dtypes = Counter(str(p.dtype).removeprefix("torch.") for p in model.parameters())
    if len(dtypes) > 1:
        mix = ", ".join(f"{n} {d}" for d, n in sorted(dtypes.items()))
        raise CheckpointError(f"{path} mixes weight dtypes ({mix} tensors), which one model cannot compute in; "
                              "pass dtype= (--dtype) to load them all in one")


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(tensor, requires_grad=False))


def save_model(model: Model, path, max_shard_bytes: int | None = None) -> Path:
    """Write config.json (the family's official layout) and safetensors weights; shard when the weights exceed
    max_shard_bytes."""
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
    """Convert an in-memory Hugging Face LLaDA model (remote code, model_type 'llada') by its state dict (its
    weights shared, on their device; cast to one dtype if they mix)."""
    return _convert(hf_model, FAMILIES[0], "from_hf_llada")


def from_hf_dream(hf_model: torch.nn.Module) -> DreamModel:
    """Convert an in-memory Hugging Face Dream model (remote code, model_type 'Dream') by its state dict, as
    ``from_hf_llada`` converts LLaDA's."""
    return _convert(hf_model, FAMILIES[1], "from_hf_dream")


def is_remote_code(module: torch.nn.Module) -> bool:
    """Whether ``module`` looks like an official remote-code model of a family here (``LLaDAModelLM``, ``DreamModel``
    from ``AutoModel.from_pretrained(path, trust_remote_code=True)``), by its class name or its
    ``config.model_type``; our own models are not. Nothing remote is imported."""
    if isinstance(module, tuple(f.model for f in FAMILIES)):
        return False
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return any(type(module).__name__ == f.remote_class or model_type == f.model_type for f in FAMILIES)


def from_remote_code(module: torch.nn.Module) -> Model:
    """Our LLaDAModel or DreamModel computing what an official remote-code model computes: ``LLaDAModelLM``
    (config.model_type 'llada', whose forward takes no position_ids) or ``DreamModel`` (config.model_type
    'Dream'), converted by its config and state dict. The weights are shared, not copied, and stay on their
    device (cast to one dtype if they mix). Anything else is a ConfigError naming the families supported."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type == family.model_type:
            return _convert(module, family, "from_remote_code")
    raise ConfigError(
        f"from_remote_code converts the official remote-code models of {SUPPORTED}, i.e. "
        f"{' and '.join(f.remote_class for f in FAMILIES)}; {type(module).__name__} has config.model_type "
        f"{model_type!r}; for another transformers model, pass it to surelock_fx.optimize() directly"
    )


def _convert(hf_model: torch.nn.Module, family: Family, caller: str) -> Model:
    """``family``'s model on ``hf_model``'s config and tensors (shared): a ConfigError for a config of another
    family or with values the model cannot run, a CheckpointError naming tensors that do not fit."""
    hf_config = getattr(hf_model, "config", None)
    model_type = getattr(hf_config, "model_type", None)
    if model_type != family.model_type:
        raise ConfigError(f"{caller} expects a {family.name} model (config.model_type {family.model_type!r}), got "
                          f"{type(hf_model).__name__} with config.model_type {model_type!r}")
    try:
        config = family.config.from_dict(hf_config.to_dict())
    except ConfigError as err:
        raise ConfigError(f"{type(hf_model).__name__}.config: {err}") from None
    with torch.device("meta"):
        model = family.model(config)
    expected = dict(model.named_parameters())
    source = f"the state dict of {type(hf_model).__name__}"
    state = hf_model.state_dict()
    unexpected = []
    for name, tensor in state.items():
        if name not in expected:
            unexpected.append(name)
        elif tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"tensor {name} in {source} has shape {tuple(tensor.shape)}, but its config "
                                  f"implies {tuple(expected[name].shape)}; the config and the weights do not "
                                  "belong together")
        else:
            _assign(model, name, tensor)
    _check_complete(source, family, _missing(model), unexpected)
    return model.to(next(iter(state.values())).dtype).eval()
