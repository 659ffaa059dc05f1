"""Checkpoint reading: safetensors files, validated strictly, read one slice at a time.

One ``model.safetensors``, or the files ``model.safetensors.index.json`` names. Headers are checked as strictly
as the reference library checks them, so a hostile or truncated file raises ``CheckpointError`` before anything
is allocated. A rank reads its slices with positioned reads of just their bytes (a memory map would keep every
touched page resident), through the descriptor its header was read from, and refuses NaN and inf as it reads.
Pickle formats (``*.bin``, ``*.pt``) are refused: loading them can run arbitrary code.
"""

import json
import math
import os
import weakref

import numpy as np

from .errors import CheckpointError, open_regular, read_regular

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's cap
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CHUNK_BYTES = 1 << 20  # reads that cannot go straight into their destination go through chunks of this size

# safetensors dtype -> bytes per element. Any of these may appear in a header.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
             "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
# The dtypes a weight may have, and how their bytes are viewed (BF16 is viewed as uint16, then widened).
_FLOAT_VIEW = {"F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class SafetensorsFile:
    """One safetensors file at ``path``, opened once: its header is read and validated here, and every tensor
    is read on request through the same descriptor, so a file replaced on disk meanwhile cannot mix into what was
    read; one changed in place (its size or modification time moved) is refused. ``close()`` closes it."""

    def __init__(self, path):
        self.path = str(path)
        self.fd = open_regular(self.path, CheckpointError)
        self.close = weakref.finalize(self, os.close, self.fd)  # close(): at once, and only once
        st = os.fstat(self.fd)
        file_size, self._identity = st.st_size, (st.st_size, st.st_mtime_ns)  # what a change would move
        if file_size < 8:
            self._fail(None, f"file is {file_size} bytes, too short for a safetensors header (at least 8 bytes).")
        n = int.from_bytes(self._pread(bytearray(8), 0, None), "little")
        if n > MAX_HEADER_BYTES:
            self._fail(None, f"header length {n} is above the {MAX_HEADER_BYTES}-byte cap; the file is not a valid "
                             "safetensors file.")
        if 8 + n > file_size:
            self._fail(None, f"header length {n} runs past the end of the {file_size}-byte file; the file is "
                             "truncated or not safetensors.")
        raw_header = self._pread(bytearray(n), 8, None)
        self.data_offset = 8 + n
        self.data_len = file_size - self.data_offset
        self.metadata, self.entries = self._parse_header(raw_header)

    def _check_unchanged(self):
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns) != self._identity:
            self._fail(None, "the file changed (its size or modification time) while it was being read; load it "
                             "again once nothing writes to it.")

    def _fail(self, tensor, reason):
        raise CheckpointError(self.path, tensor, reason)

    def _parse_header(self, raw):
        def no_duplicates(pairs):
            if len(dict(pairs)) != len(pairs):
                self._fail(None, "header repeats a key.")
            return dict(pairs)

        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or an integer of > 4300 digits
            self._fail(None, f"header is not valid UTF-8 JSON ({type(e).__name__}).")
        if not isinstance(header, dict):
            self._fail(None, f"header must be a JSON object, got {type(header).__name__}.")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            self._fail(None, "'__metadata__' must map strings to strings.")
        entries = {}
        for name, info in header.items():
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                self._fail(name, "entry must be an object with exactly 'dtype', 'shape' and 'data_offsets'.")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
                self._fail(name, f"dtype {dtype!r} is unknown; safetensors dtypes are {', '.join(_ITEMSIZE)}.")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                self._fail(name, f"shape {shape!r} must be a list of non-negative integers.")
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
                self._fail(name, f"data_offsets {offsets!r} must be two integers [begin, end].")
            begin, end = offsets
            if not 0 <= begin <= end <= self.data_len:
                self._fail(name, f"data_offsets [{begin}, {end}] lie outside the {self.data_len} data bytes.")
            nbytes = math.prod(shape) * _ITEMSIZE[dtype]  # Python ints: no overflow
            if nbytes != end - begin:
                self._fail(name, f"shape {shape} of {dtype} needs {nbytes} bytes but data_offsets span {end - begin}.")
            entries[name] = (dtype, tuple(shape), begin, end)
        # Tensors must tile the data exactly: sorted by offset, each starts where the previous ended.
        cursor = 0
        for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin != cursor:
                what = "overlaps the previous tensor" if begin < cursor else "leaves a hole before it"
                self._fail(name, f"data_offsets start at {begin} where {cursor} was expected: the tensor {what}.")
            cursor = end
        if cursor != self.data_len:
            self._fail(None, f"tensors cover {cursor} of the {self.data_len} data bytes; the rest is unaccounted for.")
        return metadata, entries

    def read(self, name, dtype, index=()):
        """Read ``tensor[index]`` as a new C-contiguous array of ``dtype``, reading only those bytes."""
        index = self._block(name, index)
        out = np.empty(tuple(s.stop - s.start for s in index), dtype=dtype)
        self.read_into(name, out, index)
        return out

    def _block(self, name, index):
        # ``index`` as one unit-step slice per axis, with ``None`` bounds filled in: [slice(start, stop), ...]
        shape = self.entries[name][1]
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if (len(index) != len(shape) or len(shape) > 2 and any(s != slice(None) for s in index)
                or any(not isinstance(s, slice) or s.step not in (None, 1) for s in index)):
            self._fail(name, f"cannot read the block {index} of a tensor of shape {list(shape)}.")
        return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))

    def read_into(self, name, out, index=(), transpose=False, chunk=None):
        """Read ``tensor[index]`` (of a 1-D or 2-D tensor), transposed if asked, into the array ``out``: straight
        into it when its layout and dtype allow, else through ``chunk`` (a reused byte buffer of ``CHUNK_BYTES``),
        so memory use is ``out`` itself. Each chunk is checked for NaN and inf as it is read."""
        code, shape, begin, _ = self.entries[name]
        if not self.close.alive:  # its descriptor's number may belong to another file by now
            raise ValueError(f"{self.path} is closed")
        if code not in _FLOAT_VIEW:
            self._fail(name, f"dtype {code} is not a floating-point weight dtype; supported: {', '.join(_FLOAT_VIEW)}.")
        raw = _FLOAT_VIEW[code]
        index = self._block(name, index)
        block = tuple(s.stop - s.start for s in index)
        if tuple(out.shape) != (block[::-1] if transpose else block):
            raise ValueError(f"{name}: destination shape {out.shape} does not match the block {block}")
        # A 2-D view: rows r0:r1 and columns c0:c1 of a [n_rows, n_cols] tensor; a tensor of another rank (only
        # ever read whole, or a vector's range) is one row.
        n_cols = shape[1] if len(shape) == 2 else math.prod(shape)
        rows, cols = index if len(shape) == 2 else (slice(0, 1), index[0] if len(shape) == 1 else slice(0, n_cols))
        (r0, r1), (c0, c1) = (rows.start, rows.stop), (cols.start, cols.stop)
        out2 = out.reshape(r1 - r0, c1 - c0) if not transpose else out
        direct = not transpose and out.dtype == raw and out.flags.c_contiguous
        if chunk is None:
            chunk = np.empty(CHUNK_BYTES, np.uint8)
        rows_per_chunk = max(1, len(chunk) // max(1, (c1 - c0) * raw.itemsize))
        for r in range(r0, r1, rows_per_chunk):
            n = min(r1, r + rows_per_chunk) - r
            dest = out2[r - r0:r - r0 + n] if direct else _view(chunk, (n, c1 - c0), raw)
            for k in range(1 if c1 - c0 == n_cols else n):  # whole rows are one contiguous range
                offset = self.data_offset + begin + ((r + k) * n_cols + c0) * raw.itemsize
                self._pread(dest if c1 - c0 == n_cols else dest[k], offset, name)
            values = (dest.astype(np.uint32) << 16).view(np.float32) if code == "BF16" else dest  # exact
            if values.dtype.itemsize > out.dtype.itemsize:  # float64 into float32: what is too large becomes inf
                with np.errstate(over="ignore"):
                    values = values.astype(out.dtype)
            if not _all_finite(values):
                self._check_unchanged()  # NaN from a file being rewritten is said as that
                self._fail(name, "has values that are not finite (NaN or inf); the file is damaged, or the model "
                                 "diverged in training.")
            if transpose:
                out2[:, r - r0:r - r0 + n] = values.T
            elif not direct:
                out2[r - r0:r - r0 + n] = values
        self._check_unchanged()

    def _pread(self, dest, offset, name):
        # Fill the buffer ``dest`` with the file's bytes from ``offset`` on; return it.
        view = memoryview(dest).cast("B")
        while len(view):
            try:
                n = os.preadv(self.fd, [view], offset)
            except OSError as e:
                self._fail(name, f"read failed ({e.strerror or e}).")
            if n == 0:
                self._check_unchanged()
                self._fail(name, "the file ended before the tensor's data; it was truncated or changed while reading.")
            view, offset = view[n:], offset + n
        return dest


def _all_finite(a):
    # No NaN or inf in ``a``, in one fast pass: the dot product a.a is finite when every value is (if it is not,
    # or it overflowed, isfinite decides). float16 has no fast dot: its NaN and inf have all exponent bits set.
    if a.dtype == np.float16:
        return not ((a.view(np.uint16) & 0x7C00) == 0x7C00).any()
    flat = a.reshape(-1)
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.dot(flat, flat)) or np.isfinite(a).all())


