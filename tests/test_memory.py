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


# The memory check reads planted /proc and /sys files (resources.available_bytes(root)): what Slurm's --mem
# and containers set is a cgroup limit, which MemAvailable does not show.
MiB = 2**20


def plant(tree, files):
    for path, text in files.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
    return str(tree)


V2_MOUNT = "41 31 0:38 {base} /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n"
V1_MOUNT = ("32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
            "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n")
V1_UNLIMITED = str(9223372036854771712)


def v2_tree(tree, job_max, parent_max="max", base="/"):
    """A Slurm job step's cgroup (v2): the job's limit, its parent's, 8 GiB MemAvailable on the machine."""
    job = "sys/fs/cgroup" + ("/slurm/job_7" if base == "/" else "")  # the mount shows the job's folder
    return plant(tree, {
        "proc/meminfo": "MemTotal: 16000000 kB\nMemAvailable: 8388608 kB\n",
        "proc/self/mountinfo": "23 1 0:21 / /proc rw - proc proc rw\n" + V2_MOUNT.format(base=base),
        "proc/self/cgroup": "0::/slurm/job_7/step_0\n",
        f"{job}/step_0/memory.max": "max\n", f"{job}/step_0/memory.current": f"{90 * MiB}\n",
        f"{job}/memory.max": f"{job_max}\n", f"{job}/memory.current": f"{100 * MiB}\n",
        f"{job}/memory.stat": f"anon {80 * MiB}\nfile {20 * MiB}\ninactive_file {20 * MiB}\n",
        **({} if base != "/" else {"sys/fs/cgroup/slurm/memory.max": f"{parent_max}\n",
                                   "sys/fs/cgroup/slurm/memory.current": f"{250 * MiB}\n"}),
    })


def test_a_v2_cgroup_limit_is_the_memory_available(tmp_path):
    from mpitp.resources import available_bytes, cgroup_available_bytes
    # 450 MiB less 100 MiB used, of which 20 MiB is page cache the kernel drops first
    assert available_bytes(v2_tree(tmp_path / "a", 450 * MiB)) == 370 * MiB
    # an ancestor's limit counts as well: 300 MiB with 250 MiB used below it
    assert available_bytes(v2_tree(tmp_path / "b", 450 * MiB, 300 * MiB)) == 50 * MiB
    # no limit anywhere: MemAvailable
    assert cgroup_available_bytes(v2_tree(tmp_path / "c", "max")) is None
    assert available_bytes(str(tmp_path / "c")) == 8 * 2**30
    # a limit above MemAvailable: MemAvailable
    assert available_bytes(v2_tree(tmp_path / "d", 64 * 2**30)) == 8 * 2**30
    # in a cgroup namespace the mount's root is the job's folder, which /proc/self/cgroup names in full
    assert available_bytes(v2_tree(tmp_path / "e", 450 * MiB, base="/slurm/job_7")) == 370 * MiB


def test_a_v1_cgroup_limit_is_the_memory_available(tmp_path):
    from mpitp.resources import available_bytes
    job = "sys/fs/cgroup/memory/slurm/uid_0/job_7"
    root = plant(tmp_path, {
        "proc/meminfo": "MemAvailable: 8388608 kB\n",
        "proc/self/mountinfo": V1_MOUNT + V2_MOUNT.format(base="/").replace("/sys/fs/cgroup ", "/sys/fs/cgroup/unified "),
        "proc/self/cgroup": "4:memory:/slurm/uid_0/job_7\n1:cpu:/\n0::/\n",
        f"{job}/memory.limit_in_bytes": f"{450 * MiB}\n", f"{job}/memory.usage_in_bytes": f"{100 * MiB}\n",
        f"{job}/memory.stat": f"cache {30 * MiB}\ninactive_file {5 * MiB}\ntotal_inactive_file {30 * MiB}\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{4000 * MiB}\n",
    })
    assert available_bytes(root) == 380 * MiB  # 450 - (100 - 30): the hierarchy's inactive page cache


def test_no_cgroup_files_is_memavailable_alone(tmp_path):
    from mpitp.resources import available_bytes
    assert available_bytes(plant(tmp_path, {"proc/meminfo": "MemAvailable: 1024 kB\n"})) == 2**20
    assert available_bytes(plant(tmp_path / "none", {"proc/self/cgroup": "0::/\n"})) is None


def test_the_refusal_says_the_limit_is_the_cgroups(tmp_path, monkeypatch):
    from mpitp import resources
    root = v2_tree(tmp_path, 450 * MiB)
    read = resources._read  # every file the check reads, from the planted tree
    monkeypatch.setattr(resources, "_read", lambda path: read(os.path.join(root, path.lstrip("/"))))
    resources.check_fits(300 * MiB, "a shard", "use more ranks")  # 370 MiB left
    with pytest.raises(MpitpError, match=r"^a shard needs 400.0 MiB \(200.0 MiB for each of this node's 2 ranks\) "
                                         r"but this node has 370.0 MiB available within its cgroup's memory limit; "
                                         r"use more ranks\.$"):
        resources.check_fits(200 * MiB, "a shard", "use more ranks", node_ranks=2)
