"""The weight arena: one aligned buffer, handed out in order, and a loaded model laid out in read order."""

import numpy as np
import pytest

from conftest import model_dir
from mpitp import load_model
from mpitp.arena import Arena


def test_arrays_are_aligned_disjoint_and_in_order():
    shapes = [(3, 5), (7,), (2, 2, 2), (1,)]
    arena = Arena(Arena.size_of(shapes, np.float32))
    arrays = [arena.take(s, np.float32) for s in shapes]
    addresses = [a.ctypes.data for a in arrays]
    assert all(addr % 64 == 0 for addr in addresses)
    assert addresses == sorted(addresses)
    for a, b in zip(arrays, arrays[1:]):  # no overlap: each ends before the next begins
        assert a.ctypes.data + a.nbytes <= b.ctypes.data
    for i, a in enumerate(arrays):
        assert a.flags.c_contiguous and a.flags.writeable and a.dtype == np.float32
        a.fill(i)
    assert [float(a.ravel()[0]) for a in arrays] == [0.0, 1.0, 2.0, 3.0]  # writes did not clobber each other


def test_taking_more_than_the_arena_holds_fails():
    arena = Arena(Arena.size_of([(4,)], np.float64))
    arena.take((4,), np.float64)
    with pytest.raises(ValueError, match="cannot hold"):
        arena.take((1,), np.float64)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-gqa"])
def test_a_loaded_model_lies_in_one_buffer_in_the_order_a_forward_reads_it(name):
    m = load_model(model_dir(name))
    order = []
    for b in m.blocks:
        order += [b.norm_1_weight, b.W_QKV, b.W_B, b.norm_2_weight, b.W_C, b.W_D]
    order += [m.weights.norm_f_weight, m.weights.W_vocab]
    addresses = [a.ctypes.data for a in order]
    assert addresses == sorted(addresses)
    assert addresses[-1] - addresses[0] < m.weight_bytes  # one buffer, not scattered allocations


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-gqa"])
def test_the_bytes_checked_before_loading_are_the_bytes_held(name):
    from mpitp.config import load_config
    from mpitp.sharding import shard_for
    from mpitp.weights import shard_bytes
    m = load_model(model_dir(name))
    arrays = [a for b in m.blocks for a in vars(b).values() if a is not None] + [m.weights.norm_f_weight]
    head = m.weights.W_vocab  # its padding is held too: at most 15 values per row
    held = m.weight_bytes + head.shape[0] * (head.strides[0] - head.shape[1] * head.itemsize)
    planned = shard_bytes(load_config(model_dir(name)), shard_for(m.config, 0, 1), np.float32)
    assert 0 <= planned - held < 64 * (len(arrays) + 4)  # only the 64-byte alignment between arrays
