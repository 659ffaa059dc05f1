"""GGUF files for ``mpitp.convert``: the structure checked against the file's size, then read with ``gguf``.

GGUF is llama.cpp's single-file format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md). In order,
little-endian: the magic ``GGUF``; the version (u32, 2 or 3); the tensor count and the key/value count (u64);
the key/value pairs (a string key, a u32 value type, the value; a string is a u64 length and UTF-8 bytes, an
array a u32 element type, a u64 count and the elements); the tensor infos (name, u32 number of dimensions,
u64 dimensions with the fastest-varying first, u32 ggml type, u64 offset into the data); padding to
``general.alignment`` (default 32); the tensor data.

The ``gguf`` package (llama.cpp's own NumPy reader, the ``gguf`` extra) parses the file and dequantizes, but
it trusts what it reads: a corrupt count makes it loop for a very long time, a bad offset or type makes it
raise whatever NumPy raises. So ``check_structure`` first walks the header, checking every count, length,
type and offset against the file's size, and only a file that passes goes to ``gguf.GGUFReader``.
"""

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
_INTS = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")
SUPPORTED_TYPES = tuple(TYPES)  # the tensor types the converter reads (gguf_quants dequantizes them)
REQUIRED = object()


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


def check_structure(path, gguf):
    """Walk the header of the GGUF file ``path``. Returns ``(data_start, {tensor: (type name, dims, offset)})``
    when every count, length, type and offset fits the file; raises ``CheckpointError`` naming the first that
    does not."""
    try:
        with os.fdopen(open_regular(path, CheckpointError), "rb") as f:  # not a FIFO: that would hang
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise CheckpointError(path, None, f"file is {size} bytes, too short for a GGUF header (24 bytes).")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(_Walk(path, buf), size, gguf)
    except OSError as e:
        raise CheckpointError(path, None, f"cannot be read ({e.strerror or e}).") from None


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
    keys, alignment = set(), 32
    for _ in range(n_kv):
        key = w.string("a metadata key")
        if key in keys:
            w.fail(f"metadata key '{shown(key)}' appears twice.")
        keys.add(key)
        vtype = w.scalar("<I", f"metadata '{shown(key)}'")
        value = w.value(vtype, f"metadata '{shown(key)}'")
        if key == "general.alignment":
            if vtype != 4 or value == 0 or value & (value - 1):
                w.fail(f"metadata 'general.alignment' must be a UINT32 power of two, got {value!r}.")
            alignment = value
    types = {int(t): t.name for t in gguf.GGMLQuantizationType}
    infos = {}
    for _ in range(n_tensors):
        name = w.string("a tensor name")
        what = f"tensor '{shown(name)}'"
        n_dims = w.scalar("<I", what)
        if not 1 <= n_dims <= 4:
            w.fail(f"it has {n_dims} dimensions; GGUF tensors have 1 to 4.", shown(name))
        dims = tuple(w.scalar("<Q", what) for _ in range(n_dims))
        type_id, offset = w.scalar("<I", what), w.scalar("<Q", what)
        if name in infos:
            w.fail("the tensor name appears twice.", shown(name))
        kind = types.get(type_id)
        if kind is None or gguf.GGMLQuantizationType[kind] not in gguf.GGML_QUANT_SIZES:
            w.fail(f"tensor type id {type_id} is not a GGML tensor type.", shown(name))
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        if min(dims) < 1 or dims[0] % block:
            w.fail(f"dimensions {list(dims)} are not valid for {kind} (each at least 1, the first a multiple of "
                   f"{block}).", shown(name))
        infos[name] = (kind, dims, offset, math.prod(dims) // block * type_size)
    data_start = w.pos + (-w.pos) % alignment
    for name, (kind, dims, offset, n_bytes) in infos.items():
        if offset % alignment:
            w.fail(f"its data offset {offset} is not a multiple of the alignment {alignment}.", shown(name))
        if data_start + offset + n_bytes > size:
            w.fail(f"its data (bytes {data_start + offset} to {data_start + offset + n_bytes}) runs past the end of "
                   f"the {size}-byte file; the file is truncated.", shown(name))
    return data_start, {name: info[:3] for name, info in infos.items()}


class GGUFFile:
    """A GGUF file whose structure has been checked: typed metadata, tensor shapes, dequantized tensors."""

    def __init__(self, path):
        self.path = str(path)
        gguf = import_gguf(self.path)
        self.data_start, self.infos = check_structure(self.path, gguf)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # noqa: BLE001 -- check_structure passed: a disagreement between the two readers
            raise CheckpointError(self.path, None, f"the gguf package cannot read it ({type(e).__name__}: {e})."
                                  ) from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        for name, (kind, _, _) in self.infos.items():
            if kind not in SUPPORTED_TYPES:
                raise CheckpointError(self.path, shown(name), f"tensor type {kind} is not supported by mpitp.convert; "
                                                       f"supported: {', '.join(SUPPORTED_TYPES)}.")

    def get(self, key, kind, default=REQUIRED):
        """Metadata ``key`` as ``kind`` ("int", "float", "str", "bool", "strs" or "ints"); ``default`` if
        absent, a ``CheckpointError`` if required and absent or of another type."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is REQUIRED:
                raise CheckpointError(self.path, None, f"metadata key '{key}' is missing.")
            return default
        types = [t.name for t in field.types]
        scalar = types[0] if len(types) == 1 else None
        ok = {"int": scalar in _INTS, "float": scalar in _INTS + ("FLOAT32", "FLOAT64"), "str": scalar == "STRING",
              "bool": scalar == "BOOL", "strs": types in (["ARRAY"], ["ARRAY", "STRING"]),
              "ints": types == ["ARRAY"] or types[0] == "ARRAY" and types[-1] in _INTS}[kind]
        if not ok:
            want = {"int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean",
                    "strs": "an array of strings", "ints": "an array of integers"}[kind]
            raise CheckpointError(self.path, None, f"metadata '{key}' must be {want}, got {'/'.join(types)}.")
        value = field.contents()
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
