"""The MPI test harness itself: a failure, skip, xfail or exit on one rank must fail the whole run, never hang
or pass, when run by hand as ``mpirun -n 2 pytest`` (what the README shows) as well as under make.

Each case plants a small test file beside a conftest that loads tests/mpi_guard.py and runs it in a child
``mpirun -n 2 pytest`` with a timeout.
"""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import child_env, mpirun, serial_only

pytestmark = serial_only

SUITES = {
    "fails_on_rank_1": '''
        def test_fails_on_rank_1_only():
            assert MPI.COMM_WORLD.rank != 1

        def test_collective_after():  # rank 0 reaches this Allreduce while rank 1 has moved on
            buf = np.ones(4)
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf)
            assert buf[0] == MPI.COMM_WORLD.size
    ''',
    # A rank that leaves: MPICH kills the others at once and records them as status 0.
    "os_exit": '''
        def test_leaves_on_rank_1():
            if MPI.COMM_WORLD.rank == 1:
                os._exit(0)
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, np.ones(2))  # where rank 0 waits for it
    ''',
    "posix_exit": '''
        def test_leaves_on_rank_1():
            if MPI.COMM_WORLD.rank == 1:
                posix._exit(0)
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, np.ones(2))
    ''',
    "abort_0": '''
        def test_leaves_on_rank_1():
            if MPI.COMM_WORLD.rank == 1:
                MPI.COMM_WORLD.Abort(0)
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, np.ones(2))
    ''',
    "pytest_exit": '''
        def test_leaves_on_rank_1():
            if MPI.COMM_WORLD.rank == 1:
                pytest.exit("rank 1 leaves", returncode=0)

        def test_collective_after():  # rank 0 waits here for a rank that has left the run
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, np.ones(2))
    ''',
    # Rank 1 skips test_a, so rank 0's Allreduce in test_a pairs with rank 1's in test_b: both ranks finish
    # 2 tests, and every collective completes.
    "skip_on_rank_1": '''
        def test_a():
            if MPI.COMM_WORLD.rank == 1:
                pytest.skip("not on rank 1")
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, np.ones(2))

        def test_b():
            if MPI.COMM_WORLD.rank == 1:
                MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, np.ones(2))
    ''',
    "xfail_on_rank_1": '''
        def test_a():
            if MPI.COMM_WORLD.rank == 1:
                pytest.xfail("wrong on rank 1")
    ''',
    "thread_raises_on_rank_1": '''
        def test_worker():
            def work():
                if MPI.COMM_WORLD.rank == 1:
                    raise ValueError("lost in a thread")
            t = threading.Thread(target=work)
            t.start()
            t.join()
    ''',
    "c_exit": '''
        def test_leaves_on_rank_1():  # an exit no Python hook sees: only the missing proof tells
            if MPI.COMM_WORLD.rank == 1:
                ctypes.CDLL(None)._exit(0)

        def test_after():
            pass
    ''',
    "good": '''
        def test_collective():
            buf = np.ones(2)
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf)
            assert buf[0] == MPI.COMM_WORLD.size

        @pytest.mark.mpi(min_size=3)  # pytest-mpi skips it on every rank alike
        def test_needs_3_ranks():
            pass

        @pytest.mark.xfail(reason="fails on every rank alike", strict=True)
        def test_xfailed_everywhere():
            assert False
    ''',
    # A thread that raises after its test has ended, on rank 1: once passed, since pytest's catch is per test.
    "thread_after_the_test": '''
        def test_starts_a_thread():
            def late():
                threading.Event().wait(1)  # after the test's end: the session's end joins it
                if MPI.COMM_WORLD.rank == 1:
                    raise RuntimeError("late thread failure")
            threading.Thread(target=late, name="late").start()
    ''',
    "daemon_after_the_test": '''
        def test_starts_a_daemon_thread():
            def late():
                threading.Event().wait(0.3)  # within the session end's wait for daemon threads
                if MPI.COMM_WORLD.rank == 1:
                    raise RuntimeError("late daemon failure")
            threading.Thread(target=late, name="late-daemon", daemon=True).start()
    ''',
}


