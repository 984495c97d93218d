"""The locking rewrite: graph structure, error cases and numerics against the dense reference semantics."""

import pytest
import torch
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import surelock_fx
from surelock_fx.capture import capture
from surelock_fx.passes import UnsupportedGraphError, detach_full_attention_masks, lock_rows, remove_metadata_asserts
from surelock_fx.reference import ReplaceLockedKV
from surelock_fx.sampler import model_forward
from surelock_fx.signature import SDPA, active_index, cache_specs

from helpers import captured, counts, hf_llama_from_llada, run_locked, tiny_model

aten = torch.ops.aten
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def placeholders(gm):
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


@pytest.fixture(scope="module")
def llada():
    return tiny_model(seed=1, n_layers=3, n_kv_heads=2)


@pytest.fixture(scope="module")
def llada_graph(llada):
    return captured(llada)


@pytest.fixture(scope="module")
def llama():
    return hf_llama_from_llada(tiny_model(seed=2, n_kv_heads=2))


def test_locked_graph_structure(llada, llada_graph):
    gm = llada_graph
    gm.graph.lint()
    c = counts(gm)
    layers = llada.config.n_layers
    assert c[aten.gather.default] == 2  # one per token-indexed input: input_ids, position_ids
    assert c[aten.scatter.src] == 2 * layers  # one per K and per V cache
    assert c[SDPA] == layers
    assert c[aten.linear.default] == 7 * layers + 1
    names = placeholders(gm)
    assert names[:4] == ["input_ids", "position_ids", "active_index", "key_mask"]
    assert names[4:] == [f"{kv}_cache_{i}" for i in range(layers) for kv in "kv"]
    assert [(s.heads, s.head_dim) for s in cache_specs(gm)] == [(2, 16)] * (2 * layers)


def test_every_projection_runs_on_active_rows_only(llada, llada_graph):
    B, N, M = 2, 9, 4
    x = torch.randint(0, 97, (B, N))
    index = torch.tensor([[0, 2, 5, 8], [1, 3, N, N]])
    caches = [torch.zeros(B, s.heads, N + 1, s.head_dim) for s in cache_specs(llada_graph)]
    key_mask = torch.ones(B, N, dtype=torch.bool)
    ShapeProp(llada_graph).propagate(x, torch.arange(N).expand(B, N), index, key_mask, *caches)
    for node in llada_graph.graph.nodes:
        if node.target is aten.linear.default:
            shape = node.meta["tensor_meta"].shape
            assert shape[:2] == (B, M), f"{node.name} runs on {shape}"
        if node.target is SDPA:
            assert node.args[0].meta["tensor_meta"].shape[2] == M
            assert node.args[1].meta["tensor_meta"].shape[2] == N


def test_second_run_changes_nothing(llada_graph):
    code = llada_graph.code
    assert lock_rows(llada_graph) is llada_graph
    assert llada_graph.code == code


def test_graph_without_masks_or_asserts_is_left_alone(llada):
    gm = captured(llada, locked=False)
    before = counts(gm)
    assert counts(detach_full_attention_masks(gm)) == before
    assert counts(remove_metadata_asserts(gm)) == before


def test_full_bidirectional_mask_of_transformers_is_detached(llama):
    gm = capture(llama)
    sdpas = [n for n in gm.graph.nodes if n.target is SDPA]
    assert sdpas and all(len(n.args) <= 3 or n.args[3] is None for n in sdpas)
    assert aten.arange.default not in counts(gm)  # the mask's subgraph is gone


class PositionMixingFFN(torch.nn.Module):
    """A toy model with a cumulative sum over positions: not row-wise."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.config = None

    def forward(self, input_ids, position_ids):
        return self.embed(input_ids).cumsum(dim=1)


class ArangePositions(torch.nn.Module):
    """Computes positions inside the model instead of taking them as input."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)

    def forward(self, input_ids, position_ids):
        pos = torch.arange(input_ids.shape[1]).float()[None, :, None]
        return self.embed(input_ids) + pos


class CausalAttention(torch.nn.Module):
    def __init__(self, causal=True, eager=False):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.causal, self.eager = causal, eager

    def forward(self, input_ids, position_ids):
        h = self.embed(input_ids)[:, None]
        if self.eager:
            return (h @ h.transpose(-1, -2)).softmax(-1) @ h
        return F.scaled_dot_product_attention(h, h, h, is_causal=self.causal)


