"""Writing safetensors files in tests (the format's header rules, spelled out independently of mpitp)."""

import json
import os
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


CORRUPTIONS = ["header beyond file", "header above cap", "offsets outside data", "overlap", "hole",
               "trailing bytes", "shape mismatch", "unknown dtype", "not json", "not an object", "negative shape"]


def valid_file_parts():
    return header_and_data({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)})


def corrupt(kind):
    """``(header, data, header_len)`` of a small file broken in one named way (see ``CORRUPTIONS``)."""
    header, data = valid_file_parts()
    header_len = None
    if kind == "header beyond file":
        header_len = 10_000
    elif kind == "header above cap":
        header_len = 2**40
    elif kind == "offsets outside data":
        header["b"]["data_offsets"] = [24, 48]
    elif kind == "overlap":
        header["b"]["data_offsets"] = [20, 36]
        data = data[:36]
    elif kind == "hole":
        header["a"]["data_offsets"] = [4, 28]
        header["b"]["data_offsets"] = [28, 44]
        data = b"\0" * 4 + data
    elif kind == "trailing bytes":
        data = data + b"\0" * 8
    elif kind == "shape mismatch":
        header["a"]["shape"] = [3, 3]
    elif kind == "unknown dtype":
        header["a"]["dtype"] = "F99"
    elif kind == "not json":
        header = b"{this is not json"
    elif kind == "not an object":
        header = b"[1, 2, 3]"
    elif kind == "negative shape":
        header["a"]["shape"] = [-2, -3]
    return header, data, header_len


def write_sharded(folder, tensors):
    """Write ``tensors`` as two shard files and a ``model.safetensors.index.json``; return the index."""
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file_name, keys in files.items():
        write_safetensors(os.path.join(folder, file_name), {k: tensors[k] for k in keys})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in files.items() for k in keys}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return index
