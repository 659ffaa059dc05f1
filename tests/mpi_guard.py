"""pytest hooks that make a failure on any rank fail the whole MPI run, and keep ranks' files apart.

pytest-mpi alone can hang (a rank that failed a test waits in a later collective) or even pass falsely on
rank 0 (its collectives paired with another test's on rank 1). So when anything failed on a rank of a
multi-rank run, or the run was stopped there (``pytest.exit``, Ctrl-C), that rank aborts the job as its session
ends: the run exits non-zero at once. An exception left in a worker thread fails its test (serially too).

Nor may a run pass with a rank missing or a rank that ran something else. When a rank exits before
MPI_Finalize, MPICH's Hydra kills the other ranks at once and records them as status 0, so one ``os._exit(0)``
(or ``posix._exit(0)``, or ``MPI.COMM_WORLD.Abort(0)``) in a test made ``mpirun -n 2 pytest`` exit 0 with no
summary. So in a multi-rank run these exit 1 instead before the end, and the session ends with an agreement:
every rank must arrive within ``FINAL_S`` seconds, having run the same tests, in the same order, with the same
outcomes (passed, failed, skipped, xfailed, xpassed, error) as the others, or the job is aborted with the tests
that differ. A test skipped on one rank only fails the run so: its collectives would have paired with another
test's. Then, with ``MPITP_PYTEST_DONE`` set, rank 0 writes that file: the Makefile requires it, as the proof of
what no hook can see (a rank ended by C code calling exit(0) or MPI_Abort with 0, which MPICH reports as 0).
"""

import functools
import hashlib
import os
import posix
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
from mpi4py import MPI

__all__ = ["pytest_configure", "pytest_keyboard_interrupt", "pytest_runtest_logreport", "pytest_sessionfinish"]

THREADS_S, DAEMONS_S = 60.0, 2.0  # how long the session's end waits for threads, then for daemon threads
FINAL_S = float(os.environ.get("MPITP_PYTEST_FINAL_S", 300))  # how far apart the ranks may end (> any one test)
SHOWN = 10  # tests named when the ranks' runs differ
# this rank's progress: the test under way, each finished test's outcome in order, why the run stopped early
_run = {"test": None, "outcomes": {}, "stopped": None, "ended": False}
_exit, _world = os._exit, MPI.COMM_WORLD
_raised = []  # "thread name: exception" of every thread that raised outside pytest's own per-test catch


def _record_thread_exception(args, previous):
    """threading.excepthook, chained before the previous one (pytest's, which fails a test that is under way):
    a thread that raised at any time, after its test ended too, fails the run at its end."""
    _raised.append(f"{args.thread.name if args.thread else 'a thread'}: {args.exc_type.__name__}: {args.exc_value}")
    previous(args)


def _late_threads():
    """Wait for the threads still running (``THREADS_S`` at most, then ``DAEMONS_S`` for daemon threads); a line
    naming those that raised after their test (or that never end), or None."""
    for daemon, limit in ((False, THREADS_S), (True, DAEMONS_S)):
        deadline = time.monotonic() + limit
        for t in threading.enumerate():
            if t is not threading.current_thread() and t.daemon == daemon:
                t.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threading.enumerate() if t.is_alive() and not t.daemon
            and t is not threading.current_thread()]
    problems = [f"raised: {r}" for r in _raised] + [f"still running: {n}" for n in hung]
    return "; ".join(problems) or None


def _say(line):
    sys.stderr.write(f"\n[rank {_world.Get_rank()}] {line}\n")
    sys.stderr.flush()


def _early(how, code):
    """The status for an exit ``how`` with ``code`` in this process: 1 instead of 0 before the end."""
    if code != 0 or _run["ended"] or os.getpid() != _run["pid"]:  # a forked child's normal end is not early
        return code
    _run["config"].pluginmanager.getplugin("capturemanager").suspend_global_capture()  # to the real stderr
    _say(f"{how}(0) in {_run['test']}, before the end of the MPI test run: status 1 instead")
    return 1


def _exit_before_the_end(code):
    _exit(_early("os._exit", code))


class _GuardedWorld(MPI.Intracomm):
    """COMM_WORLD, whose ``Abort(0)`` before the end aborts with 1: MPICH reports 0 for the whole job."""

    def Abort(self, errorcode=0):  # noqa: N802 -- mpi4py's name
        code = _early("MPI.COMM_WORLD.Abort", errorcode)
        if code != errorcode:
            time.sleep(0.5)  # as in _abort: the line said must be forwarded before the job is torn down
        super().Abort(code)