class WindowedAttention(torch.nn.Module):
    """Attention under a mask computed from the sequence length alone: |q - k| <= window (a sliding window)."""

    def __init__(self, window):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.window = window

    def forward(self, input_ids, position_ids):
        h = self.embed(input_ids)[:, None]
        positions = torch.arange(input_ids.shape[1])
        mask = (positions[:, None] - positions[None, :]).abs() <= self.window
        return F.scaled_dot_product_attention(h, h, h, attn_mask=mask)


def test_a_window_wider_than_the_example_is_seen_and_refused():
    """The example sequence (8 positions) is shorter than the window (12): the mask allows every key there,
    and only at a longer sequence blocks some. It must be refused, not detached."""
    with pytest.raises(UnsupportedGraphError, match="blocks some positions at sequence length 26"):
        capture(WindowedAttention(12))


def test_a_window_too_wide_to_check_is_refused():
    with pytest.raises(UnsupportedGraphError, match="compares positions with 100000"):
        capture(WindowedAttention(100_000))


def test_transformers_sliding_window_is_refused_without_it_accepted():
    """transformers' Mistral with a 12-position window (bidirectional, sdpa) was once accepted and decoded
    other tokens than the dense model; without the window it is locked exactly."""
    from transformers import MistralConfig, MistralForCausalLM

    def mistral(window):
        config = MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                               attn_implementation="sdpa", max_position_embeddings=128)
        config.is_causal = False
        torch.manual_seed(0)
        return MistralForCausalLM(config).eval()

    with pytest.raises(UnsupportedGraphError, match="sliding window"):
        capture(mistral(12))
    model = mistral(None)
    gm = lock_rows(capture(model))
    N = 20
    x = torch.randint(0, 101, (1, N), generator=torch.Generator().manual_seed(1))
    inputs = (x, torch.arange(N)[None], torch.arange(N)[None], torch.ones(1, N, dtype=torch.bool))
    caches = [torch.zeros(1, s.heads, N + 1, s.head_dim) for s in cache_specs(gm)]
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs, *caches)[0], model(x).logits, rtol=1e-4, atol=1e-4)


class SequenceLayerNorm(torch.nn.Module):
    """A layer norm over the positions and the features together: not row-wise."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)

    def forward(self, input_ids, position_ids):
        h = self.embed(input_ids)
        return F.layer_norm(h, h.shape[1:])


class WholeMaxScaling(torch.nn.Module):
    """Scales every row by the largest position (as LongRoPE picks its factors): not row-wise."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)

    def forward(self, input_ids, position_ids):
        return self.embed(input_ids) * position_ids.max()


class OuterProductRotary(torch.nn.Module):
    """Rotary angles as transformers 4.x computes them: inv_freq [B, D/2, 1] @ position_ids [B, 1, N], a
    matrix product whose only sequence axis is not contracted (row-wise)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(101, 8)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, 8, 2) / 8))

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if position_ids is None:  # called as a plain model by the reference semantics
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        inv = self.inv_freq[None, :, None].expand(input_ids.shape[0], -1, 1)
        angles = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        h = self.embed(input_ids) * torch.cat([angles.cos(), angles.sin()], -1)
        return F.scaled_dot_product_attention(h[:, None], h[:, None], h[:, None])[:, 0]


class DynamicRope(torch.nn.Module):
    """Picks its rotary scaling from the largest position: a branch on input values."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(101, 8)

    def forward(self, input_ids, position_ids):
        scale = 2.0 if position_ids.max() > 16 else 1.0
        return self.embed(input_ids) * scale


def test_an_outer_product_with_positions_is_row_wise():
    model = OuterProductRotary().eval()
    gm = lock_rows(capture(model))
    check_against_reference(model, gm, B=2, N=9, active=[3, 9], seed=3)


@pytest.mark.parametrize("model, message", [(DynamicRope(), "branches on the values of its inputs"),
                                            (WindowedAttention(3), "blocks some positions")],
                         ids=["data-dependent-branch", "window"])
def test_capture_failures_are_one_sentence(model, message):
    with pytest.raises(ValueError, match=message) as info:
        capture(model)
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text and "torch._" not in text, text


