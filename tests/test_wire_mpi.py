"""--comm-dtype over real MPI: run with ``mpirun -n P pytest tests/test_wire_mpi.py`` (P = 2 to 4). Every rank must
end a compressed reduction with the same bits (the ranks must never disagree about the next token), the same
bits the simulated ranks get, and the model's own dtype must leave the plain Allreduce untouched."""

import numpy as np
import pytest
from mpi4py import MPI

from conftest import model_dir
from test_mpi import everywhere, world_model
from test_wire import sample
from threadcomm import run_ranks
from mpitp import comm, load_model
from mpitp.comm import TimedComm, wire_allreduce
from mpitp.model import Model
from mpitp.wire import FORMATS

WORLD = MPI.COMM_WORLD


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_wire_allreduce_is_bit_identical_on_every_rank(name):
    parts = [sample(5 * 72, np.float32, seed=r).reshape(5, 72) for r in range(WORLD.size)]
    buf = parts[WORLD.rank].copy()
    tc = TimedComm(WORLD)
    sent = wire_allreduce(tc, buf, FORMATS[name])
    root = WORLD.bcast(buf, root=0)
    assert everywhere(buf.tobytes() == root.tobytes())

    def simulated(c):  # the same parts on simulated ranks, in this process: the same bits
        b = parts[c.Get_rank()].copy()
        return b, wire_allreduce(c, b, FORMATS[name])

    expected = run_ranks(WORLD.size, simulated)
    assert everywhere(buf.tobytes() == expected[0][0].tobytes() and sent == expected[WORLD.rank][1])


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-gqa"])
def test_model_on_the_wire_agrees_on_every_rank(name):
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    plain = world_model(model_dir(name), "float32")
    expected = plain.forward(ids, plain.new_cache(8), all_logits=True)
    same = Model.load(model_dir(name), WORLD, "float32", comm_dtype="float32")
    assert same.comm is WORLD  # the model's dtype: the plain Allreduce, bit for bit
    assert everywhere(same.forward(ids, same.new_cache(8), all_logits=True).tobytes() == expected.tobytes())
    reference = load_model(model_dir(name), comm.serial(), "float64")
    reference = reference.forward(ids, reference.new_cache(8), all_logits=True)
    for fmt in ("bfloat16", "q8_0o"):
        model = Model.load(model_dir(name), WORLD, "float32", comm_dtype=fmt)
        logits = model.forward(ids, model.new_cache(8), all_logits=True)
        root = WORLD.bcast(logits, root=0)
        assert everywhere(root.tobytes() == logits.tobytes())
        assert everywhere(0 < np.abs(logits - reference).max() < 0.1)