@pytest.hookimpl(trylast=True)  # after pytest's own terminal reporter and pytest-mpi's plugin exist
def pytest_configure(config):
    # An exception left in a worker thread is a failure of the test that started it, not a warning.
    config.addinivalue_line("filterwarnings", "error::pytest.PytestUnhandledThreadExceptionWarning")
    threading.excepthook = functools.partial(_record_thread_exception, previous=threading.excepthook)
    # pytest-mpi prints a 17-line "MPI Information" section at the end of every run with --with-mpi, and has no
    # option against it: its flag for the section is off here; its markers and skips are unchanged.
    for plugin in config.pluginmanager.get_plugins():
        if type(plugin).__name__ == "MPIPlugin":
            plugin._is_testing_mpi = False
    comm = _world
    if comm.Get_size() == 1:
        return
    # Every rank is a separate pytest process: give each its own temporary folder, so that pytest's
    # numbered-folder cleanup in one rank cannot remove another rank's files.
    if not config.option.basetemp:
        config.option.basetemp = os.path.join(tempfile.gettempdir(),
                                              f"mpitp-pytest-{os.getpid()}-rank{comm.Get_rank()}")
    # One readable report, rank 0's: the other ranks print no progress, headers or summary, and their
    # failures go to stderr as they happen (pytest_runtest_logreport below).
    if comm.Get_rank() > 0:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)
    # The final agreement gets a communicator of its own, so that no test's collective can pair with it.
    _run.update(config=config, pid=os.getpid(), comm=comm.Dup())
    os._exit = posix._exit = _exit_before_the_end
    MPI.COMM_WORLD = _GuardedWorld(comm)


def pytest_runtest_logreport(report):
    rank, config = _world.Get_rank(), _run.get("config")
    _run["test"] = report.nodeid
    if config is not None:  # the outcome as pytest's summary counts it: "passed", "skipped", "xfailed", "error" ...
        status = config.hook.pytest_report_teststatus(report=report, config=config)
        outcome = _run["outcomes"].setdefault(report.nodeid, [])
        if status and status[0] and status[0] not in outcome:
            outcome.append(status[0])
    if rank > 0 and report.failed:
        sys.stderr.write(f"\n[rank {rank}] FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.stderr.flush()


def pytest_keyboard_interrupt(excinfo):
    """Ctrl-C or ``pytest.exit`` (whatever its return code): this rank's run ended before its last test."""
    _run["stopped"] = excinfo.exconly()


def _abort(line, say=True):
    sys.stdout.flush()
    if say:
        _say(f"{line}: aborting the MPI job.")
    time.sleep(0.5)  # let the launcher forward the report before the job is torn down
    _world.Abort(1)
    _exit(1)  # MPI_Abort can return (seen when mpirun was started by an MPI process): never go on to the end


def _wait(request, what):
    """Complete ``request`` (the ranks arriving at the end), or abort the job after ``FINAL_S`` seconds."""
    deadline = time.monotonic() + FINAL_S
    while not request.Test():
        if time.monotonic() > deadline:
            _abort(f"not every rank reached the end of the MPI test run within {FINAL_S:g} s ({what})")
        time.sleep(0.01)


def _differences(runs):
    """Lines naming each test that some rank ran differently (or not at all) from rank 0, at most ``SHOWN``."""
    tests = list(dict.fromkeys(test for run in runs for test in run))  # rank 0's order, then what others added
    lines = [f"  {test}: " + ", ".join(f"rank {r} {'+'.join(run[test]) if test in run else 'not run'}"
                                      for r, run in enumerate(runs))
             for test in tests if len({str(run.get(test)) for run in runs}) > 1]
    if not lines:
        return ["  the same tests and outcomes, in a different order"]
    return lines[:SHOWN] + ([f"  ... and {len(lines) - SHOWN} more"] if len(lines) > SHOWN else [])


def _agree(session):
    """The final agreement: every rank ran the same tests with the same outcomes (a digest of them, gathered
    without blocking, with a deadline; the lists themselves only when the digests differ, to say how)."""
    comm, rank, run = _run["comm"], _world.Get_rank(), _run["outcomes"]
    outcomes = "\n".join(f"{test}\t{'+'.join(outcome)}" for test, outcome in run.items())
    mine = np.frombuffer(hashlib.sha256(outcomes.encode()).digest(), np.uint8)
    digests = np.empty((comm.Get_size(), mine.size), np.uint8)
    _wait(comm.Iallgather(mine, digests), f"this one ran {len(run)} tests")
    if (digests != mine).any():
        runs = comm.gather(run, root=0)  # every rank has arrived: this cannot wait for long
        if rank == 0:
            _say("the ranks ran different tests or with different outcomes:\n" + "\n".join(_differences(runs)))
        _abort("the ranks' test runs differ", rank == 0)
    return len(run)


def pytest_sessionfinish(session, exitstatus):
    threads = _late_threads()
    if _world.Get_size() == 1:
        if threads:
            _say(f"a thread failed the run: {threads}")
            session.exitstatus = 1
        return
    if threads:
        _abort(f"a thread failed the run: {threads}")
    if session.testsfailed:
        _abort(f"{session.testsfailed} test(s) failed")
    if _run["stopped"]:
        _abort(f"the test run was stopped on this rank ({_run['stopped']})")
    tests = _agree(session)
    _run["ended"] = True
    os._exit = posix._exit = _exit
    basetemp = session.config.option.basetemp
    if basetemp and "mpitp-pytest-" in str(basetemp):
        shutil.rmtree(basetemp, ignore_errors=True)  # this rank's own temporary folder, when all went well
    if _world.Get_rank() == 0 and os.environ.get("MPITP_PYTEST_DONE"):
        with open(os.environ["MPITP_PYTEST_DONE"], "w") as f:
            f.write(f"{_world.Get_size()} ranks ran the same {tests} tests with the same outcomes\n")
