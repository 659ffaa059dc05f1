"""Long runs: 2,000 generated tokens keep memory flat and stay exact against a full recompute."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mpitp import Sampler, comm, generate_sequence, load_model
from conftest import child_env
from random_models import write_random_model


def rss():
    with open("/proc/self/status") as f:  # read here, independently of mpitp's own reader
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for RSS")
def test_2000_tokens_flat_memory_and_exact_against_recompute(tmp_path):
    path = write_random_model(tmp_path / "m", "llama-mqa", max_position_embeddings=2100)
    model = load_model(path, comm.serial(), "float64")
    n = 2000
    samples = []

    def on_token(token):
        if len(samples) < 1 and token is not None:
            samples.append(rss())  # after the cache is allocated and the prompt has run

    # sampled, so the sequence keeps changing; eos off
    out = generate_sequence(model, [1], n, Sampler(temperature=1.0, seed=5), on_token=on_token)
    grown = rss() - samples[0]
    assert len(out.token_ids) == n
    assert grown < 2 * 2**20, f"RSS grew by {grown} bytes over {n} tokens"
    # The last token, chosen against a cache of 2,000 positions, is what a full recompute chooses too.
    tokens = [1] + out.token_ids
    cache = model.new_cache(n)
    cached = model.forward(tokens[:-1], cache, all_logits=True)  # one prefill of the whole sequence
    decoded = model.new_cache(n)
    model.forward(tokens[:-2], decoded)
    last = model.forward([tokens[-2]], decoded)  # the final step against a cache of 1,998 positions
    assert np.abs(cached[-1] - last[0]).max() < 1e-9


PEAK_SCRIPT = """
import sys, numpy as np
from mpitp import comm, load_model
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
n = int(sys.argv[2])
model = load_model(sys.argv[1], comm.serial())
cache = model.new_cache(n)
base = status("VmRSS:")  # weights and the whole cache (written when allocated): resident
logits = model.forward(np.arange(n) % model.config.n_vocab, cache)
print(status("VmHWM:") - base, np.isfinite(logits).all())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for RSS")
def test_a_16k_prompt_runs_in_bounded_memory(tmp_path):
    # In one pass the attention scores alone would take 9 heads x 16384^2 x 4 bytes = 9 GiB; in chunks the
    # whole prefill stays under 1 GiB above the weights and the cache.
    n = 16384
    path = write_random_model(tmp_path / "m", "llama-9h", max_position_embeddings=n, num_hidden_layers=1)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(n)], capture_output=True, text=True,
                         timeout=300, env=child_env())
    assert out.returncode == 0, out.stderr
    grown, finite = out.stdout.split()
    assert int(grown) < 2**30 and finite == "True", out.stdout
