"""The KL-divergence base file: a run's log-probabilities of the whole vocabulary at every scored position.

Layout (docs/perplexity.md): the 8 bytes ``MPITPKLD``, the format version and the length of a JSON header as
little-endian uint32, the JSON header (the model's fingerprint, a digest of the chunks' token ids, ctx, chunks,
vocabulary, dtype), zeros up to a multiple of 64 bytes, then ``[n_chunks * n_scored, n_vocab]`` little-endian
values, row-major. Each rank writes and reads only its own columns, so a base written on P ranks serves a run
on any number; a file of another model, text, ctx or vocabulary, or a truncated one, is refused before any work.
"""

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import FileError, RequestError, open_regular

MAGIC, VERSION, ALIGN = b"MPITPKLD", 1, 64
PREFIX = struct.Struct("<8sII")  # magic, version, header length
DTYPES = ("float32", "float64")


def tokens_digest(chunks):
    """A short digest of the chunks' token ids ``[n_chunks, n_ctx]``: the text as scored (tokenizer included)."""
    return hashlib.sha256(np.ascontiguousarray(chunks, dtype="<i8").tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class BaseInfo:
    """What a base file was computed from; a run must match every field but ``dtype`` to compare with it."""

    model: str  # Model.fingerprint
    tokens: str  # tokens_digest of the chunks
    ctx: int
    n_chunks: int
    n_vocab: int
    dtype: str  # of the stored log-probabilities: the base run's compute dtype

    n_scored = property(lambda self: self.ctx - 1 - self.ctx // 2)  # positions scored per chunk
    n_rows = property(lambda self: self.n_chunks * self.n_scored)

    def header(self):
        text = json.dumps({"format": "mpitp KL-divergence base", **asdict(self), "n_scored": self.n_scored}).encode()
        prefix = PREFIX.pack(MAGIC, VERSION, len(text)) + text
        return prefix + bytes(-len(prefix) % ALIGN)

    def nbytes(self):
        return len(self.header()) + self.n_rows * self.n_vocab * np.dtype(self.dtype).itemsize


WHAT = {"model": "model", "ctx": "--ctx", "n_chunks": "number of chunks", "n_vocab": "vocabulary size",
        "tokens": "text (the digest of its chunks' token ids)"}


def read_info(path, expected):
    """The ``BaseInfo`` of the base file ``path``, after checking that it is whole and was computed from what
    ``expected`` (this run's ``BaseInfo``) describes; ``FileError`` or ``RequestError`` saying what differs."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        start = f.read(PREFIX.size + (1 << 16))
        size = os.fstat(fd).st_size
    if len(start) < PREFIX.size or start[:8] != MAGIC:
        raise FileError(path, "not an mpitp KL-divergence base (write one with --kl-divergence-base).")
    _, version, length = PREFIX.unpack_from(start)
    if version != VERSION:
        raise FileError(path, f"a KL-divergence base of format version {version}; this mpitp reads version "
                              f"{VERSION}: write it again with --kl-divergence-base.")
    try:
        fields = json.loads(start[PREFIX.size:PREFIX.size + length])
        info = BaseInfo(**{k: fields[k] for k in BaseInfo.__dataclass_fields__})
    except (ValueError, KeyError, TypeError):
        raise FileError(path, "the header of this KL-divergence base is damaged.") from None
    if info.dtype not in DTYPES:
        raise FileError(path, f"the header's dtype {info.dtype!r} is not one of {', '.join(DTYPES)}.")
    for field, what in WHAT.items():
        theirs, ours = getattr(info, field), getattr(expected, field)
        if theirs != ours:
            raise RequestError(f"{path} was computed with another {what}: {theirs} where this run has {ours}; "
                               "compare a base with a run of the same model, text, --ctx and --chunks.")
    if size != info.nbytes():
        raise FileError(path, f"truncated or damaged: {size} bytes where its header promises {info.nbytes()}.")
    return info


class BaseReader:
    """This rank's columns of a base file's rows: ``reader(chunks)`` -> ``[len(chunks), n_scored, n_local]``."""

    def __init__(self, path, info, cols):
        self.info, self.cols = info, cols
        self.rows = np.memmap(path, dtype=np.dtype(info.dtype).newbyteorder("<"), mode="r",
                              offset=len(info.header()), shape=(info.n_rows, info.n_vocab))

    def __call__(self, chunks):
        n = self.info.n_scored
        part = self.rows[chunks.start * n:chunks.stop * n, self.cols]
        return np.array(part, dtype=np.float64).reshape(len(chunks), n, -1)


class BaseWriter:
    """Each rank writes its columns into ``path + ".partial"``, which rank 0 created at its full size
    (``create``); ``finish`` on rank 0 renames it to ``path`` once every rank is done."""

    def __init__(self, path, info, cols):
        self.path, self.partial, self.info, self.cols = path, path + ".partial", info, cols
        self.offset = len(info.header())
        try:
            self.fd = os.open(self.partial, os.O_WRONLY)
        except OSError as e:
            raise FileError(self.partial, f"cannot be opened by every rank ({e.strerror}); --kl-divergence-base "
                                          "needs a folder that every rank sees.") from None

    @staticmethod
    def create(path, info):
        partial = path + ".partial"
        try:
            with open(partial, "wb") as f:
                f.write(info.header())
                if hasattr(os, "posix_fallocate"):  # a disk that is too small fails now, not at the end
                    os.posix_fallocate(f.fileno(), 0, info.nbytes())
                f.truncate(info.nbytes())
        except OSError as e:
            BaseWriter.discard(path)
            raise FileError(partial, f"cannot be written ({e.strerror}); the base needs {info.nbytes()} bytes.") \
                from None

    @staticmethod
    def discard(path):
        if os.path.exists(path + ".partial"):
            os.remove(path + ".partial")

    def write(self, chunks, log_probs):
        """Write this rank's columns ``[len(chunks), n_scored, n_local]`` of the rows of ``chunks``."""
        itemsize, n_vocab = np.dtype(self.info.dtype).itemsize, self.info.n_vocab
        rows = np.ascontiguousarray(log_probs, dtype=np.dtype(self.info.dtype).newbyteorder("<"))
        first = chunks.start * self.info.n_scored
        for i, row in enumerate(rows.reshape(-1, rows.shape[-1])):
            offset = self.offset + ((first + i) * n_vocab + self.cols.start) * itemsize
            if os.pwrite(self.fd, row.tobytes(), offset) != row.nbytes:
                raise FileError(self.partial, "a write was cut short (is the disk full?).")

    def close(self):
        os.fsync(self.fd)
        os.close(self.fd)

    def finish(self):
        os.replace(self.partial, self.path)
