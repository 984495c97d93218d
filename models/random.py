"""Seeded random weights for LLaDA and Dream models, shared by the tests and the benchmarks."""
from __future__ import annotations

import math

import torch

from .dream import DreamConfig, DreamModel
from .llada import LLaDAConfig, LLaDAModel


def random_weights_(model: torch.nn.Module, seed: int = 0, logit_scale: float = 3.0) -> torch.nn.Module:
    """Fill every parameter of ``model`` in place from a generator seeded with ``seed``; ``model`` in eval mode.

    1-D parameters (norm weights, biases) are uniform in [0.5, 1.5), the input embedding N(0, 1), every other
    matrix N(0, 1/fan_in), so activations stay O(1); an untied LM head ``logit_scale`` times that, so that the
    softmax is peaked enough for predictions and confidences to differ. Our LLaDAModel, DreamModel and transformers
    models alike (their embeddings from ``get_input_embeddings``/``get_output_embeddings``).
    """
    embedding, head = _embedding_and_head(model)
    gen = torch.Generator(device=embedding.device).manual_seed(seed)  # the same draws on CPU, any device
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5, generator=gen)
            elif param is embedding:
                param.normal_(0.0, 1.0, generator=gen)
            else:
                scale = logit_scale if param is head else 1.0
                param.normal_(0.0, scale / math.sqrt(param.shape[1]), generator=gen)
    return model.eval()


def _embedding_and_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(model, LLaDAModel):
        return model.model.transformer.wte.weight, model.lm_head_weight
    head = model.get_output_embeddings()
    return model.get_input_embeddings().weight, None if head is None else head.weight


def random_llada(config: LLaDAConfig, seed: int = 0, logit_scale: float = 3.0, device="cpu") -> LLaDAModel:
    """A LLaDAModel on ``config`` with ``random_weights_``, built on the meta device and filled on ``device``
    (no default initialisation to pay for: a 166M-parameter model takes seconds)."""
    return _random_model(LLaDAModel, config, seed, logit_scale, device)


def random_dream(config: DreamConfig, seed: int = 0, logit_scale: float = 3.0, device="cpu") -> DreamModel:
    """A DreamModel on ``config`` with ``random_weights_``, built as ``random_llada`` builds a LLaDAModel."""
    return _random_model(DreamModel, config, seed, logit_scale, device)


def _random_model(model_class, config, seed: int, logit_scale: float, device):
    with torch.device("meta"):
        model = model_class(config)
    return random_weights_(model.to_empty(device=device), seed, logit_scale)
