"""One block of memory for all of a rank's weights, laid out in the order decoding reads them.

Decoding streams every weight once per token, so its speed is the speed of reading memory. Two things
about where the weights live decide how close to the machine's bandwidth that gets:

- Page size. With 4 KiB pages, every 4 KiB of a weight read costs a TLB miss; with 2 MiB "huge" pages
  (Linux transparent huge pages) there are 512 times fewer. NumPy asks for huge pages only for arrays of
  4 MiB and more, and most of a tensor-parallel rank's matrices are smaller (GPT-2 small at 2 ranks:
  W_QKV 1.8 MB, W_B 1.2 MB). The arena asks for them for all of its memory.
- Order. One forward reads the weights in a fixed order; laid out in that order they make one long
  sequential stream, which the hardware prefetchers follow across the ends of the matrices.

Measured on the development machine (2-core AMD EPYC VM, OpenBLAS, one thread per process, GPT-2 small
shard shapes): the decode products read 21.2-21.8 GB/s per process from separately allocated arrays and
23.2-24.6 GB/s from this arena, with two processes reading at once.

Where huge pages are not available (another OS, or THP disabled) this is just one ordinary allocation.
"""

import mmap

import numpy as np

_HUGE_PAGE = 2 << 20
_ALIGN = 64  # every array starts on a cache line


def _aligned(nbytes):
    return -(-nbytes // _ALIGN) * _ALIGN


class Arena:
    """Hands out consecutive, aligned, C-contiguous arrays from one buffer of ``nbytes``.

    The buffer is an anonymous memory map, advised for transparent huge pages where the platform has
    them. Its pages are only committed when written (loading writes every one).
    """

    def __init__(self, nbytes):
        self.nbytes = nbytes
        size = max(nbytes, 1) + _HUGE_PAGE  # room to start on a huge-page boundary
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        raw = np.frombuffer(self._map, dtype=np.uint8)  # keeps the map alive as long as any view of it
        start = (-raw.ctypes.data) % _HUGE_PAGE
        # Huge pages for the whole 2 MiB pages of the buffer only: a huge page is committed whole, so
        # the tail keeps small pages and resident memory stays the bytes actually used.
        huge = nbytes // _HUGE_PAGE * _HUGE_PAGE
        if huge and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE, start, huge)
            except OSError:  # THP compiled out: ordinary pages
                pass
        self._buf = raw[start:start + nbytes]
        self._used = 0

    @staticmethod
    def size_of(shapes, dtype):
        """Bytes an arena needs to hand out arrays of these shapes and ``dtype``."""
        itemsize = np.dtype(dtype).itemsize
        return sum(_aligned(int(np.prod(s)) * itemsize) for s in shapes)

    def take(self, shape, dtype):
        """The next array of ``shape`` and ``dtype`` (uninitialised)."""
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self._used + n > self.nbytes:
            raise ValueError(f"arena of {self.nbytes} bytes cannot hold {n} more after {self._used}")
        out = self._buf[self._used:self._used + n].view(dtype).reshape(shape)
        self._used += _aligned(n)
        return out
