"""Tiny test models run fastest on one thread, and the suite stays quick on a loaded 2-core machine."""
import pytest
import torch

import surelock_fx.sampler

torch.set_num_threads(1)


@pytest.fixture(params=["whole", "one-row-chunks"])
def logits_chunks(request, monkeypatch):
    """Run a test with the sampler and the lock rule reading logits all in one chunk, or one row
    at a time (``surelock_fx.sampler.CHUNK_BYTES``): the results must not depend on it."""
    if request.param == "one-row-chunks":
        monkeypatch.setattr(surelock_fx.sampler, "CHUNK_BYTES", 1)
    return request.param
