"""Communication: the only module in mpitp that imports mpi4py, and only when a collective is first used.

Everything below the entry points takes the communicator as an explicit argument. The collectives here are
buffer-based (upper-case mpi4py methods) on NumPy arrays; ``allreduce_sum`` is the tensor-parallel one, called
twice per block. ``TimedComm`` wraps a communicator to time and count those calls from outside the math.
``WireComm`` sends the block's partial sums in a smaller format (``mpitp.wire``, ``--comm-dtype``):
``wire_allreduce`` is its reduction.
"""

import contextlib
import ctypes
import functools
import os
import sys
import time

import numpy as np

from .errors import MpitpError
from .sharding import block_range
from .wire import FORMATS


class MPIUnavailable(MpitpError):
    """mpi4py (or the MPI library under it) cannot be imported: one line naming what to install."""


_MPI = []  # mpi4py's MPI module, once initialised: the hot path's collectives ask for it every call


def _mpi():
    """mpi4py's MPI module, MPI initialised (at the first use, not at `import mpitp`)."""
    if _MPI:
        return _MPI[0]
    try:
        if "mpi4py.MPI" not in sys.modules:
            import mpi4py
            mpi4py.rc.initialize, mpi4py.rc.finalize = False, True  # initialised below; finalised at exit as usual
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:  # RuntimeError: mpi4py is there, the MPI library it needs is not
        raise MPIUnavailable(f"mpi4py does not work in {sys.executable} ({e}): `pip install mpi4py mpich`, or "
                             f"`make install` in the clone and its .venv; on a cluster, see docs/install.md.") from None
    if not MPI.Is_initialized():
        _init(MPI)
    _MPI.append(MPI)
    return MPI


def _init(MPI):
    """MPI_Init_thread, called through ctypes, which releases the GIL while it runs. It can block (a rank that
    cannot reach the others), and mpi4py's own call holds the GIL: the runner's watchdog thread could then not
    end the rank on Ctrl-C. Where the library cannot be found this way (not Linux), mpi4py's call it is."""
    try:
        with open("/proc/self/maps") as f:  # the libmpi mpi4py loaded, by its path
            path = next(line.split()[-1] for line in f if os.path.basename(line.split()[-1]).startswith("libmpi.so"))
        init = ctypes.CDLL(path).MPI_Init_thread
    except (OSError, StopIteration, AttributeError):
        return MPI.Init_thread(MPI.THREAD_MULTIPLE)
    provided = ctypes.c_int()
    if init(None, None, int(MPI.THREAD_MULTIPLE), ctypes.byref(provided)) != 0:
        raise RuntimeError("MPI_Init_thread failed")


def world():
    """The communicator of every process started by mpirun (a 1-rank one without mpirun)."""
    return _mpi().COMM_WORLD


def serial():
    """A 1-rank communicator: runs the very same code path on this process alone."""
    return _mpi().COMM_SELF


def allreduce_sum(comm, buf):
    """Sum ``buf`` over all ranks of ``comm``, in place (``MPI.IN_PLACE``, no temporary)."""
    MPI = _mpi()
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def allreduce_max(comm, buf):
    """The elementwise maximum of ``buf`` over all ranks of ``comm``, in place (vocabulary-parallel scoring's
    row maxima)."""
    MPI = _mpi()
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)


def allreduce_scalar(comm, value, op, dtype):
    """``value`` reduced over all ranks with ``op`` ("max" or "sum"), exactly, on every rank."""
    buf = np.array([value], dtype=dtype)
    comm.Allreduce(_mpi().IN_PLACE, buf, op=getattr(_mpi(), op.upper()))
    return buf[0]


def gather_to_root(comm, array, root=0):
    """Stack every rank's equally shaped ``array`` on ``root`` as ``[size, *shape]`` (None elsewhere)."""
    array = np.ascontiguousarray(array)
    out = np.empty((comm.Get_size(),) + array.shape, array.dtype) if comm.Get_rank() == root else None
    comm.Gather(array, out, root=root)
    return out


