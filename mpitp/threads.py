"""BLAS threads per rank: never oversubscribe the cores by default.

With P ranks on a node of C cores each rank gets C // P BLAS threads (at least 1), unless the user chose
(``--threads N``, or ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` in the
environment). The limit is applied at run time through threadpoolctl, an optional extra made for exactly
this (``pip install mpitp[threads]``); without it BLAS is left as it is, the commands report the thread count
as unknown, and an explicit ``--threads`` gets a warning.
"""

import os

_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def node_cores():
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_threads(requested, ranks_on_node, cores=None):
    """BLAS threads per rank: ``requested`` if given, else ``None`` when the environment already sets it,
    else the node's cores shared among its ranks."""
    if requested is not None:
        return requested
    if any(os.environ.get(v) for v in _ENV_VARS):
        return None
    return max(1, (cores or node_cores()) // max(1, ranks_on_node))


def apply_blas_threads(n):
    """Limit BLAS to ``n`` threads in this process; returns the thread count now in effect, or None if unknown."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    if n is not None:
        threadpoolctl.threadpool_limits(limits=n, user_api="blas")
    counts = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    return max(counts) if counts else None


def missing_threadpoolctl_warning(requested):
    """A warning line when ``--threads`` was asked for but cannot be applied; None otherwise."""
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        if requested is not None:
            return (f"warning: --threads {requested} was not applied because threadpoolctl is not installed "
                    "(pip install 'mpitp[threads]'); set OPENBLAS_NUM_THREADS (or OMP_NUM_THREADS) instead.")
    return None


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
