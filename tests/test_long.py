"""Long runs: 2,000 generated tokens keep memory flat and stay exact against a full recompute."""

import os

import numpy as np
import pytest

from mpitp import comm, load_model
from mpitp.generation import next_token
from mpitp.sampling import Sampler
from random_models import SHAPES, write_random_model

SHAPES["llama-long"] = dict(SHAPES["llama-mqa"], max_position_embeddings=2100)


def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for RSS")
def test_2000_tokens_flat_memory_and_exact_against_recompute(tmp_path):
    path = write_random_model(tmp_path / "m", "llama-long")
    model = load_model(path, comm.serial(), "float64")
    n = 2000
    cache = model.new_cache(n + 1)
    logits = model.forward([1], cache, gather=False)
    tokens, sampler = [1], Sampler(temperature=1.0, seed=5)  # sampled, so the sequence keeps changing
    for step in range(n):
        if step == 20:
            after_warmup = rss()
        token, _ = next_token(model, sampler, logits[-1], step, (), n + 1)
        tokens.append(token)
        logits = model.forward([token], cache, gather=False)
    grown = rss() - after_warmup
    assert grown < 2 * 2**20, f"RSS grew by {grown} bytes over {n} tokens"
    # The last step's logits, decoded against a cache of 2,000 positions, equal a full recompute.
    full = model.forward(tokens, model.new_cache(n + 1), all_logits=True)
    assert np.abs(full[-1] - logits[-1]).max() < 1e-9
