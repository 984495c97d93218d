"""Model families as plain nn.Modules that export cleanly, and their checkpoint I/O."""
from .checkpoint import (
    CheckpointError,
    from_hf_dream,
    from_hf_llada,
    from_remote_code,
    is_remote_code,
    load_config,
    load_model,
    save_model,
)
from .dream import DreamConfig, DreamModel
from .llada import ConfigError, LLaDAConfig, LLaDAModel
from .random import random_dream, random_llada, random_weights_

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DreamConfig",
    "DreamModel",
    "LLaDAConfig",
    "LLaDAModel",
    "from_hf_dream",
    "from_hf_llada",
    "from_remote_code",
    "is_remote_code",
    "load_config",
    "load_model",
    "random_dream",
    "random_llada",
    "random_weights_",
    "save_model",
]
