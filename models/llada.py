"""LLaDA: a LLaMA-style transformer with bidirectional attention (docs/DESIGN.md §3).

The module tree mirrors the official checkpoint, so ``state_dict()`` keys are the Hugging Face
names (``model.transformer.blocks.{i}.q_proj.weight`` ...). Plain tensors, no cache, no branches on
data: ``torch.export`` captures ``forward`` in one graph.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("llada",)
POSITIVE_INTS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
                 "max_sequence_length")
POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps")
TOKEN_IDS = ("mask_token_id", "eos_token_id")  # required, and inside the vocabulary
OPTIONAL_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eot_token_id")  # an integer or null
FLAGS = ("include_bias", "weight_tying")
# official config.json keys of computations this model does not implement, with the value that turns each off
UNSUPPORTED = {"rope": True, "alibi": False, "layer_norm_type": "rms", "scale_logits": False, "input_emb_norm": False,
               "clip_qkv": None}
# keys that no tensor shape can check: a config.json without them silently gets LLaDA-8B's values
UNCHECKED_DEFAULTS = ("rope_theta", "rms_norm_eps", "mask_token_id", "eos_token_id")
_warned: set = set()


class ConfigError(ValueError):
    """A checkpoint's config.json is missing keys or holds values this model cannot run."""


def warn_once(cause, message: str) -> None:
    """``warnings.warn(message)`` the first time this process meets ``cause`` (a hashable key)."""
    if cause not in _warned:
        _warned.add(cause)
        warnings.warn(message, stacklevel=3)


def read_json_object(path: Path, error: type[ValueError] = ConfigError) -> dict:
    """The JSON object in the file ``path``; ``error`` naming the file if it is not UTF-8, not JSON or no object."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): it is "
                    "corrupt or in another encoding; restore it or save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}; "
                    "fix it there or restore the file") from None
    if not isinstance(raw, dict):
        raise error(f"{path} holds a JSON {type(raw).__name__}, not an object: it must be one JSON object "
                    '{"key": value, ...}; restore the file')
    return raw


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- validation shared by the model families' configs (LLaDAConfig, dream.DreamConfig) ---

def check_types(config, positive_ints=(), positive_numbers=(), flags=(), token_ids=(), optional_token_ids=()) -> None:
    """Raise ConfigError naming the first of ``config``'s keys whose value is not of its kind: a positive integer,
    a positive finite number, true/false, an integer token id (``optional_token_ids``: or null)."""
    for key in positive_ints:
        value = getattr(config, key)
        if not _is_int(value) or value <= 0:
            raise ConfigError(f"config key {key!r} must be a positive integer, got {value!r}")
    for key in positive_numbers:
        value = getattr(config, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
            raise ConfigError(f"config key {key!r} must be a positive number, got {value!r}")
    for key in flags:
        if not isinstance(getattr(config, key), bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {getattr(config, key)!r}")
    for key in token_ids + optional_token_ids:
        value = getattr(config, key)
        if not _is_int(value) and (key in token_ids or value is not None):
            raise ConfigError(f"config key {key!r} must be an integer token id, got {value!r}; set it to "
                              f"the {key.removesuffix('_token_id')} token's id in the tokenizer")


def check_heads(width: int, heads: int, kv_heads: int, names: tuple[str, str, str]) -> None:
    """Raise ConfigError unless ``heads`` divide the model ``width`` into even head dimensions and ``kv_heads``
    divide ``heads``; ``names``: the config keys of the three, for the message."""
    width_key, heads_key, kv_key = names
    if width % heads:
        raise ConfigError(f"{width_key} ({width}) must be divisible by {heads_key} ({heads})")
    if (width // heads) % 2:
        raise ConfigError(f"head dimension {width_key}/{heads_key} = {width // heads} must be even for RoPE")
    if heads % kv_heads:
        raise ConfigError(f"{heads_key} ({heads}) must be a multiple of {kv_key} ({kv_heads}) "
                          "for grouped-query attention")


def check_token_ids(config, vocab: int) -> None:
    """Raise ConfigError if the mask, eos or eot id is outside [0, vocab), or eos or eot is the mask id."""
    for key in ("mask_token_id", "eos_token_id", "eot_token_id"):
        value = getattr(config, key)
        if value is not None and not 0 <= value < vocab:
            raise ConfigError(f"{key} {value} is outside the vocabulary [0, {vocab})")
    for key in ("eos_token_id", "eot_token_id"):
        if getattr(config, key) == config.mask_token_id:
            raise ConfigError(
                f"mask_token_id and {key} are both {config.mask_token_id}: the sampler could never tell a "
                f"generated {key.removesuffix('_token_id')} token from a mask; set mask_token_id to the "
                "mask token's id"
            )


def check_unsupported(raw: dict, unsupported: dict, family: str) -> None:
    """Raise ConfigError if config.json ``raw`` turns on a computation of ``unsupported`` (key -> the value
    that turns it off; a missing key is off)."""
    for key, off in unsupported.items():
        if raw.get(key, off) != off:
            raise ConfigError(f"config key {key!r} is {raw[key]!r}: this model implements only {key}={off!r}, "
                              f"as in {family}'s checkpoints; run this model with its own code instead")


def config_from_json(cls, path: str | Path, unchecked_defaults: tuple, reference: str):
    """``cls.from_dict`` of the config.json at ``path``; a ConfigError names the file. Warns once if it leaves
    a key of ``unchecked_defaults`` (one no tensor shape can check) unset: ``reference``'s value is used."""
    path = Path(path)
    raw = read_json_object(path)
    unset = tuple(key for key in unchecked_defaults if key not in raw)
    if unset:
        defaults = ", ".join(f"{key}={getattr(cls, key)!r}" for key in unset)
        warn_once((cls.__name__, "unset", unset), f"{path} sets no {', '.join(unset)}: using {reference}'s "
                                                  f"{defaults}; if this model was trained with other values, "
                                                  "add them there")
    try:
        return cls.from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


