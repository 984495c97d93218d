"""Dream-v0 (HKUNLP): Qwen2 with bidirectional attention (docs/DESIGN.md §3, §7).

The module tree mirrors the official checkpoint, so ``state_dict()`` keys are the Hugging Face names
(``model.layers.{i}.self_attn.q_proj.bias`` ...). Plain tensors, no cache, no branches on data: ``torch.export``
captures ``forward`` in one graph, and ``surelock_fx.optimize`` locks it as it does LLaDA.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch.nn.functional as F
from torch import nn

from .llada import (
    ConfigError,
    RMSNorm,
    check_heads,
    check_token_ids,
    check_types,
    check_unsupported,
    config_from_json,
    rotary_and_key_mask,
    rotary_attention,
)

POSITIVE_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings")
POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps")
TOKEN_IDS = ("mask_token_id", "eos_token_id")  # required, and inside the vocabulary
OPTIONAL_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eot_token_id")  # an integer or null
FLAGS = ("tie_word_embeddings",)
# official config.json keys of computations this model does not implement, with the value that turns each off
UNSUPPORTED = {"rope_scaling": None, "use_sliding_window": False}
# keys that no tensor shape can check: a config.json without them silently gets Dream-v0-7B's values
UNCHECKED_DEFAULTS = ("rope_theta", "rms_norm_eps", "mask_token_id", "eos_token_id")


@dataclasses.dataclass(frozen=True)
class DreamConfig:
    """The keys of the official Dream ``config.json`` that define the computation (defaults: Dream-v0-7B's).

    ``eot_token_id`` is not an official key: it is Qwen2's ``<|im_end|>`` (151645), the end of an
    instruct turn, which the samplers treat as LLaDA's ``<|eot_id|>``. The properties ``d_model``,
    ``n_layers``, ``n_heads``, ``n_kv_heads``, ``head_dim``, ``mlp_hidden_size``, ``embedding_size``,
    ``max_sequence_length`` and ``weight_tying`` give the sizes under LLaDAConfig's names, which the rest of
    the package reads. ``shifted_logits``: position i is predicted by logits row i - 1 (position 0 by row 0);
    the model returns the raw rows, as the official DreamModel does, and the samplers apply the shift.
    ``positions_skip_padding``: with left padding, a token's position counts the real tokens before it
    (Dream's sampler; ``decoding.position_ids``).
    """

    shifted_logits: ClassVar[bool] = True
    positions_skip_padding: ClassVar[bool] = True
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    vocab_size: int = 152064
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    mask_token_id: int = 151666
    eos_token_id: int = 151643
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151643
    eot_token_id: int | None = 151645
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    model_type: str = "Dream"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        self.validate()

    # LLaDAConfig's names, read by the samplers, the runtime and the benchmarks
    d_model = property(lambda self: self.hidden_size)
    n_layers = property(lambda self: self.num_hidden_layers)
    n_heads = property(lambda self: self.num_attention_heads)
    n_kv_heads = property(lambda self: self.num_key_value_heads)
    mlp_hidden_size = property(lambda self: self.intermediate_size)
    embedding_size = property(lambda self: self.vocab_size)
    max_sequence_length = property(lambda self: self.max_position_embeddings)
    weight_tying = property(lambda self: self.tie_word_embeddings)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ConfigError naming the first key whose value this model cannot run, and how to fix it."""
        if self.model_type != "Dream":
            raise ConfigError(
                f"unknown model_type {self.model_type!r}: DreamConfig is for Dream checkpoints (model_type "
                "'Dream'; LLaDAConfig is for model_type 'llada'); for another transformers model, load it with "
                "transformers and pass it to surelock_fx.optimize() directly"
            )
        check_types(self, POSITIVE_INTS, POSITIVE_NUMBERS, FLAGS, TOKEN_IDS, OPTIONAL_TOKEN_IDS)
        check_heads(self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                    ("hidden_size", "num_attention_heads", "num_key_value_heads"))
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported: Dream's MLP is SwiGLU; use 'silu'")
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=true is not supported: Dream checkpoints have an untied "
                              "lm_head; set it to false and save lm_head.weight")
        check_token_ids(self, self.vocab_size)

    @classmethod
    def from_dict(cls, raw: dict) -> "DreamConfig":
        """Build from an official config.json dict; unknown keys are ignored, unsupported values rejected.

        A ``rope_parameters`` object (transformers 5's form of ``rope_theta`` and ``rope_scaling``) is read
        too: it must be of rope_type 'default'.
        """
        check_unsupported(raw, UNSUPPORTED, "Dream")
        raw = dict(raw)
        rope = raw.get("rope_parameters")
        if rope is not None:
            if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
                raise ConfigError(f"config key 'rope_parameters' is {rope!r}: this model implements only "
                                  "rope_type 'default' (no RoPE scaling), as in Dream's checkpoints; run this "
                                  "model with its own code instead")
            if "rope_theta" in rope:
                raw.setdefault("rope_theta", rope["rope_theta"])
        raw.setdefault("model_type", "Dream")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> "DreamConfig":
        """Read config.json; a ConfigError names the file. Warns once if it leaves a key no shape checks unset."""
        return config_from_json(cls, path, UNCHECKED_DEFAULTS, "Dream-v0-7B")

    def to_dict(self) -> dict:
        """The official config.json layout: these keys, plus the fixed values Dream's remote code expects."""
        out = dataclasses.asdict(self)
        out.update(architectures=["DreamModel"], rope_scaling=None, use_sliding_window=False, sliding_window=None,
                   max_window_layers=self.num_hidden_layers, attention_dropout=0.0)
        return out


class DreamAttention(nn.Module):
    """Qwen2 attention: q, k, v projections with biases, o_proj without, grouped-query heads."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(d, self.heads * hd, bias=True)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)

    def forward(self, h, cos, sin, attn_mask):
        att = rotary_attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), cos, sin, attn_mask, self.heads,
                               self.kv_heads)
        return self.o_proj(att)


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        d, ff = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, h):
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.self_attn = DreamAttention(config)
        self.mlp = DreamMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamModel(nn.Module):
    """``forward(input_ids [B, N], attention_mask=None [B, N], position_ids=None [B, N]) -> logits [B, N, V]``.

    As LLaDAModel: ``attention_mask`` (1 keep, 0 pad) masks keys only, and ``position_ids`` default to 0..N-1 in
    every row. The official DreamModel's 4-D mask is the key mask AND its transpose: it differs from ours
    only in the query rows of padding positions, whose outputs nobody reads. (Dream's sampler gives left-padded
    rows the positions cumsum(mask) - 1, padding positions 1: pass them as ``position_ids``.) The logits are
    the raw rows, not shifted (``DreamConfig.shifted_logits``). RoPE is applied in float32 and cast back, as in
    LLaDAModel; the official code casts cos and sin to the activations' dtype first, which in bfloat16 differs
    by rounding only.
    """

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DreamDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def lm_head_weight(self):
        return self.lm_head.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        cos, sin, attn_mask = rotary_and_key_mask(input_ids, attention_mask, position_ids, self.config.head_dim,
                                                  self.config.rope_theta)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn_mask)
        return self.lm_head(self.model.norm(x))
