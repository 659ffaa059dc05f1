"""What every command-line entry point shares: rank-0-only help, the validation vote, abort on surprises.

Bad input is found on every rank before any collective, and the first collective is a vote on it: the job exits
cleanly (status 2, the message printed once). Anything unexpected on any rank aborts the whole job (status 1;
130 on Ctrl-C, 143 on SIGTERM) instead of leaving the others waiting in a collective, and a watchdog thread ends
a rank that cannot act on a signal itself (from before MPI_Init on), or whose launcher is gone. Only MPI ranks
have a watchdog: a serial tool has no collective to hang in and no launcher to race, so its clean-up always runs.
"""

import argparse
import contextlib
import errno
import os
import re
import select
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from .. import comm as mpi
from ..errors import FileError, MpitpError, RequestError
from ..sharding import EXPERT_LAYOUTS
from ..wire import FORMATS


def say(line):
    """One line on stderr in a single write: the launcher merges every rank's stderr, and a line written in
    pieces (print writes the text and the newline separately) can be cut by another rank's line. A stderr that is
    closed (``2>&-``) or full loses the line, never the exit status: the status says what happened."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):  # None, full, or closed: nothing more to write, nor at exit
        sys.stderr = open(os.devnull, "w")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth showing and the help does not say it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_experts_option(p):
    """``--experts``: a mixture of experts' layout over the ranks (docs/moe.md). Returns ``p``."""
    p.add_argument("--experts", choices=EXPERT_LAYOUTS, default=None,
                   help="a mixture of experts' layout: 'tensor' (every rank a slice of every expert) or 'expert' "
                        "(whole experts per rank, rows dispatched to them); default: expert where it divides the "
                        "experts at least as evenly (docs/moe.md)")
    return p


def comma_ints(text):
    """argparse's type for a comma-separated list of non-negative integers (``--prompt-ids``, ``--pp-layers``)."""
    if not re.fullmatch(r"[0-9]{1,18}(,[0-9]{1,18})*", text.replace(" ", "")):  # not "1,,2", "1_0", "١", 10**5000
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (of up to 18 digits) like 15,7,201, "
                                         f"got {text if len(text) < 60 else text[:60] + '...'!r}")
    return [int(t) for t in text.replace(" ", "").split(",")]


def add_pp_layers(p):
    """``--pp-layers``: layers per pipeline stage (``mpitp.stages.stage_layers``). Returns ``p``."""
    p.add_argument("--pp-layers", type=comma_ints, default=None, metavar="N,N,..",
                   help="layers per pipeline stage, e.g. 5,7 (default: near-equal in bytes, the first stage's "
                        "embedding and the last stage's LM head counted); implies --pp of as many stages")
    return p


def stage_count(args):
    """The pipeline stages ``--pp`` and ``--pp-layers`` ask for: ``--pp-layers`` alone gives its count."""
    return len(args.pp_layers) if args.pp_layers and args.pp == 1 else args.pp


def check_threads(threads):
    """``--threads``: None (the default) or at least 1."""
    if threads is not None and threads < 1:
        raise RequestError(f"--threads must be >= 1, got {threads}.")


def add_run_options(p):
    """The options every command that runs a model shares: BLAS threads, quiet, verbose. Returns ``p``."""
    p.add_argument("--threads", type=int, default=None, metavar="N", help="BLAS threads per rank (default: the "
                   "node's cores / its ranks, unless OPENBLAS_NUM_THREADS, OMP_NUM_THREADS or MKL_NUM_THREADS is set)")
    p.add_argument("--quiet", action="store_true", help="print nothing on stderr except errors")
    p.add_argument("--verbose", action="store_true", help="print full tracebacks for errors")
    return p


def add_comm_dtype(p):
    """``--comm-dtype``: the wire format of the block's reductions (``Model.sync_in``). Returns ``p``."""
    p.add_argument("--comm-dtype", choices=sorted(FORMATS), default=None,
                   help="what the block's partial sums cross the wire as, summed in --dtype "
                        "(docs/sync-precision.md); default: --dtype, the plain Allreduce")
    return p


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
        who = f"[rank {rank}] {prog}" if rank else prog
        say(f"{who}: error: {error}")
    return 2