@dataclasses.dataclass(frozen=True)
class LLaDAConfig:
    """The keys of the official LLaDA ``config.json`` that define the computation.

    ``shifted_logits`` (a class constant, not a key): whether position i is predicted by logits row i - 1 (Dream)
    rather than row i (LLaDA); the model returns raw rows either way, the samplers apply the shift.
    ``positions_skip_padding`` (also a constant): LLaDA's positions are 0..N-1 with or without padding.
    """

    shifted_logits: ClassVar[bool] = False
    positions_skip_padding: ClassVar[bool] = False
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int | None = None
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int | None = 126081
    bos_token_id: int | None = 126080
    eot_token_id: int | None = 126348
    activation_type: str = "silu"
    block_type: str = "llama"
    include_bias: bool = False
    weight_tying: bool = False
    model_type: str = "llada"

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.embedding_size is None:
            object.__setattr__(self, "embedding_size", self.vocab_size)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Raise ConfigError naming the first key whose value this model cannot run, and how to fix it."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {self.model_type!r}: LLaDAConfig is for LLaDA checkpoints (model_type "
                f"'llada'; DreamConfig is for model_type 'Dream'); for another transformers model, load it with "
                f"transformers and pass it to surelock_fx.optimize() directly"
            )
        check_types(self, POSITIVE_INTS, POSITIVE_NUMBERS, FLAGS, TOKEN_IDS, OPTIONAL_TOKEN_IDS)
        check_heads(self.d_model, self.n_heads, self.n_kv_heads, ("d_model", "n_heads", "n_kv_heads"))
        if self.embedding_size < self.vocab_size:
            raise ConfigError(
                f"embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size})"
            )
        if self.activation_type not in ("silu", "swiglu"):
            raise ConfigError(f"activation_type {self.activation_type!r} is not supported; use 'silu'")
        if self.block_type != "llama":
            raise ConfigError(f"block_type {self.block_type!r} is not supported; use 'llama'")
        if self.include_bias:
            raise ConfigError("include_bias=true is not supported: LLaDA checkpoints have no biases")
        check_token_ids(self, self.embedding_size)

    @classmethod
    def from_dict(cls, raw: dict) -> "LLaDAConfig":
        """Build from an official config.json dict; unknown keys are ignored, unsupported values rejected."""
        check_unsupported(raw, UNSUPPORTED, "LLaDA")
        raw = dict(raw)
        raw.setdefault("model_type", "llada")
        if "max_sequence_length" not in raw and "max_position_embeddings" in raw:
            raw["max_sequence_length"] = raw["max_position_embeddings"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> "LLaDAConfig":
        """Read config.json; a ConfigError names the file. Warns once if it leaves a key no shape checks unset."""
        return config_from_json(cls, path, UNCHECKED_DEFAULTS, "LLaDA-8B")

    def to_dict(self) -> dict:
        """The official config.json keys, plus the fixed flags LLaDA's remote code expects."""
        out = dataclasses.asdict(self)
        out.update(architectures=["LLaDAModelLM"], rope=True, alibi=False, layer_norm_type="rms")
        return out


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype, then scaled by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of shape [B, 1, N, head_dim] in float32 (NeoX / rotate-half layout)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    )
    freqs = position_ids.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def rotary_and_key_mask(input_ids, attention_mask, position_ids, head_dim: int, theta: float):
    """(cos, sin, attn_mask) shared by a model's layers: RoPE at ``position_ids`` (default 0..N-1 in every row)
    and the key-padding mask [B, 1, 1, N] (True: attend) of ``attention_mask`` [B, N] (1 keep, 0 pad), or None."""
    B, N = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(N, device=input_ids.device).expand(B, N)
    cos, sin = rotary_cos_sin(position_ids, head_dim, theta)
    return cos, sin, None if attention_mask is None else attention_mask.bool()[:, None, None, :]