def allgather_columns(comm, local, counts):
    """Concatenate every rank's ``[..., counts[r]]`` block along the last axis, on every rank."""
    local = np.ascontiguousarray(local)
    lead = local.shape[:-1]
    sizes = [int(np.prod(lead, dtype=np.int64)) * c for c in counts]
    flat = np.empty(sum(sizes), local.dtype)
    mpi_type = {"f": _mpi().FLOAT, "d": _mpi().DOUBLE}[local.dtype.char]
    comm.Allgatherv(local, [flat, sizes, np.cumsum([0] + sizes[:-1]).tolist(), mpi_type])
    blocks = np.split(flat, np.cumsum(sizes)[:-1])
    return np.concatenate([b.reshape(lead + (c,)) for b, c in zip(blocks, counts)], axis=-1)


def _rows_spec(buf, counts):
    # [buf, element counts, displacements, MPI type] of a [rows, width] buffer whose rows are split by ``counts``
    width = buf.shape[1] if buf.ndim == 2 else 1
    sizes = [int(c) * width for c in counts]
    return [buf, sizes, np.cumsum([0] + sizes[:-1]).tolist(), {"f": _mpi().FLOAT, "d": _mpi().DOUBLE}[buf.dtype.char]]


def alltoall_counts(comm, counts):
    """Every rank's ``counts[r]`` (how many rows it will send rank r) as rank r receives them: ``[size]`` ints,
    element s what rank s will send this rank. The expert layout's first message."""
    send = np.asarray(counts, dtype=np.int64)
    recv = np.empty_like(send)
    comm.Alltoall(send, recv)
    return recv


def alltoallv_rows(comm, rows, send_counts, recv_counts):
    """Send ``rows`` ``[sum(send_counts), width]``, its first ``send_counts[0]`` rows to rank 0, the next to rank 1,
    ..., and receive ``[sum(recv_counts), width]``, rank 0's rows first: the expert layout's dispatch and
    combine."""
    rows = np.ascontiguousarray(rows)
    out = np.empty((int(sum(recv_counts)),) + rows.shape[1:], rows.dtype)
    comm.Alltoallv(_rows_spec(rows, send_counts), _rows_spec(out, recv_counts))
    return out


def allgather_rows(comm, local, counts):
    """Every rank's ``[counts[r], width]`` rows, rank 0's first, on every rank: ``[sum(counts), width]``."""
    local = np.ascontiguousarray(local)
    out = np.empty((int(sum(counts)),) + local.shape[1:], local.dtype)
    comm.Allgatherv(local, _rows_spec(out, counts))
    return out


def bcast_ints(comm, values, root=0):
    """Broadcast a short list of ints from ``root``; every rank returns the root's values."""
    buf = np.asarray(values, dtype=np.int64).copy()
    comm.Bcast(buf, root=root)
    return [int(v) for v in buf]


def split(comm, color, key):
    """The communicator of the ranks of ``comm`` that give the same ``color``, ordered by ``key`` (collective over
    ``comm``): a pipeline stage's tensor-parallel group."""
    return comm.Split(color, key)


def send(comm, buf, dest, tag):
    """Send the contiguous array ``buf`` to rank ``dest`` (point to point; returns once ``buf`` may be reused)."""
    comm.Send(np.ascontiguousarray(buf), dest=dest, tag=tag)


def isend(comm, buf, dest, tag):
    """Start sending ``buf`` to ``dest`` and return at once: a request to ``wait`` on (keep ``buf`` alive until)."""
    return comm.Isend(buf, dest=dest, tag=tag)


def wait_all(requests):
    """Wait until every request of ``isend`` has completed."""
    for request in requests:
        request.Wait()


def recv(comm, buf, source, tag):
    """Receive into the preallocated array ``buf`` from rank ``source``; returns ``buf``."""
    comm.Recv(buf, source=source, tag=tag)
    return buf


def max_over_ranks(comm, value):
    """The largest ``value`` over all ranks, on every rank."""
    return comm.allreduce(value, op=_mpi().MAX)


def ranks_on_node(comm):
    """How many ranks of ``comm`` run on this node (and share its cores and memory), by host name: with MPI
    forced onto TCP on one machine (MPIR_CVAR_NOLOCAL=1) the shared-memory split would see every rank alone."""
    name = _mpi().Get_processor_name()
    return comm.allgather(name).count(name)