def test_gpt2_layer_norms_and_absolute_positions_lock_exactly():
    """GPT-2: layer norms over the features and position embeddings read at position_ids are row-wise; the
    locked graph with every row active equals the bidirectional model, and a locked decode the reference."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from surelock_fx.lock import LockConfig
    from surelock_fx.reference import ReferenceModel

    config = GPT2Config(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_implementation="sdpa")
    config.is_causal, config.mask_token_id = False, 100
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    optimized = surelock_fx.optimize(model)
    assert counts(optimized.graph_module)[aten.layer_norm.default] == 2 * 2 + 1
    N = 12
    x = torch.randint(0, 100, (2, N), generator=torch.Generator().manual_seed(1))
    caches = [torch.zeros(2, s.heads, N + 1, s.head_dim) for s in cache_specs(optimized.graph_module)]
    positions = torch.arange(N).expand(2, N)
    with torch.no_grad():
        logits = optimized.graph_module(x, positions, positions, torch.ones(2, N, dtype=torch.bool), *caches)[0]
        torch.testing.assert_close(logits, model(x).logits, rtol=1e-4, atol=1e-4)
    kw = dict(gen_length=8, steps=8, block_length=8, lock=LockConfig(kl_threshold=5e-2))
    got = surelock_fx.generate(optimized, x[:, :4], **kw)
    assert torch.equal(got.tokens, surelock_fx.generate(ReferenceModel(model), x[:, :4], **kw).tokens)


@pytest.mark.parametrize(
    "model, message",
    [
        (SequenceLayerNorm(), "normalizes over the sequence axis"),
        (WholeMaxScaling(), "reduces over every position at once"),
        (PositionMixingFFN(), "reduces, splits or joins along the sequence axis"),
        (ArangePositions(), "not derived from the token inputs"),
        (CausalAttention(causal=True), "causal"),
        (CausalAttention(causal=False, eager=True), "matrix product mixes positions"),
    ],
    ids=["layer-norm-over-positions", "max-over-positions", "cumsum", "arange-positions", "causal-sdpa",
         "eager-attention"],
)
def test_unsupported_graph_names_the_node(model, message):
    with pytest.raises(UnsupportedGraphError, match=message) as info:
        lock_rows(capture(model))
    assert f"'{info.value.node.name}'" in str(info.value)


def test_model_without_position_input_is_rejected():
    class NoPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 8)

        def forward(self, input_ids):
            return self.embed(input_ids)

    with pytest.raises(ValueError, match="position_ids"):
        capture(NoPositions())


def reference_logits(model, x, locked, caches):
    """Dense forward with locked rows' K/V replaced by ``caches`` (filled on the first call)."""
    forward = model_forward(model)  # outside the mode: it may probe the model's attention first
    with ReplaceLockedKV(caches, locked):
        return forward(x, None)


def locked_step(gm, x, locked, caches, rows_packed=False):
    index, _ = active_index(locked)
    B, N = x.shape
    inputs = (x, torch.arange(N).expand(B, N), index, torch.ones(B, N, dtype=torch.bool), *caches)
    return index, *run_locked(gm, inputs, rows_packed)


def random_locked(gen, B, N, active):
    """Per row, ``active[row]`` random positions stay active; the rest are locked."""
    locked = torch.ones(B, N, dtype=torch.bool)
    for row, count in enumerate(active):
        locked[row, torch.randperm(N, generator=gen)[:count]] = False
    return locked


