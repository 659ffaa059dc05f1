"""Test-only: the generate command with a fault on one rank. ``python tests/inject.py RANK:PHASE [ARGS]``.

PHASE is ``load``, ``prefill`` or ``decode`` (an unexpected error there: the job must abort) or ``input``
(a bad-input error only that rank sees, as a file missing on one node: every rank must exit cleanly).
"""

import sys

from mpi4py import MPI

from mpitp import MpitpError, generate
from mpitp.model import Model

fault_rank, _, phase = sys.argv.pop(1).partition(":")
if MPI.COMM_WORLD.Get_rank() == int(fault_rank):
    load, forward = Model.load.__func__, Model.forward
    calls = []

    def faulty_load(cls, *args, **kwargs):
        if phase in ("load", "input"):
            raise (RuntimeError if phase == "load" else MpitpError)(f"fault injected on this rank during {phase}")
        return load(cls, *args, **kwargs)

    def faulty_forward(self, *args, **kwargs):
        calls.append(1)
        if phase == "prefill" or len(calls) == 3:  # decode: fail on the second decode step of one prompt
            raise RuntimeError(f"fault injected on this rank during {phase}")
        return forward(self, *args, **kwargs)

    Model.load, Model.forward = classmethod(faulty_load), faulty_forward
sys.exit(generate.main())
