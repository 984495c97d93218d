"""Shared test helpers: tiny LLaDA configs and models, graph checks, and an independent transformers reference.

``hf_llama_from_llada`` maps an ``LLaDAModel``'s weights onto transformers' ``LlamaForCausalLM``
with bidirectional attention (docs/DESIGN.md §3), which computes the same function through code this
project did not write.
"""
from __future__ import annotations

import functools
from collections import Counter

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from surelock_fx.models import LLaDAConfig, LLaDAModel, random_weights_
from surelock_fx.signature import cache_specs

TINY_DEFAULTS = dict(
    d_model=64,
    n_layers=2,
    n_heads=4,
    mlp_hidden_size=96,
    vocab_size=101,
    mask_token_id=100,
    eos_token_id=99,
    eot_token_id=98,
    bos_token_id=97,
    pad_token_id=99,
    rope_theta=10000.0,
    max_sequence_length=512,
)

# LLaDA block parameter -> LLaMA decoder-layer parameter (both relative to their layer).
BLOCK_TO_LLAMA = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}


def counts(gm) -> Counter:
    """Call-function nodes of a graph module, by target."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


@functools.cache
def shared_tiny_model(seed: int, dtype: torch.dtype = torch.float32, **overrides) -> LLaDAModel:
    """``tiny_model(seed, **overrides)`` in ``dtype``, built once per test session and shared by the tests
    that ask for it (they must not modify it), so that ``captured`` captures it once."""
    return tiny_model(seed, **overrides).to(dtype)


@functools.cache
def _captured(model: torch.nn.Module, locked: bool):
    from surelock_fx.capture import capture
    from surelock_fx.passes import lock_rows

    gm = capture(model)
    return lock_rows(gm) if locked else gm


def captured(model: torch.nn.Module, locked: bool = True):
    """``model`` captured (and, if ``locked``, rewritten by ``lock_rows``) once per test session: each
    call returns a copy of that graph sharing the model's weights, for passes to rewrite in place
    (torch.export takes seconds even for a tiny model)."""
    from surelock_fx.passes import copy_graph_module

    return copy_graph_module(_captured(model, locked))


def locked_inputs(gm, N, active, gen, dtype=torch.float32):
    """Random inputs of a locked graph ``gm`` over N positions with ``active[b]`` random positions in batch
    row b (sorted, padded with N to the largest count, at least 1) and random caches."""
    B, M = len(active), max(max(active), 1)
    index = torch.full((B, M), N)
    for b, count in enumerate(active):
        index[b, :count] = torch.randperm(N, generator=gen)[:count].sort().values
    caches = [torch.randn(B, s.heads, N + 1, s.head_dim, generator=gen).to(dtype) for s in cache_specs(gm)]
    return (torch.randint(0, 97, (B, N), generator=gen), torch.arange(N).expand(B, N), index,
            torch.ones(B, N, dtype=torch.bool), *caches)


def assert_unchanged_by(graph_pass, gm) -> None:
    """Running ``graph_pass`` on ``gm`` leaves its code as it was."""
    code = gm.code
    assert graph_pass(gm).code == code


def prompts(B: int, P: int, seed: int = 0) -> torch.Tensor:
    """[B, P] random prompt ids below the tiny models' special tokens (97 and up)."""
    return torch.randint(0, 97, (B, P), generator=torch.Generator().manual_seed(seed))


def tiny_config(**overrides) -> LLaDAConfig:
    """A small LLaDA config (d_model 64, 2 layers, 4 heads, vocab 101, mask id 100) with overrides."""
    return LLaDAConfig(**{**TINY_DEFAULTS, **overrides})


def randomize_(model: LLaDAModel, seed: int = 0, logit_scale: float = 3.0) -> LLaDAModel:
    """``surelock_fx.models.random_weights_``: every parameter seeded random, norm weights included (not ones)."""
    return random_weights_(model, seed, logit_scale)


