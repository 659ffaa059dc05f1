"""GGUF files for ``mpitp.convert``: the structure checked against the file's size, then read.

GGUF is llama.cpp's single-file format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md). In order,
little-endian: the magic ``GGUF``; the version (u32, 2 or 3); the tensor count and the key/value count (u64);
the key/value pairs (a string key, a u32 value type, the value; a string is a u64 length and UTF-8 bytes, an
array a u32 element type, a u64 count and the elements); the tensor infos (name, u32 number of dimensions,
u64 dimensions with the fastest-varying first, u32 ggml type, u64 offset into the data); padding to
``general.alignment`` (default 32); the tensor data.

The file is read here, through one read-only memory map: ``check_structure`` walks the header, checking
every count, length, type and offset against the file's size, and that every byte of the data section belongs
to exactly one tensor or to the alignment padding (as ``mpitp.checkpoint`` does for safetensors). The metadata
is decoded from the checked positions only when asked for, so bad tokenizer metadata is refused in well under a
second. The ``gguf`` package (llama.cpp's own, the ``gguf`` extra) supplies the type table (block size and bytes
per block of each tensor type) and the dequantization. Its ``GGUFReader`` is not used: it trusts what it reads
(a corrupt count makes it loop for a very long time, a bad offset or type makes NumPy raise), and building its
per-value objects took 5 s for SmolLM2's 49,152-token vocabulary before a single check could run.
"""

import collections
import math
import mmap
import os
import struct

import numpy as np

from ..errors import CheckpointError, open_regular
from .gguf_quants import TYPES, dequantize

# Fixed-size value types (GGUF's numbering) as struct codes; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY", "UINT64",
               "INT64", "FLOAT64")
_INTS = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")
SUPPORTED_TYPES = tuple(TYPES)  # the tensor types the converter reads (gguf_quants dequantizes them)
REQUIRED = object()
_Tensor = collections.namedtuple("_Tensor", "data tensor_type")  # what gguf.quants.dequantize takes


def shown(text):
    """A string from the file as it can appear in a one-line message: unprintable characters escaped."""
    return text if text.isprintable() else ascii(text)[1:-1]


def import_gguf(path):
    try:
        import gguf
        import gguf.quants  # noqa: F401
    except ImportError:
        raise CheckpointError(path, None, "reading GGUF files needs the 'gguf' package, which is not installed; "
                                          "install it with: pip install 'mpitp[gguf]'.") from None
    return gguf


class _Walk:
    """A cursor over the file's bytes that fails, naming what it was reading, instead of reading past the end."""

    def __init__(self, path, buf):
        self.path, self.buf, self.pos = path, buf, 0

    def fail(self, reason, tensor=None):
        raise CheckpointError(self.path, tensor, reason)

    def take(self, n, what):
        if n > len(self.buf) - self.pos:
            self.fail(f"the file ends inside {what} (it needs {n} bytes at byte {self.pos} of {len(self.buf)}); "
                      "it is truncated or not a GGUF file.")
        self.pos += n
        return self.pos - n

    def scalar(self, code, what):
        return struct.unpack_from(code, self.buf, self.take(struct.calcsize(code), what))[0]

    def string(self, what):
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8.")

    def value(self, vtype, what, in_array=False):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY or in_array:
            self.fail(f"{what} has value type {vtype}, which is not a GGUF value type" if vtype != _ARRAY
                      else f"{what} is an array of arrays, which the converter does not read.")
        etype, n = self.scalar("<I", what), self.scalar("<Q", what)
        if etype in _SCALARS:
            self.take(n * struct.calcsize(_SCALARS[etype]), what)
        elif etype == _STRING:
            if n > (len(self.buf) - self.pos) // 8:
                self.fail(f"{what} claims {n} strings, more than the rest of the file can hold; it is truncated "
                          "or corrupt.")
            for _ in range(n):
                self.string(what)
        else:
            self.value(etype, what, in_array=True)  # fails: an unknown type or a nested array

    def contents(self, vtype, pos):
        """The value of type ``vtype`` at byte ``pos`` (checked by ``value`` already): ``(types, value)``, the
        types as GGUF names them (["ARRAY", element type], or ["ARRAY"] for an empty array), an array as a list."""
        self.pos = pos
        if vtype != _ARRAY:
            return [_TYPE_NAMES[vtype]], self.value(vtype, "a metadata value")
        etype, n = self.scalar("<I", "an array"), self.scalar("<Q", "an array")
        types = ["ARRAY", _TYPE_NAMES[etype]][:1 + (n > 0)]
        if etype == _STRING:
            return types, [self.string("an array") for _ in range(n)]
        return types, np.frombuffer(self.buf, np.dtype(_SCALARS[etype]), n, self.pos).tolist()