def run_command(build_parser, run, prog, argv=None):
    """A command's entry point on every rank: Ctrl-C is handled from before MPI_Init on (which can block), the ranks
    count their node's ranks and agree on their command lines, then ``run(args, comm, node_ranks)``'s exit status."""

    def start():
        comm = mpi.world()  # made already, under the guard
        node_ranks = mpi.ranks_on_node(comm)  # the first collective: nothing before it can fail on one rank only
        parser = build_parser()
        parser.rank = comm.Get_rank()
        args = agreed_args(parser, comm, argv, prog)
        return args if isinstance(args, int) else run(args, comm, node_ranks)

    return run_guarded(mpi.world, start, "--verbose" in (sys.argv[1:] if argv is None else argv), prog)


def agreed_args(parser, comm, argv, prog):
    """Parse this rank's command line and agree with the others: the arguments, or (on every rank alike) the exit
    status when a rank got ``--help`` or a usage error (printed by rank 0; rank 0 names a rank that differs)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        args = e
    exits = comm.allgather(args.code if isinstance(args, SystemExit) else None)
    if all(code is None for code in exits):
        return args
    if len(set(exits)) == 1:
        return exits[0]
    if comm.Get_rank() == 0:
        r = next(r for r, code in enumerate(exits) if code != exits[0])
        what = {None: "a valid command line", 0: "--help"}  # any other status: a usage error
        say(f"{prog}: error: rank {r} was given {what.get(exits[r], 'a bad command line')} where rank 0 was given "
            f"{what.get(exits[0], 'a bad command line')}; every rank must be given the same arguments.")
    return 2


def disagree(comm, facts, prog):
    """True on every rank if any rank's ``facts`` ((what, value) pairs) differ from rank 0's; rank 0 names the
    first difference."""
    every = comm.allgather(facts)
    for r, theirs in enumerate(every):
        for (what, ours), (_, their) in zip(every[0], theirs):
            if ours != their:
                if comm.Get_rank() == 0:
                    say(f"{prog}: error: rank {r} differs from rank 0 in its {what}: {their} against {ours}; every "
                        "rank must load the same model and be given the same request.")
                return True
    return False


def prepare_and_agree(comm, prepare, agreement, prog):
    """``prepare()``'s result once every rank has it and the ranks agree on ``agreement(result)`` (``disagree``'s
    facts); None on every rank alike when any rank failed (``MpitpError``, told once) or differs."""
    result, error = None, None
    try:
        result = prepare()
    except MpitpError as e:
        error = e
    if failed_vote(comm, error, prog) or disagree(comm, agreement(result), prog):
        return None
    return result


class Terminated(BaseException):
    """SIGTERM (or SIGHUP: a terminal or ssh session that hung up) arrived; ``args[0]`` is the signal."""


class ReaderGone(MpitpError):
    """Whoever read stdout closed it (``| head``): ended quietly, with the status a shell gives a tool that
    SIGPIPE ended (128 + 13), never 0, since the rest of the result was lost."""

    status = 141


STOPS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143), signal.SIGHUP: ("hung up", 129)}
LAUNCHER_VARS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")  # MPICH's Hydra (and Slurm's PMI), PMIx, Open MPI


def launcher_rank():
    """This process's rank as its MPI launcher tells it (known before MPI_Init), or None without a launcher."""
    return next((int(os.environ[v]) for v in LAUNCHER_VARS if os.environ.get(v, "").isdigit()), None)


