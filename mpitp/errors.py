"""The exception types mpitp raises for bad input.

Every error a user can cause is an ``MpitpError`` whose message is one sentence naming the file, tensor or
value and what would be valid. Entry points print it on one line; anything else is a bug and aborts.
"""


class MpitpError(Exception):
    """Base class for errors caused by the user's input (as opposed to bugs)."""


class ConfigError(MpitpError):
    """config.json is missing, malformed, or describes a model mpitp does not support."""


class ShardingError(MpitpError):
    """The model cannot be split over the requested number of ranks."""


class CheckpointError(MpitpError):
    """A checkpoint file (``path``) or one of its tensors (``tensor``, or None) is missing, malformed, or does
    not match config.json; ``reason`` says what is wrong and, where it helps, what would be valid."""

    def __init__(self, path, tensor, reason):
        self.path, self.tensor, self.reason = str(path), tensor, reason
        where = f"{self.path}" + (f", tensor '{tensor}'" if tensor else "")
        super().__init__(f"{where}: {reason}")


class RequestError(MpitpError):
    """A generation request cannot be served (prompt too long, bad token id, bad sampling value)."""
