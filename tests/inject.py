"""Test-only: the generate command with a fault on one rank. ``python tests/inject.py RANK:PHASE [ARGS]``.

PHASE is ``load``, ``prefill`` or ``decode`` (an unexpected error there: the job must abort), ``die`` (the rank
is killed, SIGKILL, at the second decode step), ``input`` (a
bad-input error only that rank sees, as a file missing on one node: every rank must exit cleanly), ``stop``
(the rank stops itself with SIGSTOP at the second decode step, as if suspended; ``startstop``: before the
first collective; ``initstop``: before MPI_Init, where the other ranks then wait) or ``stall`` (there it blocks
for ever in a read that no signal interrupts, as on a hung network file system); while one rank is stopped or
stalled, the others wait inside an MPI collective.
"""

import os
import signal
import sys

import mpitp.pipeline
from mpitp import MpitpError, generate
from mpitp.cli.runner import launcher_rank
from mpitp.model import Model


def stall():
    # The signals are blocked in this thread, so the kernel delivers them to another one: the read is never
    # interrupted and Python's handlers never run in this thread, as when a C library retries on EINTR.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    r, w = os.pipe()  # nobody writes to w, and it stays open: the read waits for ever
    os.read(r, 1)


fault_rank, _, phase = sys.argv.pop(1).partition(":")
if (launcher_rank() or 0) == int(fault_rank):  # the rank known without MPI, which starts in generate.main()
    load, forward, stage_forward = Model.load.__func__, Model.forward, mpitp.pipeline.stage_forward
    calls = []

    def faulty_load(cls, *args, **kwargs):
        if phase in ("load", "input"):
            raise (RuntimeError if phase == "load" else MpitpError)(f"fault injected on this rank during {phase}")
        return load(cls, *args, **kwargs)

    def fault():  # at each forward (with --pp: each stage's part of one)
        calls.append(1)
        if phase == "stop" and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGSTOP)
        elif phase == "stall" and len(calls) == 3:
            stall()
        elif phase == "prefill" or (phase == "decode" and len(calls) == 3):  # decode: the second decode step
            raise RuntimeError(f"fault injected on this rank during {phase}")
        elif phase == "die" and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    def faulty_forward(self, *args, **kwargs):
        fault()
        return forward(self, *args, **kwargs)

    def faulty_stage_forward(*args, **kwargs):
        fault()
        return stage_forward(*args, **kwargs)

    Model.load, Model.forward = classmethod(faulty_load), faulty_forward
    mpitp.pipeline.stage_forward = faulty_stage_forward
    if phase in ("startstop", "initstop"):  # stopped before the first collective, as on a hung file system at
        if phase == "startstop":            # start-up; initstop: before MPI_Init, which the others then wait in
            from mpitp import comm
            comm.world()
        os.kill(os.getpid(), signal.SIGSTOP)
sys.exit(generate.main())
