"""Communication: the only module in mpitp that imports mpi4py.

Everything below the entry points takes the communicator as an explicit argument; this module supplies the
few collectives the model needs, all buffer-based (upper-case mpi4py methods) on contiguous NumPy arrays.
``allreduce_sum`` is the one Allreduce of the tensor-parallel data flow: a block calls it twice per forward.
"""

import sys
import time

import numpy as np
from mpi4py import MPI

# Time and payload bytes of allreduce_sum since the last reset, per process (read by timing reports).
allreduce_seconds = 0.0
allreduce_bytes = 0


def world():
    """The communicator of every process started by mpirun (a 1-rank one without mpirun)."""
    return MPI.COMM_WORLD


def serial():
    """A 1-rank communicator: runs the very same code path on this process alone."""
    return MPI.COMM_SELF


def allreduce_sum(comm, buf):
    """Sum ``buf`` over all ranks of ``comm``, in place (``MPI.IN_PLACE``, no temporary)."""
    global allreduce_seconds, allreduce_bytes
    t = time.perf_counter()
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    allreduce_seconds += time.perf_counter() - t
    allreduce_bytes += buf.nbytes


def allreduce_scalar(comm, value, op, dtype):
    """``value`` reduced over all ranks with ``op`` ("max" or "sum"), exactly, on every rank."""
    buf = np.array([value], dtype=dtype)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX if op == "max" else MPI.SUM)
    return buf[0]


def gather_to_root(comm, array, root=0):
    """Stack every rank's equally shaped ``array`` on ``root`` as ``[size, *shape]`` (None elsewhere)."""
    array = np.ascontiguousarray(array)
    out = np.empty((comm.Get_size(),) + array.shape, array.dtype) if comm.Get_rank() == root else None
    comm.Gather(array, out, root=root)
    return out


def allgather_columns(comm, local, counts):
    """Concatenate every rank's ``[rows, counts[r]]`` block along the columns, on every rank."""
    local = np.ascontiguousarray(local)
    rows = local.shape[0]
    sizes = [rows * c for c in counts]
    flat = np.empty(sum(sizes), local.dtype)
    comm.Allgatherv(local, [flat, sizes, np.cumsum([0] + sizes[:-1]).tolist(), _MPI_TYPES[local.dtype.char]])
    blocks, start = [], 0
    for size, c in zip(sizes, counts):
        blocks.append(flat[start:start + size].reshape(rows, c))
        start += size
    return np.concatenate(blocks, axis=1)


_MPI_TYPES = {"f": MPI.FLOAT, "d": MPI.DOUBLE, "q": MPI.INT64_T, "l": MPI.INT64_T}


def bcast_ints(comm, values, root=0):
    """Broadcast a short list of ints from ``root``; every rank returns the root's values."""
    buf = np.asarray(values, dtype=np.int64).copy()
    comm.Bcast(buf, root=root)
    return [int(v) for v in buf]


def allgather(comm, obj):
    """Every rank's small Python object, as a list in rank order, on every rank; not for hot paths."""
    return comm.allgather(obj)


def ranks_on_node(comm):
    """How many ranks of ``comm`` run on this node (and share its cores and memory).

    Counted by host name: with MPI forced onto TCP on one machine (MPIR_CVAR_NOLOCAL=1) the shared-memory
    split would see every rank alone.
    """
    names = comm.allgather(MPI.Get_processor_name())
    return names.count(MPI.Get_processor_name())


def max_over_ranks(comm, value):
    """The largest ``value`` over all ranks, on every rank."""
    return comm.allreduce(value, op=MPI.MAX)


def abort(comm, code):
    """Kill every rank of the job with exit status ``code``; stdout/stderr are flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    # The launcher forwards our output through pipes; aborting at once sometimes tore the job down before
    # the last lines were forwarded (seen with MPICH's Hydra: the error message was lost). Give it a moment.
    time.sleep(0.5)
    comm.Abort(code)


def library_version():
    """One line naming the MPI library mpi4py is linked against."""
    return " ".join(MPI.Get_library_version().split("\n")[0].split())
