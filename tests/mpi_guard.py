"""pytest hooks that make a failure on any rank fail the whole MPI run, and keep ranks' files apart.

pytest-mpi alone can hang (a rank that failed a test waits in a later collective) or even pass falsely on
rank 0 (its collectives paired with another test's on rank 1). So when anything failed on a rank of a
multi-rank run, that rank aborts the job as its session ends: the run exits non-zero at once.
"""

import os
import shutil
import sys
import tempfile
import time

import pytest
from mpi4py import MPI


@pytest.hookimpl(trylast=True)  # after pytest's own terminal reporter exists
def pytest_configure(config):
    # Under mpirun every rank is a separate pytest process: give each its own temporary folder, so that
    # pytest's numbered-folder cleanup in one rank cannot remove another rank's files.
    comm = MPI.COMM_WORLD
    if comm.Get_size() > 1 and not config.option.basetemp:
        config.option.basetemp = os.path.join(tempfile.gettempdir(), f"mpitp-pytest-{os.getpid()}-rank{comm.Get_rank()}")
    # One readable report, rank 0's: the other ranks print no progress, headers or summary, and their
    # failures go to stderr as they happen (pytest_runtest_logreport below).
    if comm.Get_rank() > 0:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)


def pytest_runtest_logreport(report):
    comm = MPI.COMM_WORLD
    if comm.Get_rank() > 0 and report.failed:
        sys.stderr.write(f"\n[rank {comm.Get_rank()}] FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.stderr.flush()


def pytest_sessionfinish(session, exitstatus):
    comm = MPI.COMM_WORLD
    basetemp = session.config.option.basetemp
    if comm.Get_size() > 1 and not session.testsfailed and basetemp and "mpitp-pytest-" in str(basetemp):
        shutil.rmtree(basetemp, ignore_errors=True)  # this rank's own temporary folder, when all went well
    if comm.Get_size() > 1 and session.testsfailed:
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"\n[rank {comm.Get_rank()}] {session.testsfailed} test(s) failed: aborting the MPI job.",
              file=sys.stderr, flush=True)
        time.sleep(0.5)  # let the launcher forward the report before the job is torn down
        comm.Abort(1)