@functools.lru_cache(maxsize=64)  # a model asks for the same few, twice a block
def segments(n_blocks, size):
    """The blocks each rank owns in ``wire_allreduce``: ``((start, count), ...)`` per rank, as even as can be."""
    return tuple(block_range(n_blocks, size, r) for r in range(size))


def sent_bytes(n_blocks, block_bytes, size, rank, rows=1):
    """Bytes ``rank`` sends in ``wire_allreduce`` of ``rows`` rows of ``n_blocks`` blocks: the other ranks'
    segments (reduce-scatter), then its own segment's sum to each of the others (all-gather): about 2 (P - 1) / P
    of the whole."""
    counts = [c for _, c in segments(n_blocks, size)]
    return rows * block_bytes * (n_blocks - counts[rank] + (size - 1) * counts[rank])


def wire_allreduce(comm, buf, fmt):
    """Sum ``buf`` over the ranks in place, with the partial sums in the wire format ``fmt`` (``mpitp.wire``):
    a reduce-scatter, then an all-gather, of encoded blocks. Each rank sends every other rank that rank's
    segment of its partial sum, encoded; sums its own segment in ``buf``'s dtype, in rank order (its own part
    as it is: it never crossed the wire); encodes the sum once and sends it to every other rank. Every rank,
    this one too, then decodes the same bytes: the result is bit-identical on every rank. Returns the bytes
    this rank sent (``sent_bytes``).

    A row (the last axis) is padded with zeros to whole blocks, as GGML's rows are, and a rank's segment is the
    same blocks of every row: so a row's sum depends on that row alone, never on the rows beside it (a batch's
    other sequences, a micro-batch)."""
    MPI, size, rank = _mpi(), comm.Get_size(), comm.Get_rank()
    if not buf.flags.c_contiguous:  # the sum is written back through a [rows, width] view
        raise ValueError("wire_allreduce needs a C-contiguous buffer")
    width = buf.shape[-1] if buf.ndim > 1 else buf.size
    rows, n_col, block = buf.size // max(width, 1), -(-width // fmt.block), fmt.block
    padded = np.zeros((rows, n_col * block), buf.dtype)
    padded[:, :width] = buf.reshape(rows, width)
    flat = padded.reshape(rows, n_col, block).transpose(1, 0, 2).reshape(-1)  # block column after block column
    segs = [(start * rows, count * rows) for start, count in segments(n_col, size)]  # in blocks of flat
    lo, hi = segs[rank][0] * block, sum(segs[rank]) * block
    encoded = fmt.encode(flat)
    send_counts = [0 if r == rank else c * fmt.block_bytes for r, (_, c) in enumerate(segs)]
    recv_counts = [0 if r == rank else segs[rank][1] * fmt.block_bytes for r in range(size)]
    received = np.empty(sum(recv_counts), np.uint8)
    comm.Alltoallv([encoded, send_counts, [s * fmt.block_bytes for s, _ in segs], MPI.BYTE],
                   [received, recv_counts, _offsets(recv_counts), MPI.BYTE])
    others = fmt.decode(received, (size - 1) * (hi - lo), buf.dtype).reshape(size - 1, hi - lo)  # one decode
    total = None
    for r in range(size):  # in rank order: the same sum whichever rank owns the segment
        part = flat[lo:hi] if r == rank else others[r - (r > rank)]
        total = part.copy() if total is None else total + part
    counts = [c * fmt.block_bytes for _, c in segs]
    gathered = np.empty(sum(counts), np.uint8)  # the segments in rank order: the whole buffer, encoded
    comm.Allgatherv(fmt.encode(total), [gathered, counts, _offsets(counts), MPI.BYTE])
    summed = fmt.decode(gathered, flat.size, buf.dtype).reshape(n_col, rows, block).transpose(1, 0, 2)
    buf.reshape(rows, width)[:] = summed.reshape(rows, n_col * block)[:, :width]
    return sent_bytes(n_col, fmt.block_bytes, size, rank, rows)


