"""What every command-line entry point shares: rank-0-only help, the validation vote, abort on surprises.

Bad input is found on every rank before any collective, and the first collective is a vote on it: the job exits
cleanly (status 2, the message printed once). Anything unexpected on any rank aborts the whole job (status 1;
130 on Ctrl-C) instead of leaving the others waiting in a collective.
"""

import argparse
import os
import signal
import sys
import tempfile
import threading
import traceback

from . import comm as mpi
from .errors import MpitpError


def say(line):
    """One line on stderr in a single write: the launcher merges every rank's stderr, and a line written in
    pieces (print writes the text and the newline separately) can be cut by another rank's line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth showing and the help does not say it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class RankParser(argparse.ArgumentParser):
    """An ArgumentParser that prints help and usage errors on rank 0 only (every rank still exits)."""

    rank = 0

    def _print_message(self, message, file=None):
        if self.rank == 0:
            super()._print_message(message, file)


def failed_vote(comm, error, prog):
    """The first collective: did any rank fail validation? If so print each failure once and return 2 (None
    when every rank is fine). Rank 0 speaks for all when it failed too (deterministic checks fail alike
    everywhere); a rank that failed alone prints its own message with a ``[rank r]`` prefix."""
    failed = comm.allgather(error is not None)
    if not any(failed):
        return None
    rank = comm.Get_rank()
    if error is not None and (rank == 0 or not failed[0]):
        prefix = "" if rank == 0 else f"[rank {rank}] "
        say(f"{prefix}{prog}: error: {error}")
    return 2


class Terminated(BaseException):
    """SIGTERM arrived."""


def _terminated(signum, frame):
    raise Terminated()


def run_guarded(comm, fn, verbose, prog):
    """``fn()``'s exit status; an exception on this rank aborts every rank of the job: status 2 with one line
    for bad input (``MpitpError``, found after the ranks agreed to go on, by this rank alone), 1 for anything
    unexpected."""
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    main = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = signal.signal(signal.SIGTERM, _terminated) if main else None  # Slurm's scancel: like Ctrl-C
    who = f"[rank {rank}] {prog}" if comm is not None else prog
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 -- anything unexpected must take the whole job down
        if isinstance(e, SystemExit) and not e.code:
            raise
        if isinstance(e, MpitpError):  # after the vote, found by this rank alone: it ends the job for all
            say(f"{who if rank else prog}: error: {e}")
            if size > 1:
                mpi.abort(comm, 2)
            return 2
        stopped = {KeyboardInterrupt: ("interrupted", 130), Terminated: ("terminated", 143)}.get(type(e))
        say(f"{who}: {stopped[0] if stopped else f'unexpected error: {type(e).__name__}: {e}'}")
        if verbose:
            traceback.print_exc()
        elif not stopped:
            say(f"{who}: run with --verbose for the traceback.")
        code = stopped[1] if stopped else 1
        if size > 1:
            mpi.abort(comm, code)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def check_writable(path, option, folder=False):
    """Raise ``MpitpError`` unless ``path`` (a file, or with ``folder`` a folder, written at the end of a run)
    can be created or replaced: checked before the work, so that a long run is not lost to a bad destination."""
    target = existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing == target and os.path.isdir(target) != folder:
        raise MpitpError(f"{option} {path}: it exists and is {'not ' if folder else ''}a folder.")
    into = existing if existing != target or folder else os.path.dirname(target)
    try:
        with tempfile.TemporaryFile(dir=into):  # even for root: a read-only file system, /proc, a full quota
            pass
    except OSError as e:
        raise MpitpError(f"{option} {path}: cannot write in {into} ({e.strerror}).") from None
