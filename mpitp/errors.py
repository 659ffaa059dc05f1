"""The exception types mpitp raises for bad input, and the one way it opens a user's file.

Every error a user can cause is an ``MpitpError`` whose message is one sentence naming the file, tensor or
value and what would be valid. Entry points print it on one line; anything else is a bug and aborts.
"""

import os
import stat


class MpitpError(Exception):
    """Base class for errors caused by the user's input (as opposed to bugs)."""


class ConfigError(MpitpError):
    """config.json is missing, malformed, or describes a model mpitp does not support."""


class ShardingError(MpitpError):
    """The model cannot be split over the requested number of ranks."""


class FileError(MpitpError):
    """A file (``path``) cannot be read or written: not a regular file, unreadable, changed while it was read,
    or a full disk; ``reason`` says which."""

    def __init__(self, path, reason):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


class CheckpointError(FileError):
    """A checkpoint file (``path``) or one of its tensors (``tensor``, or None) is missing, malformed, or does
    not match config.json."""

    def __init__(self, path, tensor=None, reason=""):
        super().__init__(f"{path}" + (f", tensor '{tensor}'" if tensor else ""), reason)
        self.path, self.tensor = str(path), tensor


class RequestError(MpitpError):
    """A generation request cannot be served (prompt too long, bad token id, bad sampling value)."""


_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # not on Windows, which has no FIFOs in the file system


def open_regular(path, error=FileError):
    """A read-only file descriptor of ``path`` if it is a regular file (or a link to one), else
    ``error(path, reason=...)``. A FIFO would block the open or the read forever, and a directory or a device
    is no model file: the kind is checked before the open, and again on the descriptor in case the path was
    swapped in between (the non-blocking open cannot hang on a FIFO)."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            fd = os.open(path, os.O_RDONLY | _NONBLOCK)
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                if _NONBLOCK:
                    os.set_blocking(fd, True)
                return fd
            os.close(fd)
    except OSError as e:
        raise error(path, reason=f"cannot be opened ({e.strerror or e}).") from None
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device or socket"
    raise error(path, reason=f"not a regular file but {kind}; mpitp reads only regular files (or links to them).")


def read_regular(path, error=FileError):
    """The bytes of the regular file ``path`` (see ``open_regular``); a failed read is ``error`` naming it."""
    with os.fdopen(open_regular(path, error), "rb") as f:
        try:
            return f.read()
        except OSError as e:
            raise error(path, reason=f"read failed ({e.strerror or e}).") from None