def rotary_attention(q, k, v, cos, sin, attn_mask, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Bidirectional attention of projections q [B, N, n_heads * d_h] and k, v [B, N, n_kv_heads * d_h], with RoPE
    on q and k and grouped-query heads (SDPA's enable_gqa): [B, N, n_heads * d_h], ready for the output projection."""
    B, N, width = q.shape
    head_dim = width // n_heads
    q = q.view(B, N, n_heads, head_dim).transpose(1, 2)
    k = k.view(B, N, n_kv_heads, head_dim).transpose(1, 2)
    v = v.view(B, N, n_kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=n_kv_heads != n_heads)
    return att.transpose(1, 2).reshape(B, N, width)


class LLaDABlock(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.config = config
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x, cos, sin, attn_mask):
        cfg = self.config
        h = self.attn_norm(x)
        att = rotary_attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), cos, sin, attn_mask, cfg.n_heads,
                               cfg.n_kv_heads)
        x = x + self.attn_out(att)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    """``forward(input_ids [B, N], attention_mask=None [B, N], position_ids=None [B, N]) -> logits``.

    ``attention_mask`` (1 keep, 0 pad) masks keys only, as LLaDA's padding does. ``position_ids``
    default to 0..N-1 for every row.
    """

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.embedding_size, config.d_model),
                blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
            )
        )
        if not config.weight_tying:
            self.model.transformer["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        t = self.model.transformer
        return t.wte.weight if self.config.weight_tying else t.ff_out.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        t = self.model.transformer
        cos, sin, attn_mask = rotary_and_key_mask(input_ids, attention_mask, position_ids, self.config.head_dim,
                                                  self.config.rope_theta)
        x = t.wte(input_ids)
        for block in t.blocks:
            x = block(x, cos, sin, attn_mask)
        return F.linear(t.ln_f(x), self.lm_head_weight)