def check_structure(path, gguf):
    """Map the GGUF file ``path`` and walk its header. Returns ``(buf, data_start, fields, infos)``: the file
    mapped read-only, where its tensor data starts, ``{metadata key: (value type, position of the value)}`` and
    ``{tensor: (type name, dims, offset, bytes)}``, when every count, length, type and offset fits the file and
    every data byte is accounted for; raises ``CheckpointError`` naming the first that does not."""
    try:
        with os.fdopen(open_regular(path, CheckpointError), "rb") as f:  # not a FIFO: that would hang
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise CheckpointError(path, None, f"file is {size} bytes, too short for a GGUF header (24 bytes).")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid once the descriptor is closed
    except OSError as e:
        raise CheckpointError(path, None, f"cannot be read ({e.strerror or e}).") from None
    try:
        return (buf, *_walk(_Walk(path, buf), size, gguf))
    except BaseException:
        buf.close()
        raise


def _walk(w, size, gguf):
    if w.buf[:4] != b"GGUF":
        w.fail(f"starts with {w.buf[:4]!r}, not the GGUF magic b'GGUF'; it is not a GGUF file.")
    w.pos = 4
    version = w.scalar("<I", "the version")
    if version not in (2, 3):
        w.fail("it is a big-endian GGUF file, which the converter does not read." if version & 0xFFFF == 0 else
               f"GGUF version {version} is not supported; supported: 2 and 3.")
    n_tensors, n_kv = w.scalar("<Q", "the tensor count"), w.scalar("<Q", "the key/value count")
    for n, what, least in ((n_kv, "metadata entries", 13), (n_tensors, "tensors", 32)):
        if n > (size - w.pos) // least:  # the smallest entry: key length, one-byte key and type, one-byte value
            w.fail(f"the header claims {n} {what}, more than the {size}-byte file can hold; it is corrupt.")
    fields, alignment = {}, 32
    for _ in range(n_kv):
        key = w.string("a metadata key")
        if key in fields:
            w.fail(f"metadata key '{shown(key)}' appears twice.")
        vtype = w.scalar("<I", f"metadata '{shown(key)}'")
        fields[key] = (vtype, w.pos)
        value = w.value(vtype, f"metadata '{shown(key)}'")
        if key == "general.alignment":
            if vtype != 4 or value == 0 or value & (value - 1):
                w.fail(f"metadata 'general.alignment' must be a UINT32 power of two, got {value!r}.")
            alignment = value
    infos = {}
    for _ in range(n_tensors):
        name, info = _tensor_info(w, gguf)
        if name in infos:
            w.fail("the tensor name appears twice.", shown(name))
        infos[name] = info
    data_start = w.pos + (-w.pos) % alignment
    _check_data(w, data_start, alignment, infos)
    return data_start, fields, infos