def tiny_model(seed: int = 0, **overrides) -> LLaDAModel:
    """A randomly initialised float32 LLaDAModel on ``tiny_config(**overrides)``, in eval mode. Built with
    its default initialisation first, which draws from torch's global generator as tests expect."""
    return randomize_(LLaDAModel(tiny_config(**overrides)), seed)


def bidirectional_hf_config(config_class, config, **extra):
    """The transformers config of ``config_class`` computing the same function as our LLaDA or Dream config (both
    answer to LLaDAConfig's names), with attention made bidirectional; ``extra``: the family's own keys."""
    hf = config_class(
        vocab_size=config.embedding_size,
        hidden_size=config.d_model,
        intermediate_size=config.mlp_hidden_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        hidden_act="silu",
        max_position_embeddings=config.max_sequence_length,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.weight_tying,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        attn_implementation="sdpa",
        **extra,
    )
    hf.is_causal = False
    return hf


def llama_config_for(config: LLaDAConfig) -> LlamaConfig:
    """The LlamaConfig computing the same function as a LLaDA config, with attention made bidirectional."""
    return bidirectional_hf_config(LlamaConfig, config, attention_bias=False, mlp_bias=False)


def bidirectional_hf_model(model_class, hf_config, state_dict, dtype):
    """``model_class(hf_config)`` holding ``state_dict``, in ``dtype`` and eval mode, every attention module's own
    ``is_causal`` flag (which sdpa falls back to when the mask is skipped, in some transformers versions) cleared."""
    hf = model_class(hf_config)
    for layer in hf.model.layers:
        layer.self_attn.is_causal = False
    result = hf.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    return hf.to(dtype).eval()


def llama_state_dict(model: LLaDAModel) -> dict[str, torch.Tensor]:
    """The LLaDA state dict under LlamaForCausalLM's parameter names."""
    out = {}
    for name, tensor in model.state_dict().items():
        assert name.startswith("model.transformer."), name
        rest = name[len("model.transformer."):]
        if rest.startswith("blocks."):
            _, index, module, leaf = rest.split(".")
            out[f"model.layers.{index}.{BLOCK_TO_LLAMA[module]}.{leaf}"] = tensor
        else:
            top = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
                   "ff_out.weight": "lm_head.weight"}
            out[top[rest]] = tensor
    if model.config.weight_tying:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def hf_llama_from_llada(model: LLaDAModel) -> LlamaForCausalLM:
    """A bidirectional transformers ``LlamaForCausalLM`` (sdpa) holding ``model``'s weights, in eval mode.

    ``config.is_causal = False`` makes transformers build bidirectional masks and pass
    ``is_causal=False`` to attention; each attention module's own ``is_causal`` flag (which sdpa
    falls back to when the mask is skipped, in some transformers versions) is cleared as well.
    ``tests/test_model.py`` checks the result really is bidirectional.
    """
    return bidirectional_hf_model(LlamaForCausalLM, llama_config_for(model.config), llama_state_dict(model),
                                  model.lm_head_weight.dtype)


def save_code_checkpoint(path):
    """Save a random-weight stand-in for tiny-code into ``path``: a 1-layer LLaDA with a byte-level BPE tokenizer
    (``<|hole|>`` included) trained on one source file. Needs ``benchmarks/`` on sys.path (``code_corpus``)."""
    from pathlib import Path

    from surelock_fx.models import random_llada, save_model
    from surelock_fx.tasks import special_token_ids

    import code_corpus

    tokenizer = code_corpus.train_tokenizer([Path(code_corpus.__file__).read_text()], vocab_size=400)
    config = LLaDAConfig(d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=48, vocab_size=len(tokenizer),
                         rope_theta=10000.0, max_sequence_length=1024, **special_token_ids(tokenizer))
    save_model(random_llada(config, seed=0), path)
    tokenizer.save_pretrained(path)
    return path


