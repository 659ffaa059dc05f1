"""pytest hooks that make a failure on any rank fail the whole MPI run, and keep ranks' files apart.

pytest-mpi alone can hang (a rank that failed a test waits in a later collective) or even pass falsely on
rank 0 (its collectives paired with another test's on rank 1). So when anything failed on a rank of a
multi-rank run, that rank aborts the job as its session ends: the run exits non-zero at once.

Nor may a run pass with a rank missing. When a rank exits before MPI_Finalize, MPICH's Hydra kills the other
ranks at once and records them as status 0, so one ``os._exit(0)`` in a test made ``mpirun -n 2 pytest`` exit 0
with no summary. So in a multi-rank run a rank's ``os._exit(0)`` before the end exits 1 instead, and the session
ends with an agreement: every rank must arrive within ``FINAL_S`` seconds, having finished as many tests as the
others, or the job is aborted. Then, with ``MPITP_PYTEST_DONE`` set, rank 0 writes that file: the Makefile
requires it, as the proof of what no hook can see (a rank ended by C code calling exit(0)).
"""

import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pytest
from mpi4py import MPI

FINAL_S = float(os.environ.get("MPITP_PYTEST_FINAL_S", 300))  # how far apart the ranks may end (> any one test)
_run = {"test": None, "finished": 0}  # this rank's progress: the test under way, the tests finished
_exit = os._exit


def _say(line):
    sys.stderr.write(f"\n[rank {MPI.COMM_WORLD.Get_rank()}] {line}\n")
    sys.stderr.flush()


def _exit_before_the_end(code):
    if code == 0 and os.getpid() == _run["pid"]:  # not a forked child's normal end
        _run["config"].pluginmanager.getplugin("capturemanager").suspend_global_capture()  # to the real stderr
        _say(f"os._exit(0) in {_run['test']}, before the end of the MPI test run: status 1 instead")
        code = 1
    _exit(code)


@pytest.hookimpl(trylast=True)  # after pytest's own terminal reporter exists
def pytest_configure(config):
    comm = MPI.COMM_WORLD
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
    os._exit = _exit_before_the_end


def pytest_runtest_logreport(report):
    comm = MPI.COMM_WORLD
    _run["test"] = report.nodeid
    if report.when == "teardown":
        _run["finished"] += 1
    if comm.Get_rank() > 0 and report.failed:
        sys.stderr.write(f"\n[rank {comm.Get_rank()}] FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.stderr.flush()


def _abort(line, say=True):
    sys.stdout.flush()
    if say:
        _say(f"{line}: aborting the MPI job.")
    time.sleep(0.5)  # let the launcher forward the report before the job is torn down
    MPI.COMM_WORLD.Abort(1)
    _exit(1)  # MPI_Abort can return (seen when mpirun was started by an MPI process): never go on to the end


def pytest_sessionfinish(session, exitstatus):
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return
    if session.testsfailed:
        _abort(f"{session.testsfailed} test(s) failed")
    # The final agreement: how many tests each rank finished, gathered without blocking, with a deadline.
    finished, deadline = np.empty(comm.Get_size(), np.int64), time.monotonic() + FINAL_S
    request = _run["comm"].Iallgather(np.array([_run["finished"]], np.int64), finished)
    while not request.Test():
        if time.monotonic() > deadline:
            _abort(f"not every rank reached the end of the MPI test run within {FINAL_S:g} s (this one finished "
                   f"{_run['finished']} tests)")
        time.sleep(0.01)
    if len(set(finished.tolist())) > 1:
        _abort("the ranks finished different numbers of tests (" +
               ", ".join(f"rank {r}: {n}" for r, n in enumerate(finished.tolist())) + ")", comm.Get_rank() == 0)
    os._exit = _exit
    basetemp = session.config.option.basetemp
    if basetemp and "mpitp-pytest-" in str(basetemp):
        shutil.rmtree(basetemp, ignore_errors=True)  # this rank's own temporary folder, when all went well
    if comm.Get_rank() == 0 and os.environ.get("MPITP_PYTEST_DONE"):
        with open(os.environ["MPITP_PYTEST_DONE"], "w") as f:
            f.write(f"{comm.Get_size()} ranks finished {finished[0]} tests each\n")