def run_suite(tmp_path, name, n=2):
    """``mpirun -n N pytest`` (plain ``pytest`` for n=1) of ``SUITES[name]`` with the repository's MPI guard, as
    by hand: the result, how long it took, and whether rank 0 wrote the proof that every rank reached the end
    in agreement (what the Makefile requires)."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from mpi_guard import *  # under test
    '''))
    (tmp_path / "test_suite.py").write_text("import ctypes, os, posix, threading\nimport numpy as np\n"
                                            "import pytest\nfrom mpi4py import MPI\n" + textwrap.dedent(SUITES[name]))
    done = tmp_path / "done"
    cmd = [*(mpirun(n) if n > 1 else []), sys.executable, "-m", "pytest", "--with-mpi", "-p", "no:cacheprovider",
           "-q", "--rootdir", str(tmp_path), str(tmp_path)]
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env=child_env(MPITP_PYTEST_DONE=str(done), MPITP_PYTEST_FINAL_S="3"))
    return r, time.monotonic() - t, done.exists()


@pytest.mark.parametrize("name, said", [
    ("fails_on_rank_1", "[rank 1] FAILED test_suite.py::test_fails_on_rank_1_only (call)"),
    ("os_exit", "[rank 1] os._exit(0) in test_suite.py::test_leaves_on_rank_1, before the end of the MPI test run"),
    ("posix_exit", "[rank 1] os._exit(0) in test_suite.py::test_leaves_on_rank_1, before the end"),
    ("abort_0", "[rank 1] MPI.COMM_WORLD.Abort(0) in test_suite.py::test_leaves_on_rank_1, before the end"),
    ("pytest_exit", "[rank 1] the test run was stopped on this rank (_pytest.outcomes.Exit: rank 1 leaves)"),
    ("skip_on_rank_1", "[rank 0] the ranks ran different tests or with different outcomes:\n"
                       "  test_suite.py::test_a: rank 0 passed, rank 1 skipped\n"),
    ("xfail_on_rank_1", "  test_suite.py::test_a: rank 0 passed, rank 1 xfailed\n"),
    ("thread_raises_on_rank_1", "[rank 1] FAILED test_suite.py::test_worker (call)"),
    ("thread_after_the_test", "[rank 1] a thread failed the run: raised: late: RuntimeError: "
                              "late thread failure: aborting the MPI job."),
    ("daemon_after_the_test", "[rank 1] a thread failed the run: raised: late-daemon: "
                              "RuntimeError: late daemon failure: aborting the MPI job."),
])
def test_a_run_that_differs_on_one_rank_fails_by_hand(tmp_path, name, said):
    r, took, done = run_suite(tmp_path, name)
    assert r.returncode != 0 and not done and took < 30, (r.returncode, took, r.stdout + r.stderr)
    assert said in r.stderr, r.stderr


def test_the_differences_are_named_test_by_test(tmp_path):
    r, _, _ = run_suite(tmp_path, "skip_on_rank_1")
    assert "test_b" not in r.stderr, r.stderr  # passed on both ranks: not a difference
    assert "the ranks' test runs differ: aborting the MPI job." in r.stderr


def test_an_exit_no_hook_sees_leaves_no_proof(tmp_path):
    r, _, done = run_suite(tmp_path, "c_exit")
    assert not done, r.stdout + r.stderr  # and MPICH's status is 0 (README): why the Makefile requires the proof


@pytest.mark.parametrize("n", [1, 2])
def test_a_good_run_passes_without_pytest_mpis_banner(tmp_path, n):
    r, _, done = run_suite(tmp_path, "good", n)
    assert r.returncode == 0 and "1 passed, 1 skipped, 1 xfailed" in r.stdout, r.stdout + r.stderr
    assert done == (n > 1)  # the proof: every rank ran the same tests with the same outcomes
    assert "MPI Information" not in r.stdout + r.stderr
