"""Simulated ranks in one process: P threads, each with a communicator that sums through shared memory.

Lets the serial test run check tensor parallelism at any rank count (sharding, fused-QKV splitting, a
row-parallel bias counted P times) without MPI. It implements just the calls mpitp makes.
"""

import threading

import numpy as np
from mpi4py import MPI


class _Group:
    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size


class ThreadComm:
    def __init__(self, group, rank):
        self._g, self.rank, self.size = group, rank, group.size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def _exchange(self, value):
        g = self._g
        g.slots[self.rank] = value
        g.barrier.wait()
        values = list(g.slots)
        g.barrier.wait()
        return values

    def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        assert sendbuf is MPI.IN_PLACE and op in (MPI.SUM, MPI.MAX)
        parts = self._exchange(np.array(recvbuf))
        # the same order on every rank: identical results
        recvbuf[...] = np.sum(parts, axis=0) if op == MPI.SUM else np.max(parts, axis=0)

    def Bcast(self, buf, root=0):
        buf[...] = self._exchange(np.array(buf))[root]

    def Gather(self, sendbuf, recvbuf, root=0):
        parts = self._exchange(np.array(sendbuf))
        if self.rank == root:
            recvbuf[...] = np.stack(parts)

    def Allgatherv(self, sendbuf, recvspec):
        recvbuf, counts, displs, _ = recvspec
        parts = self._exchange(np.array(sendbuf).ravel())
        for part, count, displ in zip(parts, counts, displs):
            assert part.size == count
            recvbuf[displ:displ + count] = part

    def Alltoallv(self, sendspec, recvspec):
        sendbuf, send_counts, send_offsets, _ = sendspec
        recvbuf, recv_counts, recv_offsets, _ = recvspec
        parts = self._exchange([np.array(sendbuf[o:o + c]) for c, o in zip(send_counts, send_offsets)])
        for r, (count, offset) in enumerate(zip(recv_counts, recv_offsets)):
            piece = parts[r][self.rank]  # what rank r sent to this one
            assert piece.size == count
            recvbuf[offset:offset + count] = piece

    def allgather(self, obj):
        return self._exchange(obj)

    def allreduce(self, value, op=MPI.SUM):
        values = self._exchange(value)
        return max(values) if op == MPI.MAX else min(values) if op == MPI.MIN else sum(values)


def run_ranks(size, fn):
    """Run ``fn(comm)`` on ``size`` simulated ranks; return the list of results in rank order."""
    group = _Group(size)
    results, errors = [None] * size, []

    def body(rank):
        try:
            results[rank] = fn(ThreadComm(group, rank))
        except BaseException as e:  # noqa: BLE001 -- re-raised below; release the other threads now
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return results


class CountingComm:
    """Wraps a communicator and counts its Allreduce calls."""

    def __init__(self, comm):
        self._comm, self.allreduce_calls = comm, 0

    def Allreduce(self, *args, **kwargs):
        self.allreduce_calls += 1
        return self._comm.Allreduce(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._comm, name)
