"""Model families as plain nn.Modules that export cleanly, and their checkpoint I/O."""
from .checkpoint import CheckpointError, from_hf_llada, load_config, load_model, save_model
from .llada import ConfigError, LLaDAConfig, LLaDAModel

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LLaDAConfig",
    "LLaDAModel",
    "from_hf_llada",
    "load_config",
    "load_model",
    "save_model",
]
