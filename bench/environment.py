"""Where a run happened and how busy the machine was, for the JSON record's "environment" entry: the load
averages and CPU time counters of each machine (read from /proc at the start and the end of the run), and the
hosts, MPI library, transport settings, NumPy, BLAS, CPU and git revision, gathered from every rank.
"""

import datetime
import os
import platform
import socket
import subprocess

import numpy as np

from mpitp import __version__
from mpitp import comm as mpi


def machine_state():
    """This machine's load averages (1, 5, 15 minutes) and CPU time counters (jiffies: all, stolen), from /proc;
    None where unknown."""
    state = {"load": None, "jiffies": None, "steal_jiffies": None}
    try:
        with open("/proc/loadavg") as f:
            state["load"] = [float(v) for v in f.read().split()[:3]]
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        state["jiffies"], state["steal_jiffies"] = sum(fields), fields[7]
    except (OSError, ValueError, IndexError):
        pass
    return state


def machine_entry(comm, start):
    """How busy each machine was (one entry per kernel, naming its hosts): its cores, the load averages at
    ``start`` (a ``machine_state()`` taken when the run began) and now, and the share of CPU time stolen in
    between."""
    end = machine_state()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    steal = None
    if start["jiffies"] is not None and end["jiffies"] is not None and end["jiffies"] > start["jiffies"]:
        steal = 100 * (end["steal_jiffies"] - start["steal_jiffies"]) / (end["jiffies"] - start["jiffies"])
    mine = {"hosts": [socket.gethostname()], "machine_id": _boot_id(), "cores": cores, "load_start": start["load"],
            "load_end": end["load"], "steal_percent": steal}
    machines = {}  # emulated nodes (scripts/cluster.sh) share one kernel, and its load and CPU counters
    for m in comm.allgather(mine):
        key = m["machine_id"] or m["hosts"][0]
        if key in machines:
            machines[key]["hosts"] = sorted(set(machines[key]["hosts"] + m["hosts"]))
        else:
            machines[key] = m
    return list(machines.values())


def _boot_id():
    """The running kernel's random boot id: the same on every emulated node of one machine."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def environment(comm, threads, start=None):
    """Where and with what the run happened: how busy each host was since ``start`` (``machine_state()``), the
    link rate scripts/cluster.sh set, hosts, MPI library and transport settings, NumPy, BLAS, CPU, git."""
    hosts = sorted(set(comm.allgather(socket.gethostname())))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    transport = {k: v for k, v in os.environ.items()
                 if k.startswith(("MPIR_CVAR_", "FI_", "UCX_", "OMPI_MCA_", "I_MPI_"))}
    machine = machine_entry(comm, start if start is not None else machine_state())
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "cluster_rate": os.environ.get("MPITP_CLUSTER_RATE"),
            "hosts": hosts, "ranks": comm.Get_size(), "ranks_on_node": mpi.ranks_on_node(comm),
            "threads_per_rank": threads, "mpi_library": mpi.library_version(), "transport_env": transport,
            "numpy": np.__version__, "blas": blas_description(), "python": platform.python_version(),
            "cpu": _cpu_name(), "mpitp": __version__, "git_revision": rev}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_description():
    """e.g. 'openblas 0.3.31 (SkylakeX)'; 'unknown BLAS' without threadpoolctl."""
    try:
        import threadpoolctl
    except ImportError:
        return "unknown BLAS (install threadpoolctl to see it)"
    libs = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    if not libs:
        return "no BLAS found"
    p = libs[0]
    return f"{p['internal_api']} {p.get('version') or ''} ({p.get('architecture') or p.get('threading_layer')})"
