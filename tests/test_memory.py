"""Shard-only reads: each rank's memory grows by its own shard while loading, not by the whole model."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, child_env, mpirun, serial_only
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