def check_against_reference(model, gm, B, N, active, seed, dtype=torch.float32, rows_packed=False):
    """Two steps: a full pass fills the caches, then a pass with ``active`` rows per batch row
    (``rows_packed``: ``gm`` is rewritten by pack_rows)."""
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randint(0, 97, (B, N), generator=gen)
    x2 = x1.clone()
    x2[:, ::2] = torch.randint(0, 97, x2[:, ::2].shape, generator=gen)
    nothing = torch.zeros(B, N, dtype=torch.bool)
    specs = cache_specs(gm)
    caches = [torch.zeros(B, s.heads, N + 1, s.head_dim, dtype=s.dtype) for s in specs]
    ref_caches = []
    with torch.no_grad():
        reference_logits(model, x1, nothing, ref_caches)
        _, _, caches = locked_step(gm, x1, nothing, caches, rows_packed)
        locked = random_locked(gen, B, N, active)
        expected = reference_logits(model, x2, locked, ref_caches)
        index, got, caches = locked_step(gm, x2, locked, caches, rows_packed)
    tol = TOLERANCE[dtype]
    for row in range(B):
        rows = index[row][index[row] < N]
        torch.testing.assert_close(got[row, : len(rows)], expected[row, rows], rtol=tol, atol=tol)
        for layer, kv in enumerate(ref_caches):
            for cache, ref in zip(caches[2 * layer: 2 * layer + 2], kv):
                ref = ref.repeat_interleave(cache.shape[1] // ref.shape[1], dim=1)  # eager GQA vs repeated heads
                torch.testing.assert_close(cache[row, :, :N], ref[row], rtol=tol, atol=tol)


GRID = [  # (n_heads, n_kv_heads, n_layers, B, N, active rows per batch row)
    (4, 4, 2, 1, 7, [1]),
    (4, 2, 2, 1, 7, [7]),
    (8, 2, 2, 3, 13, [1, 13, 5]),
    (2, 2, 1, 2, 1, [1, 0]),
]


@pytest.mark.parametrize("heads, kv_heads, layers, B, N, active", GRID)
@pytest.mark.parametrize("family", ["llada", "llama"])
def test_locked_graph_matches_reference_semantics(family, heads, kv_heads, layers, B, N, active):
    seed = hash((family, heads, kv_heads, layers, B, N)) % 2**31
    model = tiny_model(seed=seed, n_heads=heads, n_kv_heads=kv_heads, n_layers=layers, d_model=32)
    if family == "llama":
        model = hf_llama_from_llada(model)
    check_against_reference(model, lock_rows(capture(model)), B, N, active, seed)


def test_bfloat16_model_matches_reference_semantics():
    model = tiny_model(seed=5, n_kv_heads=2).to(torch.bfloat16)
    check_against_reference(model, lock_rows(capture(model)), 2, 9, [3, 9], seed=5, dtype=torch.bfloat16)


def compiled_with_specs(compiled, gm):
    """A compiled callable that still answers cache_specs() like its source graph."""
    compiled.meta = gm.meta
    return compiled


def encoder(name: str, layers: int):
    """A tiny transformers encoder (BERT: position and token-type tables read at position_ids; ModernBERT:
    a fused QKV unbound, local-window attention every other layer from the second)."""
    import transformers

    sizes = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=layers,
                 attn_implementation="sdpa")
    if name == "bert":
        config = transformers.BertConfig(**sizes)
    else:
        config = transformers.ModernBertConfig(**sizes, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                               cls_token_id=1, sep_token_id=2)
    config.mask_token_id = 3
    torch.manual_seed(0)
    return getattr(transformers, f"{'Bert' if name == 'bert' else 'ModernBert'}ForMaskedLM")(config).eval()


@pytest.mark.parametrize("name", ["bert", "modernbert"])
def test_encoders_lock_exactly(name):
    model = encoder(name, layers=2 if name == "bert" else 1)
    gm = surelock_fx.optimize(model).graph_module
    N = 12
    x = torch.randint(4, 100, (2, N), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(N).expand(2, N)
    caches = [torch.zeros(2, s.heads, N + 1, s.head_dim) for s in cache_specs(gm)]
    with torch.no_grad():
        got = gm(x, positions, positions, torch.ones(2, N, dtype=torch.bool), *caches)[0]
        torch.testing.assert_close(got, model(x).logits, rtol=1e-4, atol=1e-4)


def test_modernbert_local_attention_is_refused():
    with pytest.raises(UnsupportedGraphError, match="sliding window"):
        capture(encoder("modernbert", layers=3))


def test_bidirectional_is_read_from_the_config_else_from_every_attention_module():
    import transformers

    from surelock_fx.capture import declared_bidirectional

    assert declared_bidirectional(encoder("bert", layers=1))  # BertConfig has no is_causal; its modules say False
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_hidden_layers=1)
    llama = transformers.LlamaForCausalLM(config)
    assert not declared_bidirectional(llama)  # its attention modules are causal
    config.is_causal = False
    assert declared_bidirectional(llama)  # the config's word wins
