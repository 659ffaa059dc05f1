"""Shard-only reads: each rank's memory grows by its own shard while loading, not by the whole model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, child_env, mpirun, serial_only
from mpitp import MpitpError, comm, load_model
from mpitp.config import load_config
from mpitp.model import Model
from mpitp.sharding import shard_for
from mpitp.weights import shard_bytes
from random_models import write_random_model

pytestmark = serial_only


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for peak RSS")
@pytest.mark.parametrize("n", [2, 3, 4])  # 3: uneven heads, a key/value head held by two ranks
def test_peak_rss_per_rank_is_its_shard(tmp_path, n):
    path = write_random_model(tmp_path / "m", "llama-large")
    cmd = [*mpirun(n), sys.executable, str(REPO / "bench" / "memory.py"), "--model", path, "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env())
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    full = report["full_model_bytes"]
    assert full > 35 * 2**20
    for rank in report["per_rank"]:
        # the rank holds about 1/n of the model plus the replicated embedding, norms and LM head ...
        assert rank["shard_bytes"] < full / n + 2 * 1000 * 512 * 4 + 2**20
        # ... and its peak resident memory grew by no more than that while loading
        assert rank["peak_growth_bytes"] <= 1.1 * rank["shard_bytes"]


def test_memory_is_checked_for_every_rank_of_the_node(tmp_path, monkeypatch):
    # Two ranks that each fit alone but not together on one node are refused before loading, with advice
    # that fits (float32 already: no "--dtype float32").
    path = write_random_model(tmp_path / "m", "llama-large")
    need = shard_bytes(load_config(path), shard_for(load_config(path), 0, 1), np.float32)
    monkeypatch.setattr("mpitp.resources.available_bytes", lambda: int(need * 1.5))
    assert load_model(path, comm.serial()).weight_bytes > 0
    with pytest.raises(MpitpError) as e:
        Model.load(path, comm.serial(), node_ranks=2)
    assert "for each of this node's 2 ranks" in str(e.value) and "use more ranks, on more nodes" in str(e.value)
    assert "--dtype" not in str(e.value)
    model = load_model(path, comm.serial())
    model.node_ranks = 2  # and the KV cache: 2 x its bytes must fit beside the weights the node already holds
    monkeypatch.setattr("mpitp.resources.available_bytes", lambda: int(model.cache_bytes(64) * 1.5))
    with pytest.raises(MpitpError, match="for each of this node's 2 ranks"):
        model.new_cache(64)
