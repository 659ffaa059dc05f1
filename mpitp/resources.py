"""What a rank may use of its node: memory, checked before allocating, and BLAS threads.

Large NumPy allocations fail lazily, mid-forward (or the OOM killer ends one rank and the others wait), so a
shard's weights and a KV cache are checked against the memory available first: the machine's, or what the
process's cgroup still allows (Slurm's ``--mem``, a container's limit; v1 and v2) if that is less. BLAS threads per rank default to
the node's cores shared among its ranks unless the user chose (``--threads``, ``OPENBLAS_NUM_THREADS`` ...), set
at run time with threadpoolctl, an optional extra made for this (``pip install mpitp[threads]``).
"""

import os

from .errors import RequestError

_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# Where a cgroup's memory limit, usage and reclaimable page cache are, by cgroup version: v2 (unified), v1.
_CGROUP_FILES = {True: ("memory.max", "memory.current", "inactive_file"),
                 False: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _memory_cgroups(root):
    """The folders of this process's memory cgroup in each hierarchy that has one (v2, v1's memory
    controller), each with its ancestors up to the mount: ``[(v2, [folder, parent, ..., mount])]``."""
    mounts = {}  # (v2, the hierarchy's path that is mounted) -> where
    for line in (_read(os.path.join(root, "proc/self/mountinfo")) or "").splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        kind, options = fields[dash + 1], fields[dash + 3].split(",") if len(fields) > dash + 3 else []
        if kind == "cgroup2" or (kind == "cgroup" and "memory" in options):
            mounts.setdefault(kind == "cgroup2", (fields[3], fields[4]))
    found = []
    for line in (_read(os.path.join(root, "proc/self/cgroup")) or "").splitlines():
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        v2 = number == "0" and controllers == ""
        if (v2 or "memory" in controllers.split(",")) and v2 in mounts:
            base, mountpoint = mounts[v2]
            inside = os.path.relpath(path, base)
            inside = "." if inside.startswith("..") else inside  # mounted from below our cgroup: start at the mount
            mount = os.path.join(root, mountpoint.lstrip("/"))
            folder = os.path.normpath(os.path.join(mount, inside))
            chain = [folder]
            while chain[-1] != mount and chain[-1].startswith(mount):
                chain.append(os.path.dirname(chain[-1]))
            found.append((v2, chain))
    return found


def cgroup_available_bytes(root="/"):
    """What this process's memory cgroups (Slurm's ``--mem``, a container's limit) still allow: the smallest
    limit minus usage along the cgroup and its ancestors, in v2 and v1; None when no limit is found. The page
    cache the kernel drops first (inactive files) does not count as used, as in MemAvailable."""
    best = None
    for v2, chain in _memory_cgroups(root):
        limit_file, usage_file, inactive_key = _CGROUP_FILES[v2]
        for folder in chain:
            limit, usage = _read(os.path.join(folder, limit_file)), _read(os.path.join(folder, usage_file))
            if limit is None or usage is None or limit.strip() == "max":
                continue
            stat = (_read(os.path.join(folder, "memory.stat")) or "").split()
            inactive = int(stat[stat.index(inactive_key) + 1]) if inactive_key in stat[::2] else 0
            try:
                left = int(limit) - max(0, int(usage) - inactive)
            except ValueError:
                continue
            best = left if best is None else min(best, left)
    return None if best is None else max(0, best)


def available_bytes(root="/"):
    """Memory available to new allocations here: the smaller of the machine's (Linux MemAvailable) and what
    this process's cgroup still allows (``cgroup_available_bytes``); None if neither is known."""
    meminfo = (_read(os.path.join(root, "proc/meminfo")) or "").split()
    free = int(meminfo[meminfo.index("MemAvailable:") + 1]) * 1024 if "MemAvailable:" in meminfo else None
    if free is None and root == "/":
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    limits = [n for n in (free, cgroup_available_bytes(root)) if n is not None]
    return min(limits) if limits else None


def check_fits(nbytes, what, hint, node_ranks=1):
    """Raise ``RequestError`` unless ``nbytes`` more bytes for each of this node's ``node_ranks`` ranks (which
    ask for about as much at the same time) fit in the memory available."""
    free = available_bytes()
    if free is not None and nbytes * node_ranks > free:
        size = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        each = f" ({size(nbytes)} for each of this node's {node_ranks} ranks)" if node_ranks > 1 else ""
        cgroup = cgroup_available_bytes()  # read again, a moment later: allow for a MiB that changed since
        where = " within its cgroup's memory limit" if cgroup is not None and cgroup <= free + 2**20 else ""
        raise RequestError(f"{what} needs {size(nbytes * node_ranks)}{each} but this node has {size(free)} "
                           f"available{where}; {hint}.")


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