class Ending:
    """The main thread's handler of SIGINT and SIGTERM: the first raises KeyboardInterrupt or ``Terminated``; a
    repeated signal (a second Ctrl-C, or the same signal from the launcher and the terminal) is ignored, so that
    it cannot cut short the clean-ups the first one started. ``raised`` gives the unwinding ``Watchdog.RAISED``
    seconds to reach the guard, which then sets ``begun`` (``run_guarded``) for ``FINISH`` seconds more: an
    exception raised where Python ignores it (a finaliser) or a ``finally`` that waits in a collective no longer
    keeps the rank alive for ``FINISH``."""

    def __init__(self):
        self.raised = self.begun = False

    def __call__(self, signum, frame):
        if not (self.raised or self.begun):
            self.raised = True
            raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def check_stdout():
    """Raise ``RequestError`` if stdout is closed (``>&-``), where print() would drop the result without a word:
    checked before any work, on the process that prints the result."""
    if sys.stdout is None:
        raise RequestError("stdout is closed, so the result would be lost; send it to a file (> out.txt) instead.")


def out(text, end="\n"):
    """The result on stdout, flushed. A result that cannot be written is an error, never a silent 0: one line and
    status 2 (a full disk, an I/O error), or quietly 141 when the reader closed the pipe (``| head``)."""
    try:
        sys.stdout.write(text + end)
        sys.stdout.flush()
    except OSError as e:
        with contextlib.suppress(OSError):  # what is still buffered goes to /dev/null: Python's own flush at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # would fail again
        if e.errno == errno.EPIPE:
            raise ReaderGone("") from None
        raise FileError("stdout", f"cannot write the result ({e.strerror or e}); it is lost.") from None


LEFT = set()  # files and folders to remove if the watchdog ends the process: see ``removed_if_killed``


@contextlib.contextmanager
def removed_if_killed(path):
    """While the block runs, ``path`` (a temporary file or folder) is removed by the watchdog if it ends the
    process itself, as when the main thread is inside a long C call and never reaches its own clean-up."""
    LEFT.add(path)
    try:
        yield path
    finally:
        LEFT.discard(path)


@contextlib.contextmanager
def removed_on_failure(path):
    """``removed_if_killed``, and the file ``path`` is also removed when the block raises (Ctrl-C, SIGTERM, an
    error): a half-written output never outlives the run that failed to finish it."""
    with removed_if_killed(path):
        try:
            yield path
        except BaseException:
            remove(path)
            raise


class Watchdog:
    """A daemon thread that ends this rank when the main thread cannot act on a signal, or the launcher died.

    Python runs a signal handler only between bytecodes of the main thread, so a rank blocked in a C call (in
    MPI_Init, a collective, or a read that never returns) never reaches it, and a second Ctrl-C then makes MPICH's
    mpiexec exit 0 or 255 by a race. The signal's number still reaches a pipe (``signal.set_wakeup_fd``) that this
    thread watches: when the main thread has not begun to handle it within ``GRACE`` seconds (``RAISED`` once
    its handler raised, for the unwinding to reach the guard; ``FINISH`` once it did), it removes the registered
    temporaries (``removed_if_killed``), says the main thread's line and exits with 130 (143 for SIGTERM). Under
    an MPI launcher it also exits when its parent (Hydra's proxy) is gone, which would leave the rank spinning in
    a collective.
    """

    GRACE, RAISED, FINISH, TICK = 0.05, 1.0, 5.0, 0.25  # seconds

    def __init__(self, who, ending=None):
        self.who, self.ending = who, ending if ending is not None else Ending()
        self.parent = os.getppid() if any(v in os.environ for v in LAUNCHER_VARS) else None
        self.reader, self.writer = os.pipe()
        os.set_blocking(self.writer, False)
        self.previous = signal.set_wakeup_fd(self.writer, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="mpitp-watchdog", daemon=True).start()

    def _watch(self):
        stop = since = None
        while True:
            begun = self.ending.begun  # the main thread's exception reached the guard; raised: its handler ran
            limit = self.FINISH if begun else self.RAISED if self.ending.raised else self.GRACE
            due = since + limit - time.monotonic() if stop else self.TICK
            if due <= 0:
                self._exit(None if begun else f"{self.who}: {stop[0]}", stop[1])
            if select.select([self.reader], [], [], min(due, self.TICK))[0]:
                signums = os.read(self.reader, 64)
                if not signums:  # close(): the guarded call returned
                    return os.close(self.reader)
                if not stop and any(s in STOPS for s in signums):
                    stop, since = next(STOPS[s] for s in signums if s in STOPS), time.monotonic()
            if self.parent is not None and os.getppid() != self.parent:
                self._exit(f"{self.who}: the MPI launcher is gone (its process {self.parent} ended)", 1)

    def _exit(self, line, code):
        threading.Timer(self.FINISH, os._exit, (code,)).start()  # even if a removal or stderr is what blocks
        for path in list(LEFT):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                remove(path)
        with contextlib.suppress(OSError, ValueError):  # the launcher's end of the pipe may be gone
            if line:
                say(line)
        if self.parent is not None and code != 1:  # a stop signal under a launcher
            kill_stopped_peers_later(self.parent)
        os._exit(code)

    def close(self):
        signal.set_wakeup_fd(self.previous)
        os.close(self.writer)  # the thread reads end-of-file and returns


