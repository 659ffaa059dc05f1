"""Writing safetensors files in tests (the format's header rules, spelled out independently of mpitp)."""

import json
import struct

import numpy as np

_CODES = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16"}


def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def header_and_data(tensors, bf16=()):
    """``(header dict, data bytes)`` for ``{name: array}``; names in ``bf16`` are stored as BF16."""
    header, chunks, offset = {}, [], 0
    for name, a in tensors.items():
        if name in bf16:
            raw, code = to_bf16_bits(a).tobytes(), "BF16"
        else:
            a = np.ascontiguousarray(a)
            raw, code = a.tobytes(), _CODES[a.dtype]
        header[name] = {"dtype": code, "shape": list(np.shape(a)), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def write_raw(path, header, data, header_len=None):
    """Write a file from a header (dict or raw bytes) and data; ``header_len`` may lie on purpose."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if header_len is None else header_len))
        f.write(h)
        f.write(data)


def write_safetensors(path, tensors, bf16=()):
    header, data = header_and_data(tensors, bf16)
    write_raw(path, header, data)