def _view(buffer, shape, dtype):
    # An uninitialised array of ``shape`` in the reused byte ``buffer`` (a fresh one if it does not fit).
    n = int(np.prod(shape)) * dtype.itemsize
    return buffer[:n].view(dtype).reshape(shape) if n <= len(buffer) else np.empty(shape, dtype)


class Checkpoint:
    """The safetensors files of a Hugging Face model folder (``model.safetensors``, or the files that
    ``model.safetensors.index.json`` names), with a tensor name -> file map. Each file is opened once, and
    ``close()`` closes them all."""

    def __init__(self, model_dir):
        self.model_dir = str(model_dir)
        self._files, self._where = {}, {}
        self._chunk = np.empty(CHUNK_BYTES, np.uint8)  # one chunk buffer for every read of this checkpoint
        index_path = os.path.join(self.model_dir, INDEX_NAME)
        single_path = os.path.join(self.model_dir, SINGLE_NAME)
        if os.path.exists(index_path):
            for name, file_name in self._read_index(index_path).items():
                f = self._shard(file_name)
                if name not in f.entries:
                    raise CheckpointError(f.path, name, f"{INDEX_NAME} places the tensor in this file but it "
                                                        "is not there.")
                self._where[name] = f
        elif os.path.exists(single_path):
            f = self._files[SINGLE_NAME] = SafetensorsFile(single_path)
            self._where = dict.fromkeys(f.entries, f)
        else:
            pickles = sorted(f for f in os.listdir(self.model_dir) if f.endswith(_PICKLE_SUFFIXES))
            if pickles:
                raise CheckpointError(os.path.join(self.model_dir, pickles[0]), None,
                                      "pickle checkpoints are refused because loading them can run arbitrary "
                                      "code; convert the model to safetensors (e.g. in transformers: "
                                      "model.save_pretrained(dir, safe_serialization=True)).")
            raise CheckpointError(self.model_dir, None, f"no {SINGLE_NAME} or {INDEX_NAME} in this folder.")

    def _read_index(self, path):
        try:
            index = json.loads(read_regular(path, CheckpointError))
        except (ValueError, RecursionError) as e:
            raise CheckpointError(path, None, f"not readable as JSON ({type(e).__name__}).") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(path, None, "'weight_map' must be an object mapping tensor names to file names.")
        return weight_map

    def _shard(self, file_name):
        # The file that the index names ``file_name``, opened once. The name must stay inside the folder as
        # written: no absolute path, no "..". (The file itself may be a symbolic link, as every file of a Hugging
        # Face cache snapshot is.) A name with a NUL byte names no file: it is not found.
        if file_name not in self._files:
            parts = file_name.replace("\\", "/").split("/")
            if os.path.isabs(file_name) or ".." in parts or all(p in ("", ".") for p in parts):
                raise CheckpointError(os.path.join(self.model_dir, INDEX_NAME), None,
                                      f"shard file {file_name!r} lies outside the model folder; shard files must be "
                                      "plain names inside it.")
            path = os.path.join(self.model_dir, file_name)
            if not os.path.exists(path):
                raise CheckpointError(path, None, f"shard file not found (named in {INDEX_NAME}).")
            self._files[file_name] = SafetensorsFile(path)
        return self._files[file_name]

    def close(self):
        """Close every file (reading a tensor afterwards is an error)."""
        for f in self._files.values():
            f.close()

    def __contains__(self, name):
        return name in self._where

    def names(self):
        return list(self._where)

    def path_of(self, name):
        return self._where[name].path

    def shape(self, name):
        return self._where[name].entries[name][1]

    def dtype(self, name):
        return self._where[name].entries[name][0]  # as the header says: "F32", "BF16", ...

    def read(self, name, dtype, index=()):
        return self._where[name].read(name, dtype, index)

    def read_into(self, name, out, index=(), transpose=False):
        self._where[name].read_into(name, out, index, transpose, self._chunk)
