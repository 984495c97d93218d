"""Tiny test models run fastest on one thread, and the suite stays quick on a loaded 2-core machine."""
import torch

torch.set_num_threads(1)
