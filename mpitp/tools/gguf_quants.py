"""GGUF tensor types the converter reads, and their dequantization to float32, written from the format.

A quantized GGUF tensor is a sequence of blocks, each a fixed number of values stored in a fixed number of
bytes (the layouts are ggml's ``ggml-common.h``; the arithmetic, done in float32 in the same order, is
``ggml-quants.c``'s ``dequantize_row_*``). ``TYPES`` holds, per type, the values per block, the bytes per
block and the function that turns ``[n_blocks, bytes]`` uint8 into ``[n_blocks, values]`` float32, so that
size checks are generic. Every function works on all blocks at once (NumPy, no loop over blocks).

- Legacy 32-value blocks: a float16 scale ``d`` (and a float16 minimum ``m`` for the ``_1`` types); 4-bit
  values in 16 bytes, value j < 16 the low nibble of byte j and value 16 + j its high nibble; the 5-bit types
  add a 32-bit word whose bit j is the fifth bit of value j. ``_0``: (q - 8 or 16) * d; ``_1``: q * d + m.
- k-quants, super-blocks of 256 values. Q4_K / Q5_K: float16 ``d`` and ``dmin``, 12 bytes packing eight 6-bit
  sub-block scales and eight 6-bit minimums (``_k_scales``), then for each 64 values 32 bytes whose low
  nibbles are the first 32 and high nibbles the next 32 (Q5_K: 32 more bytes first, bit j of byte l the fifth
  bit of value l of sub-block j); value = (d * scale) * q - (dmin * min). Q6_K: 128 bytes of low nibbles, 64
  bytes of 2-bit high parts, sixteen int8 scales (one per 16 values), float16 ``d``; value = (d * scale) * (q - 32).
"""

import numpy as np


def _f16(blocks, at):
    # [n_blocks, bytes] -> the float16 at byte ``at`` of each block, as float32 [n_blocks, 1]
    return blocks[:, at:at + 2].copy().view("<f2").astype(np.float32)


def _nibbles(packed):
    # [..., n] bytes -> [..., 2n]: the n low nibbles, then the n high nibbles
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _bits32(word):
    # [n_blocks, 4] bytes of a little-endian uint32 -> its 32 bits [n_blocks, 32], bit j at index j
    return np.unpackbits(word, axis=-1, bitorder="little")


def _q8_0(blocks):
    return blocks[:, 2:].copy().view(np.int8).astype(np.float32) * _f16(blocks, 0)


def _q4_0(blocks):
    return (_nibbles(blocks[:, 2:]).astype(np.int8) - 8).astype(np.float32) * _f16(blocks, 0)


def _q4_1(blocks):
    return _nibbles(blocks[:, 4:]).astype(np.float32) * _f16(blocks, 0) + _f16(blocks, 2)


def _q5(blocks, at):
    # The 5-bit values of a Q5_0 / Q5_1 block whose 32-bit high word starts at byte ``at``
    return _nibbles(blocks[:, at + 4:]) | (_bits32(blocks[:, at:at + 4]) << 4)


def _q5_0(blocks):
    return (_q5(blocks, 2).astype(np.int8) - 16).astype(np.float32) * _f16(blocks, 0)


def _q5_1(blocks):
    return _q5(blocks, 4).astype(np.float32) * _f16(blocks, 0) + _f16(blocks, 2)


def _k_scales(s):
    # [n_blocks, 12] -> (scales, mins), each [n_blocks, 8]: sub-blocks 0-3 keep the low 6 bits of bytes 0-3
    # (scales) and 4-7 (mins); sub-blocks 4-7 take their low 4 bits from bytes 8-11 (scale: low nibble, min:
    # high nibble) and their top 2 bits from the top 2 bits of bytes 0-3 (scales) and 4-7 (mins).
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_4or5(blocks, q):
    # q: [n_blocks, 8, 32] unsigned values of the eight sub-blocks -> (d * scale) * q - (dmin * min)
    scales, mins = _k_scales(blocks[:, 4:16])
    d, dmin = _f16(blocks, 0) * scales, _f16(blocks, 2) * mins
    return (d[:, :, None] * q.astype(np.float32) - dmin[:, :, None]).reshape(len(blocks), 256)


def _q4_k(blocks):
    return _k_4or5(blocks, _nibbles(blocks[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32))


def _q5_k(blocks):
    high = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    return _k_4or5(blocks, _nibbles(blocks[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32) | (high << 4))


def _q6_k(blocks):
    n = len(blocks)
    low = _nibbles(blocks[:, :128].reshape(n, 2, 64))  # [n, 2 halves, 128]
    shifts = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    high = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 2, 128)
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32).reshape(n, 16, 16)
    d = _f16(blocks, 208) * blocks[:, 192:208].copy().view(np.int8).astype(np.float32)  # [n, 16]
    return (d[:, :, None] * q).reshape(n, 256)


TYPES = {  # GGUF type name: (values per block, bytes per block, [n_blocks, bytes] uint8 -> float32)
    "F32": (1, 4, lambda b: b.copy().view("<f4")),
    "F16": (1, 2, lambda b: b.copy().view("<f2").astype(np.float32)),
    "BF16": (1, 2, lambda b: (b.copy().view("<u2").astype(np.uint32) << 16).view(np.float32)),
    "Q8_0": (32, 34, _q8_0),
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q4_K": (256, 144, _q4_k),
    "Q5_K": (256, 176, _q5_k),
    "Q6_K": (256, 210, _q6_k),
}
_CHUNK = 1 << 20  # values dequantized at a time: bounds the temporaries of a large tensor to tens of MB


def dequantize(raw, kind):
    """The float32 values (flat) of ``raw``, the bytes of a tensor of GGUF type ``kind`` (a key of ``TYPES``)."""
    block, size, fn = TYPES[kind]
    blocks = np.frombuffer(raw, np.uint8).reshape(-1, size)
    out = np.empty((len(blocks), block), np.float32)
    step = _CHUNK // block
    with np.errstate(all="ignore"):  # an inf scale makes inf and NaN: the converter refuses them in one line
        for start in range(0, len(blocks), step):
            out[start:start + step] = fn(blocks[start:start + step])
    return out.reshape(-1)
