"""Tiny test models run fastest on one thread, and pytest-xdist (pyproject's addopts) runs one test
process per core. Inductor compiles in its test process: a pool of compile workers per test process
would only compete for the same cores."""
import pytest
import torch
from torch._inductor import config as inductor_config

import surelock_fx.decoding

torch.set_num_threads(1)
inductor_config.compile_threads = 1


@pytest.fixture(params=["whole", "one-row-chunks"])
def logits_chunks(request, monkeypatch):
    """Run a test with the sampler and the lock rule reading logits all in one chunk, or one row
    at a time (``surelock_fx.decoding.CHUNK_BYTES``): the results must not depend on it."""
    if request.param == "one-row-chunks":
        monkeypatch.setattr(surelock_fx.decoding, "CHUNK_BYTES", 1)
    return request.param