def remove(path):
    """Remove the file ``path`` if it is there."""
    with contextlib.suppress(OSError):
        os.remove(path)


def run_guarded(comm, fn, verbose, prog):
    """``fn()``'s exit status; an exception on this rank aborts every rank of the job: status 2 with one line
    for bad input (``MpitpError``, found after the ranks agreed to go on, by this rank alone), 1 for anything
    unexpected. ``comm``: the job's communicator, or a function that makes it (called under the guard: MPI_Init
    can block), or None for a serial tool, which gets the signal handlers but no watchdog."""
    make = comm if callable(comm) else None
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None and not make else (launcher_rank(), None)
    who = f"[rank {rank or 0}] {prog}" if comm is not None else prog
    main = threading.current_thread() is threading.main_thread()  # signals can only be handled there
    saved = {s: signal.getsignal(s) for s in STOPS} if main else {}
    ending = Ending()
    if main:
        for s in STOPS:  # SIGTERM (Slurm's scancel) like Ctrl-C
            signal.signal(s, ending)
    watchdog = Watchdog(who, ending) if main and comm is not None else None
    try:
        if make:
            comm = make()
            rank, size = comm.Get_rank(), comm.Get_size()
        return fn()
    except BaseException as e:  # noqa: BLE001 -- anything unexpected must take the whole job down
        if isinstance(e, SystemExit) and not e.code:
            raise
        ending.begun = True  # from here on, a repeated signal must not cut the ending short with a traceback
        code = _report(e, who if rank else prog, who, verbose)
        if isinstance(e, (KeyboardInterrupt, Terminated)) and main:
            # Its clean-ups done, the process ends now: every rank got the signal from the launcher and ends at once,
            # so that a second Ctrl-C finds the job gone (MPICH may exit 0); and a repeated signal must not find it
            # in Python's finalisation, which restores the default action (killed by the signal, not 130).
            if watchdog is not None and watchdog.parent is not None:  # under a launcher
                kill_stopped_peers_later(watchdog.parent)
            _end(code)
        if size is not None and size > 1:
            mpi.abort(comm, code)
        return code
    finally:
        if watchdog is not None:
            watchdog.close()
        for s, handler in saved.items():
            if handler is not None:
                signal.signal(s, handler)


def kill_stopped_peers_later(launcher, delay=0.1):
    """If the ``launcher`` (this rank's parent when it started) has a child on this node that is stopped (a rank of
    this job that cannot act on any signal) as this rank ends on a signal: in a forked process of no files,
    ``delay`` seconds later, SIGKILL those still stopped. MPICH's Hydra kills such a rank itself once another has
    exited, and now and then does not: seen here on 2026-12-07, rank 0 gone, rank 1 stopped with SIGTERM pending,
    the job waiting for ever. Then the job ends as when Hydra kills it (status 9 or the signal's). With no rank
    stopped there is no fork, which would widen the moment in which Hydra kills a rank still ending itself
    (status 9); with the launcher gone (this rank is another process's child now), nothing. Linux only (/proc)."""
    try:
        if os.getppid() != launcher or not stopped_children(launcher) or os.fork() != 0:
            return
    except OSError:  # no /proc, or no fork: Hydra's own kill is all there is
        return
    try:  # the child: no file of the rank's (the launcher waits for its pipes to close), then one look
        os.closerange(0, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024)
        time.sleep(delay)
        for pid in stopped_children(launcher):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    finally:
        os._exit(0)


