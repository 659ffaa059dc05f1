"""The fast layout: one block of memory for all of a rank's weights, in the order a forward reads them.

Decoding reads every weight once per token, so it runs at the speed of memory. None of this changes a value:
huge pages (2 MiB: 512 times fewer TLB misses than 4 KiB; NumPy asks for them only for arrays of 4 MiB and more)
for all of the arena; the weights in the order a forward reads them, one sequential stream; the LM head's rows
padded to whole cache lines (``ROW_ALIGN`` values), which ``take`` hides. Measured gains: docs/benchmark.md.
Without anonymous memory maps (Windows) the arena is a NumPy buffer.
"""

import contextlib
import mmap

import numpy as np

_HUGE_PAGE = 2 << 20
_ALIGN = 64  # every array starts on a cache line
ROW_ALIGN = 16  # padded rows hold a multiple of this many values (64 bytes in float32)


def _aligned(nbytes):
    return -(-nbytes // _ALIGN) * _ALIGN


def padded_shape(shape):
    return tuple(shape[:-1]) + (-(-shape[-1] // ROW_ALIGN) * ROW_ALIGN,)


class Arena:
    """Hands out consecutive, aligned arrays from one anonymous memory map of ``nbytes``; its pages are zero and
    only committed when written (loading writes every one)."""

    def __init__(self, nbytes):
        self.nbytes = nbytes
        size = max(nbytes, 1) + _HUGE_PAGE  # room to start on a huge-page boundary
        anonymous = hasattr(mmap, "MAP_ANONYMOUS")
        if anonymous:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            raw = np.frombuffer(self._map, dtype=np.uint8)  # keeps the map alive as long as any view of it
        else:
            raw = np.zeros(size, np.uint8)
        start = (-raw.ctypes.data) % _HUGE_PAGE
        # Huge pages for the whole 2 MiB pages only: in THP's usual "madvise" mode a huge page is committed
        # whole, so the tail keeps small pages and resident memory stays the bytes used.
        huge = nbytes // _HUGE_PAGE * _HUGE_PAGE
        if anonymous and huge and hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # THP compiled out: ordinary pages
                self._map.madvise(mmap.MADV_HUGEPAGE, start, huge)
        self._buf = raw[start:start + nbytes]
        self._used = 0

    @staticmethod
    def size_of(shapes, dtype):
        """Bytes an arena needs to hand out arrays of these shapes (padded ones given padded) and ``dtype``."""
        itemsize = np.dtype(dtype).itemsize
        return sum(_aligned(int(np.prod(s)) * itemsize) for s in shapes)

    def take(self, shape, dtype, padded=False):
        """The next array of ``shape`` and ``dtype`` (zero); with ``padded``, a view of padded rows."""
        full = padded_shape(shape) if padded else tuple(shape)
        n = int(np.prod(full)) * np.dtype(dtype).itemsize
        if self._used + n > self.nbytes:
            raise ValueError(f"arena of {self.nbytes} bytes cannot hold {n} more after {self._used}")
        out = self._buf[self._used:self._used + n].view(dtype).reshape(full)
        self._used += _aligned(n)
        return out[..., :shape[-1]]
