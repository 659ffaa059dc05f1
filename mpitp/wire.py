"""The formats a block's partial sums can take on the wire (``--comm-dtype``): each turns a flat array of the
model's dtype into bytes and back. The reduction that uses them is ``mpitp.comm.wire_allreduce``.

Byte layouts (little-endian; docs/sync-precision.md):

- ``float64``, ``float32``, ``float16``: IEEE binary64/32/16, one value after the other, rounded to nearest even.
- ``bfloat16``: the upper 16 bits of a binary32, rounded to nearest even from the model's value (from float64
  directly: no double rounding through float32).
- ``q8_0``: llama.cpp's Q8_0, blocks of 32 values, each 34 bytes: a float16 scale ``d = amax / 127``, then 32
  int8 ``q = round(x / d)`` (halves away from zero, as C's ``roundf``); a value is ``q * d``.
- ``q8_0o`` (Q8_0 with its outlier apart): blocks of 32 values, each 37 bytes: a float16 scale ``d``, the block's
  largest-magnitude value as a float16, its index (uint8), then 32 int8 ``q``; ``d = amax / 127`` over the other
  31 values, the outlier's own ``q`` is 0, and the decoder puts the float16 value back in its place. One large
  value no longer sets the scale of its 31 neighbours.

A tail shorter than a block is padded with zeros; the decoder returns only the values asked for.
"""

import numpy as np

BLOCK = 32  # values per block of the 8-bit formats (llama.cpp's QK8_0)
Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", BLOCK)])
Q8_0O = np.dtype([("d", "<f2"), ("o", "<f2"), ("i", "u1"), ("qs", "i1", BLOCK)])


def _round_away(v):
    """C's roundf: to nearest, halves away from zero."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= 0.5, np.sign(v), 0)


def _to_bfloat16_bits(x):
    """``x`` (float32 or float64) rounded to nearest even bfloat16: the ``<u2`` bit patterns."""
    if x.dtype == np.float64:  # round to odd into float32 first: then one rounding to bfloat16 is exact
        x32 = x.astype(np.float32)
        over = np.abs(x32.astype(np.float64)) > np.abs(x)
        x32 = np.where(over, np.nextafter(x32, np.float32(0)), x32)
        inexact = x32.astype(np.float64) != x
        x = (x32.view(np.uint32) | inexact.astype(np.uint32)).view(np.float32)
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # a NaN stays a (quiet) NaN
    return rounded


def _q8_blocks(x):
    """``x`` padded with zeros to whole blocks: ``[n_blocks, 32]`` float64."""
    n_blocks = -(-x.size // BLOCK)
    out = np.zeros(n_blocks * BLOCK)
    out[:x.size] = x
    return out.reshape(n_blocks, BLOCK)


def _q8_quantize(blocks, amax):
    """The scale ``d = amax / 127`` of each block (float64, before it is stored as float16) and its int8 values."""
    d = amax / 127
    v = np.divide(blocks, d[:, None], out=np.zeros_like(blocks), where=d[:, None] != 0)
    return d, _round_away(v).astype(np.int8)


def encode_q8_0(x):
    blocks = _q8_blocks(x)
    out = np.empty(len(blocks), Q8_0)
    d, out["qs"] = _q8_quantize(blocks, np.abs(blocks).max(axis=1))
    out["d"] = d
    return out.view(np.uint8)


def decode_q8_0(data, n, dtype):
    b = data.view(Q8_0)
    return (b["qs"].astype(dtype) * b["d"].astype(dtype)[:, None]).reshape(-1)[:n]


def encode_q8_0o(x):
    blocks = _q8_blocks(x)
    rows = np.arange(len(blocks))
    top = np.abs(blocks).argmax(axis=1)  # the first of equals
    out = np.empty(len(blocks), Q8_0O)
    out["o"], out["i"] = blocks[rows, top], top
    rest = blocks.copy()
    rest[rows, top] = 0
    d, out["qs"] = _q8_quantize(rest, np.abs(rest).max(axis=1))
    out["d"] = d
    return out.view(np.uint8)


def decode_q8_0o(data, n, dtype):
    b = data.view(Q8_0O)
    x = b["qs"].astype(dtype) * b["d"].astype(dtype)[:, None]
    x[np.arange(len(b)), b["i"]] = b["o"]
    return x.reshape(-1)[:n]


class Format:
    """One wire format: ``encode(x)`` -> uint8 bytes, ``decode(data, n, dtype)`` -> the first ``n`` values; a
    block of ``block`` values takes ``block_bytes`` bytes."""

    def __init__(self, name, block, block_bytes, encode, decode):
        self.name, self.block, self.block_bytes, self.encode, self.decode = name, block, block_bytes, encode, decode

    def n_bytes(self, n):
        return -(-n // self.block) * self.block_bytes


def _ieee(name, kind):
    return Format(name, 1, np.dtype(kind).itemsize, lambda x: np.ascontiguousarray(x, dtype=kind).view(np.uint8),
                  lambda data, n, dtype: data.view(kind)[:n].astype(dtype))


FORMATS = {f.name: f for f in (
    _ieee("float64", "<f8"), _ieee("float32", "<f4"), _ieee("float16", "<f2"),
    Format("bfloat16", 1, 2, lambda x: _to_bfloat16_bits(x).view(np.uint8),
           lambda data, n, dtype: (data.view("<u2")[:n].astype(np.uint32) << 16).view(np.float32).astype(dtype)),
    Format("q8_0", BLOCK, Q8_0.itemsize, encode_q8_0, decode_q8_0),
    Format("q8_0o", BLOCK, Q8_0O.itemsize, encode_q8_0o, decode_q8_0o))}