def stopped_children(parent):
    """The pids of process ``parent``'s children that are stopped (state T), from /proc."""
    try:  # the kernel's list of each of its threads' children, or else every process
        tasks = os.listdir(f"/proc/{parent}/task")
        pids = [p for t in tasks for p in Path(f"/proc/{parent}/task/{t}/children").read_text().split()]
    except OSError:
        pids = list(filter(str.isdigit, os.listdir("/proc")))
    stopped = []
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == parent and state == "T":
                stopped.append(int(pid))
    return stopped


def _end(code):
    """End the process now with status ``code``, its output flushed (if it can be), without Python's finalisation."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):  # closed, a full disk, a reader gone
            stream.flush()
    os._exit(code)


def _report(e, said_by, who, verbose):
    """Say what ended the guarded call (one line; the traceback with ``verbose``) and return the exit status."""
    if isinstance(e, MpitpError):  # after the vote, found by this rank alone: it ends the job for all
        if str(e):
            say(f"{said_by}: error: {e}")
        return getattr(e, "status", 2)
    stopped = STOPS[signal.SIGINT] if isinstance(e, KeyboardInterrupt) else STOPS[e.args[0]] if isinstance(
        e, Terminated) else None
    say(f"{who}: {stopped[0] if stopped else f'unexpected error: {type(e).__name__}: {e}'}")
    if verbose:
        traceback.print_exc()
    elif not stopped:
        say(f"{who}: run with --verbose for the traceback.")
    return stopped[1] if stopped else 1


def check_writable(path, what):
    """Raise ``MpitpError`` (``what``: the option and its value) unless the file ``path``, written at the end of a
    run, can be created or replaced: checked before the work, so that a long run is not lost to a bad destination.
    Only a regular file is replaced: a device (``/dev/null``), FIFO, socket or symbolic link is refused."""
    if not path:
        raise MpitpError(f"{what}: give a file name, or leave the option out.")
    target = existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if os.path.isdir(target):
        raise MpitpError(f"{what}: {path} is a folder.")
    refuse_special(path, what)
    into = os.path.dirname(target) if existing == target else existing
    try:
        with tempfile.TemporaryFile(dir=into):  # even for root: a read-only file system, /proc, a full quota
            pass
    except OSError as e:
        raise MpitpError(f"{what}: cannot write in {into} ({e.strerror}).") from None


def refuse_special(path, what):
    """Raise ``MpitpError`` if ``path`` exists and is not a regular file: a device (``/dev/null``), FIFO, socket or
    symbolic link is never replaced by an output."""
    target = os.path.abspath(path)
    if os.path.lexists(target) and not stat.S_ISREG(os.lstat(target).st_mode):
        raise MpitpError(f"{what}: {path} is {kind(target)}, not a regular file; mpitp replaces only regular files "
                         "(give a new file name).")


def replace_file(path, write, what):
    """Write the file ``path`` whole or not at all: ``write(f)`` fills a temporary file beside it (binary), which
    is then renamed over ``path``. On any failure the temporary file is removed; an ``OSError`` (a full disk) is an
    ``MpitpError`` naming ``what``. ``path`` is checked again (``refuse_special``): the run took a while."""
    refuse_special(path, what)
    tmp = f"{os.path.abspath(path)}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        with open(tmp, "xb") as f, removed_if_killed(tmp):  # x: never through a file or link of that name
            write(f)                                         # left by someone else
        os.replace(tmp, path)
    except BaseException as e:
        if not isinstance(e, FileExistsError):  # the temporary file is ours: never outlives a failure
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise MpitpError(f"{what}: could not be written ({e.strerror or e}); nothing was left behind.") from None
        raise


def kind(path):
    """What ``path`` is, in words, for a message ("a FIFO", "a symbolic link", ...)."""
    mode = os.lstat(path).st_mode
    return next((name for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                                         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                                         (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")) if test(mode)),
                "not a regular file")
