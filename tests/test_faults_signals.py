"""The fault catalogue, signals and lost ranks: Ctrl-C must end a job whose ranks cannot act on it, a rank whose
launcher dies must exit too. (A test run with a rank missing must never pass: tests/test_harness.py.)

Each job is the generate command on 2 ranks through tests/inject.py, which stops one rank (SIGSTOP) or blocks it
in a read that no signal interrupts, while the other waits inside an MPI collective: neither can run Python's
signal handler. The test finds the job's processes in /proc by a folder name unique to the test.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, child_env, model_dir, mpirun, serial_only
from mpitp.cli import runner as entry
from random_models import write_random_model

pytestmark = serial_only
LIMIT = 5  # seconds from the first signal to the end of the job


def job_processes(marker):
    """{pid: (state, parent pid)} of the live processes whose command line holds ``marker``."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() not in f.read():  # a zombie's is empty: it is gone
                    continue
            with open(f"/proc/{pid}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:  # ended meanwhile
            continue
        found[int(pid)] = (state, int(ppid))
    return found


def start_job(tmp_path, phase):
    """``mpirun -n 2`` of the generate command with ``1:phase`` injected, once rank 1 is stopped or stalled (or,
    ``healthy``, 2 s into a long generation); returns the mpirun process, the marker and the ranks' pids."""
    marker, max_new = tmp_path / "signals-model", "20"
    if phase == "healthy":
        write_random_model(marker, "llama-mqa", max_position_embeddings=60000, hidden_size=192,
                           intermediate_size=512)
        max_new = "50000"
    else:
        shutil.copytree(model_dir("gpt2-tiny"), marker)
    proc = subprocess.Popen([*mpirun(2), sys.executable, str(REPO / "tests" / "inject.py"), f"1:{phase}",
                             "--model", str(marker), "--prompt-ids", "1,2,3", "--max-new-tokens", max_new,
                             "--ignore-eos"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=str(REPO), start_new_session=True)
    start = time.monotonic()
    while time.monotonic() < start + 60 and proc.poll() is None:
        ranks = {pid: v for pid, v in job_processes(str(marker)).items() if pid != proc.pid}
        if len(ranks) == 2 and (phase == "healthy" and time.monotonic() > start + 2
                                or any(stuck(pid, state, phase) for pid, (state, _) in ranks.items())):
            if phase == "startstop":  # rank 1 stopped after its imports: give rank 0 the time to end its own
                time.sleep(1)
            return proc, str(marker), ranks
        time.sleep(0.1)
    _, err = stop_job(proc)
    pytest.fail(f"rank 1 never reached its {phase}: {err}")


def stuck(pid, state, phase):
    if phase in ("stop", "startstop"):
        return state == "T"
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "pipe_read" in f.read()  # "pipe_read", or "anon_pipe_read" on newer kernels
    except OSError:
        return False


def stop_job(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()


def assert_all_gone(marker, ranks):
    deadline = time.monotonic() + 2
    while job_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = job_processes(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == {}, f"processes left running: {left} (ranks were {sorted(ranks)})"


@pytest.mark.parametrize("to", ["mpirun", "group"])  # mpirun alone, or its process group as a terminal does
@pytest.mark.parametrize("count, gap", [(1, 0), (2, 2.0), (3, 2.0), (3, 0.3)])
@pytest.mark.parametrize("phase", ["stop", "stall", "healthy", "startstop"])
def test_ctrl_c_ends_the_job_with_130_however_often_pressed(tmp_path, phase, count, gap, to):
    # Before: one Ctrl-C did nothing for more than 40 s; a second, 2 s later, made MPICH's mpiexec kill the job
    # and exit 0 (6 runs of 6 here) or 255 by a race, and even with no rank stuck two Ctrl-Cs 0.2 s apart gave 0
    # (4 of 8) or 255. Now a rank ends itself at once on the signal, or its watchdog ends it when it
    # cannot run its handler (0.05 s): status 130, and the later Ctrl-Cs, even 0.3 s apart, find the job gone.
    proc, marker, ranks = start_job(tmp_path, phase)
    t = time.monotonic()
    try:
        for _ in range(count):
            if proc.poll() is None:
                (os.killpg if to == "group" else os.kill)(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=gap)
            except subprocess.TimeoutExpired:
                pass
        proc.wait(timeout=max(0.1, t + LIMIT - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    took = time.monotonic() - t
    _, err = stop_job(proc)
    assert took < LIMIT and proc.returncode == 130, (took, proc.returncode, err)
    assert "] mpitp: interrupted" in err and "Traceback" not in err and "BAD TERMINATION" not in err, err
    assert_all_gone(marker, ranks)


def test_sigterm_ends_a_job_with_a_stalled_rank(tmp_path):
    proc, marker, ranks = start_job(tmp_path, "stall")
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        pass
    took = time.monotonic() - t
    _, err = stop_job(proc)
    assert took < LIMIT and proc.returncode == 143 and "] mpitp: terminated" in err, (took, proc.returncode, err)
    assert "Traceback" not in err
    assert_all_gone(marker, ranks)


def test_ranks_whose_launcher_dies_exit(tmp_path):
    # Before: kill -9 of MPICH's proxy left both ranks running, rank 0 at 100% CPU in a collective, orphaned.
    proc, marker, ranks = start_job(tmp_path, "stall")  # rank 1 in a read, rank 0 waiting inside Allreduce
    proxies = {ppid for _, ppid in ranks.values()}
    assert len(proxies) == 1
    proxy = proxies.pop()
    with open(f"/proc/{proxy}/comm") as f:
        assert f.read().strip() == "hydra_pmi_proxy"
    t = time.monotonic()
    os.kill(proxy, signal.SIGKILL)
    while any(pid in job_processes(marker) for pid in ranks) and time.monotonic() - t < LIMIT:
        time.sleep(0.1)
    took = time.monotonic() - t
    stop_job(proc)
    left = {pid: v for pid, v in job_processes(marker).items() if pid in ranks}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == {} and took < LIMIT, f"ranks left running {took:.1f} s after their proxy died: {left}"


def test_the_launcher_check_is_only_made_under_a_launcher(monkeypatch):
    # A plain serial run may outlive its parent (nohup, a closed terminal); a rank must not.
    for var in entry.LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    watchdog = entry.Watchdog("test")
    watchdog.close()
    assert watchdog.parent is None
    monkeypatch.setenv("PMI_RANK", "0")
    watchdog = entry.Watchdog("test")
    watchdog.close()
    assert watchdog.parent == os.getppid()
