"""Mixtures of experts over real MPI (``mpirun -n P pytest -m mpi``): the expert layout's Alltoall, Alltoallv and
Allgatherv, and the tensor layout's Allreduce, against the serial path (one rank, the very same code, checked
against Hugging Face's classes in tests/test_moe.py). Random OLMoE (QK-norm across the ranks) and Qwen2-MoE (a
shared expert) folders of 8 query heads and 7 experts: the experts split unevenly at every P from 2 to 8, and at 8
ranks one rank owns none. No torch needed: every rank writes the same seeded folder itself."""

import json

import numpy as np
import pytest
from mpi4py import MPI

from mpitp import comm, generate_sequence, load_model
from mpitp.config import config_from_dict
from mpitp.weights import checkpoint_shapes
from st_util import write_safetensors

WORLD = MPI.COMM_WORLD
CONFIGS = {
    "olmoe": dict(model_type="olmoe", num_experts=7, intermediate_size=24),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=7, moe_intermediate_size=24, intermediate_size=24,
                      shared_expert_intermediate_size=40),
}
PROMPT = [5, 88, 13, 2, 61, 40, 7, 19, 33, 71, 4]


def random_moe(path, name):
    """A folder of ``CONFIGS[name]`` with seeded random weights, its tensors named and shaped as mpitp reads them."""
    cfg = dict(CONFIGS[name], hidden_size=64, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=2,
               num_experts_per_tok=2, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=False)
    rng = np.random.default_rng(7)
    tensors = {name: (1 + 0.2 * rng.standard_normal(shape) if "norm" in name else 0.2 * rng.standard_normal(shape))
               for name, shape in checkpoint_shapes(config_from_dict(cfg)).items()}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    write_safetensors(path / "model.safetensors", {k: v.astype(np.float32) for k, v in tensors.items()})
    return str(path)


def everywhere(ok):
    """True only if ``ok`` holds on every rank (so all ranks take the same assert)."""
    return WORLD.allreduce(bool(ok), op=MPI.LAND)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", ["tensor", "expert"])
@pytest.mark.parametrize("name", CONFIGS)
def test_world_logits_and_greedy_equal_serial_in_both_layouts(tmp_path, name, layout):
    if WORLD.size > 8:
        pytest.skip(f"8 query heads cannot be split over {WORLD.size} ranks")
    path = random_moe(tmp_path / name, name)
    model, serial = load_model(path, WORLD, "float64", experts=layout), load_model(path, comm.serial(), "float64")
    logits = model.forward(PROMPT, model.new_cache(len(PROMPT)), all_logits=True)
    expected = serial.forward(PROMPT, serial.new_cache(len(PROMPT)), all_logits=True)
    assert everywhere(np.abs(logits - expected).max() <= 1e-10)
    assert everywhere(np.array_equal(WORLD.bcast(logits, root=0), logits))  # every rank the same logits
    tokens = generate_sequence(model, PROMPT, 10).token_ids
    assert everywhere(tokens == generate_sequence(serial, PROMPT, 10).token_ids)
    held = WORLD.allgather(model.shard.n_expert_local)
    assert everywhere(held == ([7] * WORLD.size if layout == "tensor" else
                               [len(range(r, 7, WORLD.size)) for r in range(WORLD.size)]))