def _offsets(counts):
    return np.cumsum([0] + list(counts[:-1])).tolist()


class WireComm:
    """A communicator whose in-place Allreduce sums go through ``wire_allreduce`` in the wire format ``fmt``
    while the model runs a block (``during``), and straight through otherwise: the embedding's and the
    scoring's sums stay exact, and the block's two lines stay the seed's. Every other call passes through."""

    def __init__(self, comm, fmt):
        self.comm, self.fmt, self.in_block = comm, fmt, False

    def during(self, block_fn):
        """``block_fn`` with this communicator's wire format on while it runs."""
        def block(*args, **kwargs):
            self.in_block = True
            try:
                return block_fn(*args, **kwargs)
            finally:
                self.in_block = False
        return block

    def Allreduce(self, sendbuf, recvbuf, op=None):
        MPI = _mpi()
        if not (self.in_block and sendbuf is MPI.IN_PLACE and op in (None, MPI.SUM) and self.Get_size() > 1) \
                or recvbuf.shape[-1] < self.fmt.block:  # rows narrower than a block (a QK-norm's two sums): exact
            return self.comm.Allreduce(sendbuf, recvbuf, op=op if op is not None else MPI.SUM)
        t = time.perf_counter()
        sent = wire_allreduce(self.comm, recvbuf, self.fmt)
        count = getattr(self.comm, "count_reduction", None)  # a TimedComm under this one: one Allreduce call
        if count is not None:
            count(time.perf_counter() - t, recvbuf.nbytes, sent)

    def __getattr__(self, name):
        return getattr(self.comm, name)


def wire_comm(comm, comm_dtype, dtype):
    """``comm`` with the block's reductions in ``comm_dtype`` (a name of ``mpitp.wire.FORMATS``), or ``comm``
    itself where that is the model's ``dtype`` or None (the plain Allreduce, bit for bit)."""
    if comm_dtype is None or comm_dtype == np.dtype(dtype).name:
        return comm
    if comm_dtype not in FORMATS:
        raise MpitpError(f"--comm-dtype {comm_dtype!r} is not a wire format; use one of: {', '.join(FORMATS)}.")
    return WireComm(comm, FORMATS[comm_dtype])


class TimedComm:
    """A communicator that times and counts its Allreduce calls (``seconds``, ``calls``, ``bytes`` of payload,
    ``sent``: bytes this rank sent); every other call passes straight through. Load a model with it: the model's
    code does not change. A plain Allreduce's ``sent`` is what a bandwidth-optimal one sends (``sent_bytes`` in
    its dtype: about 2 (P - 1) / P of the payload); a ``WireComm`` above it reports its own (``count_reduction``)."""

    def __init__(self, comm):
        self.comm = comm
        self.reset()

    def Allreduce(self, sendbuf, recvbuf, op=None):
        t = time.perf_counter()
        self.comm.Allreduce(sendbuf, recvbuf, op=op if op is not None else _mpi().SUM)
        self.count_reduction(time.perf_counter() - t, recvbuf.nbytes,
                   sent_bytes(recvbuf.size, recvbuf.itemsize, self.comm.Get_size(), self.comm.Get_rank()))

    def count_reduction(self, seconds, payload, sent):
        """One reduction of ``payload`` bytes that took ``seconds`` and sent ``sent`` bytes from this rank."""
        self.seconds += seconds
        self.calls += 1
        self.bytes += payload
        self.sent += sent

    def reset(self):
        self.seconds, self.calls, self.bytes, self.sent = 0.0, 0, 0, 0

    def __getattr__(self, name):
        return getattr(self.comm, name)


def abort(comm, code):
    """Kill every rank of the job with exit status ``code``; stdout/stderr are flushed first (if they can be)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):  # closed (None), a full disk, a gone reader
            stream.flush()
    # The launcher forwards our output through pipes; aborting at once sometimes tore the job down before
    # the last lines were forwarded (seen with MPICH's Hydra: the error message was lost). Give it a moment.
    time.sleep(0.5)
    comm.Abort(code)


def library_version():
    """One line naming the MPI library mpi4py is linked against."""
    return " ".join(_mpi().Get_library_version().split("\n")[0].split())