def save_task_checkpoint(path):
    """A random 1-layer LLaDA with the synthetic tasks' tokenizer, saved as a checkpoint directory."""
    from surelock_fx import tasks
    from surelock_fx.models import save_model

    tokenizer = tasks.build_tokenizer()
    config = LLaDAConfig(d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=48, vocab_size=len(tokenizer),
                         rope_theta=10000.0, **tasks.special_token_ids(tokenizer))
    torch.manual_seed(0)
    save_model(LLaDAModel(config), path)
    tokenizer.save_pretrained(path)
    return path


def run_locked(graph, inputs: tuple, rows_packed: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits [B, M, V], caches) of a locked graph on ``inputs``; a graph with packed rows
    (``rows_packed``) gets its two extra inputs and has its [1, R, V] logits spread back over the index
    entries (padding entries then hold some real row's)."""
    if not rows_packed:
        logits, *caches = graph(*inputs)
        return logits, caches
    from surelock_fx.signature import pack_index

    x, positions, index, key_mask, *caches = inputs
    packed_rows, unpack_index = pack_index(index, x.shape[1])
    logits, *caches = graph(x, positions, index, key_mask, packed_rows, unpack_index, *caches)
    return logits[0][unpack_index], caches


def assert_in_place_graph_matches_functional(locked, rewritten, B: int, N: int, M: int) -> None:
    """``rewritten``, a locked graph that updates its caches in place, against the functional
    ``locked`` on random inputs with padding rows: the same logits, and its cache inputs returned,
    holding what ``locked`` returns (the scratch slot aside: padding rows write it in any order)."""
    from surelock_fx.signature import cache_specs

    gen = torch.Generator().manual_seed(B * N + M)
    index = torch.stack([torch.randperm(N, generator=gen)[:M].sort().values for _ in range(B)])
    index[-1, M // 2:] = N  # padding rows of the last batch row aim at the scratch slot
    caches = [torch.randn(B, s.heads, N + 1, s.head_dim, generator=gen) for s in cache_specs(locked)]
    inputs = (torch.randint(0, 97, (B, N), generator=gen), torch.arange(N).expand(B, N), index,
              torch.ones(B, N, dtype=torch.bool))
    with torch.no_grad():
        expected = locked(*inputs, *caches)
        got = rewritten(*inputs, *caches)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for out, cache, want in zip(got[1:], caches, expected[1:], strict=True):
        assert out is cache  # updated in place
        torch.testing.assert_close(cache[:, :, :N], want[:, :, :N], rtol=1e-5, atol=1e-5)


# --- Dream (Qwen2 with bidirectional attention, docs/DESIGN.md §3) ---

DREAM_TINY_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=101,
    mask_token_id=100,
    eos_token_id=99,
    eot_token_id=98,
    bos_token_id=97,
    pad_token_id=99,
    rope_theta=10000.0,
    max_position_embeddings=512,
)


def tiny_dream_config(**overrides):
    """A small Dream config (hidden size 64, 2 layers, 4 heads, 2 KV heads, vocab 101, mask id 100) with overrides."""
    from surelock_fx.models import DreamConfig

    return DreamConfig(**{**DREAM_TINY_DEFAULTS, **overrides})


def tiny_dream(seed: int = 0, **overrides):
    """A float32 DreamModel on ``tiny_dream_config(**overrides)`` with seeded random weights, in eval mode."""
    from surelock_fx.models import random_dream

    return random_dream(tiny_dream_config(**overrides), seed)


def qwen2_config_for(config):
    """The Qwen2Config computing the same function as a DreamConfig, with attention made bidirectional."""
    from transformers import Qwen2Config

    return bidirectional_hf_config(Qwen2Config, config, use_sliding_window=False)


def hf_qwen2_from_dream(model):
    """A bidirectional transformers ``Qwen2ForCausalLM`` (sdpa) holding a DreamModel's weights, in eval mode: the
    two share their state dict names, which are the official Dream checkpoint's. Each attention module's own
    ``is_causal`` is cleared as ``hf_llama_from_llada`` does."""
    from transformers import Qwen2ForCausalLM

    return bidirectional_hf_model(Qwen2ForCausalLM, qwen2_config_for(model.config), model.state_dict(),
                                  model.lm_head.weight.dtype)
