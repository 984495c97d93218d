"""surelock_fx: SureLock (lock converged tokens) as a compiler pass for masked diffusion LMs."""
from . import models, passes
from .allocator import keep_freed_memory
from .dream import diffusion_generate
from .export import export_onnx, export_tensorrt
from .lock import LockConfig
from .optimize import OptimizedModel, load_tensorrt, optimize
from .sampler import DecodeStats, GenerateOutput, generate

__all__ = ["DecodeStats", "GenerateOutput", "LockConfig", "OptimizedModel", "diffusion_generate", "export_onnx",
           "export_tensorrt", "generate", "keep_freed_memory", "load_tensorrt", "models", "optimize", "passes"]
