"""One block of memory for all of a rank's weights, laid out in the order decoding reads them.

Decoding streams every weight once per token, so its speed is the speed of reading memory. Two things
about where the weights live decide how close to the machine's bandwidth that gets:

- Page size. With 4 KiB pages, every 4 KiB of a weight read costs a TLB miss; with 2 MiB "huge" pages
  (Linux transparent huge pages) there are 512 times fewer. NumPy asks for huge pages only for arrays of
  4 MiB and more, and a tensor-parallel rank's matrices are often smaller (GPT-2 small at 2 ranks: W_QKV
  3.5 MB and W_B 1.2 MB, against 4.7 MB for W_C and W_D). The arena asks for them for all of its memory.
- Order. One forward reads the weights in a fixed order; laid out in that order they make one long
  sequential stream, which the hardware prefetchers follow across the ends of the matrices.

Measured on the development machine (2-core AMD EPYC VM, OpenBLAS, one thread per process), the decode
products of GPT-2 small's 2-rank shard (every block matrix and the LM head, one vector each, interleaved
with the same products on separately allocated arrays, 40 pairs per run): one process read 24.4-24.9 GB/s
from this arena against 21.1-21.4 from separate arrays (16% faster); two processes at once, with the
memory in its slower regime, 16.1-18.1 against 15.8-17.0 GB/s (2-6% faster).

Where huge pages are not available (another OS, or THP disabled) this is just one ordinary allocation;
without anonymous memory maps (Windows) it is a NumPy buffer.
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
    them. Its pages are zero and only committed when written (loading writes every one).
    """

    def __init__(self, nbytes):
        self.nbytes = nbytes
        size = max(nbytes, 1) + _HUGE_PAGE  # room to start on a huge-page boundary
        anonymous = hasattr(mmap, "MAP_ANONYMOUS")  # not on Windows: ordinary memory there, same layout
        if anonymous:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            raw = np.frombuffer(self._map, dtype=np.uint8)  # keeps the map alive as long as any view of it
        else:
            raw = np.zeros(size, np.uint8)
        start = (-raw.ctypes.data) % _HUGE_PAGE
        # Huge pages for the whole 2 MiB pages of the buffer only: in THP's usual "madvise" mode a huge page
        # is committed whole, so the tail keeps small pages and resident memory stays the bytes used.
        huge = nbytes // _HUGE_PAGE * _HUGE_PAGE
        if anonymous and huge and hasattr(mmap, "MADV_HUGEPAGE"):
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
