"""Shared helpers for the tests; the MPI guard hooks come from mpi_guard.py."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mpi_guard import *  # noqa: F401,F403 -- the guard's pytest hooks (mpi_guard.__all__)

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent
MODELS = ("gpt2-tiny", "llama-gqa")


def golden(name):
    """The Hugging Face reference outputs for a test model."""
    return np.load(DATA / f"{name}.npz", allow_pickle=False)


def model_dir(name):
    return str(DATA / name)


# Environment variables by which an MPI launcher tells a process it belongs to a job. A child mpirun
# started from inside an MPI process must not inherit them, or it joins the parent's job.
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_", "MPICH_", "I_MPI_")


def mpirun(n):
    """The start of a command line that launches ``n`` ranks (the venv's mpirun when there is one); with
    ``MPITP_CLUSTER_NODES=N`` set (make test-cluster), across N emulated nodes (scripts/cluster.sh)."""
    nodes = int(os.environ.get("MPITP_CLUSTER_NODES", "0"))
    if nodes and n % nodes == 0:
        return [str(REPO / "scripts" / "cluster.sh"), "run", str(nodes), str(n // nodes), "--"]
    path = Path(sys.executable).parent / "mpirun"
    return [str(path) if path.exists() else "mpirun", "-n", str(n)]


def child_env(**extra):
    """This process's environment for a child job: no launcher variables, mpitp importable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(args, n=1, timeout=120, inject=None, **env):
    """Run ``python -m mpitp.generate ARGS`` under ``mpirun -n N`` (or plainly for n=1) with a timeout;
    with ``inject="RANK:PHASE"``, through tests/inject.py, which makes that rank fail."""
    cmd = [sys.executable, *(["-m", "mpitp.generate"] if inject is None else [str(REPO / "tests" / "inject.py"),
                                                                                inject]), *args]
    return subprocess.run((mpirun(n) if n > 1 else []) + cmd, capture_output=True, text=True, timeout=timeout,
                          env=child_env(**env), cwd=str(REPO))


def unwritable_stdout(cmd, timeout=300):
    """``cmd`` (a serial command line) run three times where its result cannot be written: with stdout closed
    (``>&-``), on /dev/full, and into a pipe whose reader is gone; the three ``CompletedProcess``es."""
    opts = dict(stderr=subprocess.PIPE, text=True, timeout=timeout, env=child_env(), cwd=str(REPO))
    closed = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *cmd], **opts)
    with open("/dev/full", "w") as full:
        on_full = subprocess.run(cmd, stdout=full, **opts)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte, as with `| head -c 0`
    try:
        gone = subprocess.run(cmd, stdout=write, **opts)
    finally:
        os.close(write)
    return closed, on_full, gone


CLOSED = "error: stdout is closed, so the result would be lost; send it to a file (> out.txt) instead.\n"
FULL = "error: stdout: cannot write the result (No space left on device); it is lost.\n"


serial_only = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1,
                                 reason="launches its own mpirun; runs in the serial pytest pass")
