"""Simulated ranks in one process: P threads, each with a communicator that sums through shared memory.

Lets the serial test run check tensor parallelism at any rank count (sharding, fused-QKV splitting, a
row-parallel bias counted P times) without MPI. It implements just the calls mpitp makes: the collectives,
``Split`` (pipeline stages) and point-to-point ``Send``/``Isend``/``Recv`` (a queue per sender, receiver and tag;
a send returns at once, as MPI's small eager messages do).
"""

import queue
import threading

import numpy as np
from mpi4py import MPI


class _Group:
    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size
        self.lock, self.groups, self.splits = threading.Lock(), {}, [0] * size
        self.mail = {}  # (source, dest, tag) -> queue of arrays

    def box(self, key):
        with self.lock:
            return self.mail.setdefault(key, queue.Queue())


class _Done:
    def Wait(self):
        pass


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

    def Barrier(self):
        self._exchange(None)

    def Bcast(self, buf, root=0):
        buf[...] = self._exchange(np.array(buf))[root]

    def Gather(self, sendbuf, recvbuf, root=0):
        parts = self._exchange(np.array(sendbuf))
        if self.rank == root:
            recvbuf[...] = np.stack(parts)

    def Allgatherv(self, sendbuf, recvspec):
        recvbuf, counts, displs, _ = recvspec
        parts, flat = self._exchange(np.array(sendbuf).ravel()), recvbuf.reshape(-1)
        for part, count, displ in zip(parts, counts, displs):
            assert part.size == count
            flat[displ:displ + count] = part

    def Alltoall(self, sendbuf, recvbuf):
        parts = self._exchange(np.array(sendbuf))
        recvbuf[...] = [part[self.rank] for part in parts]

    def Alltoallv(self, sendspec, recvspec):
        # [buffer, counts, displacements, type]: rank r's block of every sender's buffer, in sender order
        (send, s_counts, s_displs, _), (recv, r_counts, r_displs, _) = sendspec, recvspec
        parts = self._exchange((np.array(send).ravel(), s_counts, s_displs))
        flat = recv.reshape(-1)
        for (buf, counts, displs), count, displ in zip(parts, r_counts, r_displs):
            assert counts[self.rank] == count
            flat[displ:displ + count] = buf[displs[self.rank]:displs[self.rank] + count]

    def Split(self, color, key=0):
        g = self._g
        members = sorted((k, r) for r, (c, k) in enumerate(self._exchange((color, key))) if c == color)
        g.splits[self.rank] += 1
        with g.lock:  # the first member to get here makes the group, the others find it
            sub = g.groups.setdefault((g.splits[self.rank], color), _Group(len(members)))
        return ThreadComm(sub, [r for _, r in members].index(self.rank))

    def Send(self, buf, dest, tag=0):
        self._g.box((self.rank, dest, tag)).put(np.array(buf))

    def Isend(self, buf, dest, tag=0):
        self.Send(buf, dest, tag)
        return _Done()

    def Recv(self, buf, source, tag=0):
        got = self._g.box((source, self.rank, tag)).get(timeout=60)
        assert got.shape == buf.shape and got.dtype == buf.dtype, (got.shape, buf.shape, got.dtype, buf.dtype)
        buf[...] = got

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


def allreduce_calls(size, load):
    """Per rank of ``size`` simulated ranks, ``(calls, n_layer)``: the Allreduce calls of each forward of a prefill
    and two decode steps of the model ``load(comm)`` loads, and its number of layers."""
    from mpitp.comm import TimedComm

    def count(c):
        timed = TimedComm(c)
        model = load(timed)
        cache, calls = model.new_cache(8), []
        for ids in ([1, 2, 3, 4], [5], [6]):
            before = timed.calls
            model.forward(ids, cache, gather=False)
            calls.append(timed.calls - before)
        return calls, model.config.n_layer

    return run_ranks(size, count)


class CountingComm:
    """Wraps a communicator and counts its Allreduce calls."""

    def __init__(self, comm):
        self._comm, self.allreduce_calls = comm, 0

    def Allreduce(self, *args, **kwargs):
        self.allreduce_calls += 1
        return self._comm.Allreduce(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._comm, name)
