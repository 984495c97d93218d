"""Model families as plain nn.Modules that export cleanly, and their checkpoint I/O."""
from .checkpoint import CheckpointError, from_hf_llada, load_config, load_model, save_model
from .llada import ConfigError, LLaDAConfig, LLaDAModel
from .random import random_llada, random_weights_

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LLaDAConfig",
    "LLaDAModel",
    "from_hf_llada",
    "load_config",
    "load_model",
    "random_llada",
    "random_weights_",
    "save_model",
]
