"""surelock_fx: SureLock (lock converged tokens) as a compiler pass for masked diffusion LMs."""
from . import models
from .sampler import DecodeStats, GenerateOutput, generate

__all__ = ["DecodeStats", "GenerateOutput", "generate", "models"]
