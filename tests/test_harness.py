"""The MPI test harness itself: a failure on one rank must fail the whole run, never hang or pass."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import child_env, mpirun, serial_only

pytestmark = serial_only

FAILING_SUITE = '''
from mpi4py import MPI
import numpy as np
import pytest

@pytest.mark.mpi(min_size=2)
def test_fails_on_rank_1_only():
    assert MPI.COMM_WORLD.rank != 1

@pytest.mark.mpi(min_size=2)
def test_collective_after():
    # Rank 0 reaches this Allreduce while rank 1 has moved on: without the guard this pairs wrongly or hangs.
    buf = np.ones(4)
    MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf)
    assert buf[0] == MPI.COMM_WORLD.size
'''


def test_failure_on_one_rank_fails_the_run(tmp_path):
    tests_dir = Path(__file__).parent
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(tests_dir)!r})
        from mpi_guard import pytest_configure, pytest_runtest_logreport, pytest_sessionfinish  # under test
    '''))
    (tmp_path / "test_suite.py").write_text(FAILING_SUITE)
    env = child_env()
    cmd = [*mpirun(2), sys.executable, "-m", "pytest",
           "--with-mpi", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path), str(tmp_path)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "aborting the MPI job" in r.stderr
    assert time.monotonic() - t0 < 30
    # one report, rank 0's; the failure that happened on rank 1 alone is still shown, with its rank
    assert "[rank 1] FAILED test_suite.py::test_fails_on_rank_1_only (call)" in r.stderr
    assert r.stdout.count("MPI Information") <= 1
