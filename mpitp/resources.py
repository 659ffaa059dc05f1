"""What a rank may use of its node: memory, checked before allocating, and BLAS threads.

Large NumPy allocations fail lazily, mid-forward (or the OOM killer ends one rank and the others wait), so a
shard's weights and a KV cache are checked against the memory available first. BLAS threads per rank default to
the node's cores shared among its ranks unless the user chose (``--threads``, ``OPENBLAS_NUM_THREADS`` ...), set
at run time with threadpoolctl, an optional extra made for this (``pip install mpitp[threads]``).
"""

import os

from .errors import RequestError

_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_bytes():
    """Memory available to new allocations on this machine (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(nbytes, what, hint, node_ranks=1):
    """Raise ``RequestError`` unless ``nbytes`` more bytes for each of this node's ``node_ranks`` ranks (which
    ask for about as much at the same time) fit in the memory available."""
    free = available_bytes()
    if free is not None and nbytes * node_ranks > free:
        size = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        each = f" ({size(nbytes)} for each of this node's {node_ranks} ranks)" if node_ranks > 1 else ""
        raise RequestError(f"{what} needs {size(nbytes * node_ranks)}{each} but this node has {size(free)} "
                           f"available; {hint}.")


def set_blas_threads(requested, ranks_on_node):
    """Set this rank's BLAS threads: ``requested``, else none when the environment sets them, else the node's
    cores over its ranks. Returns ``(threads in effect or None if unknown, a warning line or None)``."""
    try:
        import threadpoolctl
    except ImportError:
        return None, None if requested is None else (
            f"warning: --threads {requested} was not applied because threadpoolctl is not installed "
            "(pip install 'mpitp[threads]'); set OPENBLAS_NUM_THREADS (or OMP_NUM_THREADS) instead.")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    warning = None if requested is None or requested * ranks_on_node <= cores else (f"warning: {requested} BLAS "
               f"threads for each of {ranks_on_node} ranks on a node of {cores} cores oversubscribe it.")
    if requested is None and not any(os.environ.get(v) for v in _ENV_VARS):
        requested = max(1, cores // max(1, ranks_on_node))
    if requested is not None:
        threadpoolctl.threadpool_limits(limits=requested, user_api="blas")
    counts = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    return (max(counts) if counts else None), warning