def _tensor_info(w, gguf):
    """The next tensor info: ``(name, (type name, dims, offset, bytes))``, its size from the type table."""
    name = w.string("a tensor name")
    what = f"tensor '{shown(name)}'"
    n_dims = w.scalar("<I", what)
    if not 1 <= n_dims <= 4:
        w.fail(f"it has {n_dims} dimensions; GGUF tensors have 1 to 4.", shown(name))
    dims = tuple(w.scalar("<Q", what) for _ in range(n_dims))
    type_id, offset = w.scalar("<I", what), w.scalar("<Q", what)
    kind = {int(t): t.name for t in gguf.GGMLQuantizationType}.get(type_id)
    if kind is None or gguf.GGMLQuantizationType[kind] not in gguf.GGML_QUANT_SIZES:
        w.fail(f"tensor type id {type_id} is not a GGML tensor type.", shown(name))
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    if min(dims) < 1 or dims[0] % block:
        w.fail(f"dimensions {list(dims)} are not valid for {kind} (each at least 1, the first a multiple of "
               f"{block}).", shown(name))
    return name, (kind, dims, offset, math.prod(dims) // block * type_size)


def _check_data(w, data_start, alignment, infos):
    """Every byte from the end of the tensor infos on is accounted for, as in a safetensors file: no two tensors
    overlap, and sorted by offset each starts where the previous one ended rounded up to the alignment, the
    file ending at the last one's end (or that rounded up); the bytes between are padding, which the GGUF
    specification says is 0x00. So a shifted data start, an offset pointing into another tensor's data or with
    a flipped bit, or a type whose size no longer matches the bytes written (F32 declared F16) is refused here,
    naming the tensor, instead of converting into a wrong model."""
    size = len(w.buf)
    spans = sorted(((offset, offset + n_bytes, name, kind, dims) for name, (kind, dims, offset, n_bytes)
                    in infos.items()))
    for offset, end, name, *_ in spans:  # first the faults of one tensor, then of two: a hole is their effect
        if offset % alignment:
            w.fail(f"its data offset {offset} is not a multiple of the alignment {alignment}.", shown(name))
        if data_start + end > size:
            w.fail(f"its data (bytes {data_start + offset} to {data_start + end}) runs past the end of the "
                   f"{size}-byte file; the file is truncated.", shown(name))
    for (_, end, name, *_), (offset, _, other, *_) in zip(spans, spans[1:]):
        if offset < end:
            w.fail(f"its data (from offset {offset}) overlaps tensor '{shown(name)}''s, which ends at offset {end}; "
                   "the file is corrupt.", shown(other))
    _check_padding(w, w.pos, data_start, None, "between the tensor infos and the data")
    cursor, previous = 0, None
    for offset, end, name, kind, dims in spans:
        if offset != cursor + (-cursor) % alignment:
            after = "the start of the data" if previous is None else f"tensor '{shown(previous[0])}' ({previous[1]} " \
                f"{list(previous[2])}, {previous[3]} bytes)"
            w.fail(f"its data starts at offset {offset}, leaving {offset - cursor} bytes unaccounted for after "
                   f"{after}; one of them has a wrong offset, type or shape.", shown(name))
        _check_padding(w, data_start + cursor, data_start + offset, name, "before its data")
        cursor, previous = end, (name, kind, dims, end - offset)
    end = data_start + cursor if spans else w.pos  # without tensors the file may end with the infos
    if size > end + (-end) % alignment:
        w.fail(f"the tensors' data ends at byte {end} but the file has {size} bytes, and the rest is unaccounted "
               f"for; the file is corrupt (is the tensor count, {len(spans)}, right?).")
    _check_padding(w, end, size, None, "after the last tensor's data")


def _check_padding(w, start, stop, tensor, where):
    if any(w.buf[start:stop]):
        w.fail(f"bytes {start} to {stop} ({where}) are alignment padding but are not all 0x00; the file is "
               "corrupt (" + ("is the tensor count right?" if tensor is None else "is the previous tensor's type "
                              "or shape right?") + ").", shown(tensor) if tensor else None)


class GGUFFile:
    """A GGUF file whose structure has been checked: typed metadata, tensor shapes, dequantized tensors."""

    def __init__(self, path):
        self.path = str(path)
        gguf = import_gguf(self.path)
        self._buf, self.data_start, self._fields, infos = check_structure(self.path, gguf)
        self.infos = {name: info[:3] for name, info in infos.items()}  # (type name, GGUF dims, offset)
        self._tensors = {name: _Tensor(np.frombuffer(self._buf, np.uint8, n_bytes, self.data_start + offset),
                                       gguf.GGMLQuantizationType[kind])  # the file's bytes, not copied
                         for name, (kind, _, offset, n_bytes) in infos.items()}
        for name, (kind, _, _) in self.infos.items():
            if kind not in SUPPORTED_TYPES:
                raise CheckpointError(self.path, shown(name), f"tensor type {kind} is not supported by mpitp.convert; "
                                                       f"supported: {', '.join(SUPPORTED_TYPES)}.")

    def get(self, key, kind, default=REQUIRED):
        """Metadata ``key`` as ``kind`` ("int", "float", "str", "bool", "strs" or "ints"); ``default`` if
        absent, a ``CheckpointError`` if required and absent or of another type."""
        if key not in self._fields:
            if default is REQUIRED:
                raise CheckpointError(self.path, None, f"metadata key '{key}' is missing.")
            return default
        types, value = _Walk(self.path, self._buf).contents(*self._fields[key])
        scalar = types[0] if len(types) == 1 else None
        ok = {"int": scalar in _INTS, "float": scalar in _INTS + ("FLOAT32", "FLOAT64"), "str": scalar == "STRING",
              "bool": scalar == "BOOL", "strs": types in (["ARRAY"], ["ARRAY", "STRING"]),
              "ints": types == ["ARRAY"] or types[0] == "ARRAY" and types[-1] in _INTS}[kind]
        if not ok:
            want = {"int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean",
                    "strs": "an array of strings", "ints": "an array of integers"}[kind]
            raise CheckpointError(self.path, None, f"metadata '{key}' must be {want}, got {'/'.join(types)}.")
        if kind == "float" and scalar == "FLOAT32":  # the shortest decimal that is this float32: 1e-05, not 9.99e-06
            value = float(str(np.float32(value)))
        return [] if kind in ("strs", "ints") and types == ["ARRAY"] else value

    def shape(self, name):
        """The tensor's shape in NumPy (row-major) order: GGUF's dimensions reversed."""
        return self.infos[name][1][::-1]

    def read(self, name):
        """The tensor dequantized to float32, in NumPy order (a GGUF matrix [in, out] is [out, in] here)."""
        data = np.ascontiguousarray(self._tensors[name].data)  # the file's bytes (a view of the mapped file)
        return dequantize(data.view(np.uint8).reshape(-1), self.infos[name][0]).reshape(self.shape(name))
