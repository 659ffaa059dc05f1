"""Pipeline stages over real MPI (``mpirun -n P pytest``; CI runs P = 2, 3, 4, 8): Send/Recv between stages,
comm.Split within them. Stages per P: 2 -> 1x2, 3 -> 1x3, 4 -> 2x2 and 1x4, 8 -> 4x2 and 2x4 (TP x PP). Every rank
takes the same assert path (``everywhere``).
"""

import numpy as np
import pytest
from mpi4py import MPI

import dense_reference
from conftest import golden, model_dir
from mpitp import Sampler, Trace, comm, generate_batch, load_model
from mpitp.model import Model
from mpitp.pipeline import generate_stages
from random_models import write_random_model

WORLD = MPI.COMM_WORLD
LAYOUTS = {2: [2], 3: [3], 4: [2, 4], 8: [2, 4]}  # stage counts per rank count


def everywhere(ok):
    return WORLD.allreduce(bool(ok), op=MPI.LAND)


def stage_counts():
    return LAYOUTS.get(WORLD.size, [d for d in (2, 3) if WORLD.size % d == 0][:1])


def my_logits_match(model, trace, step, expected, rows=slice(None)):
    """On the last stage: this rank's columns of ``step``'s logits are ``expected``'s within 1e-9 (float64)."""
    if not model.stage.is_last:
        return True
    cols = model.shard.vocab_cols
    return np.abs(trace.arrays[f"step{step}/logits"][rows] - expected[..., cols]).max() <= 1e-9


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-gqa"])
def test_world_stages_match_hugging_face(name):
    # The goldens' models have 2 layers: 2 stages at most.
    g = golden(name)
    prompts = [g["prompt_L7"].tolist(), g["prompt_L33"].tolist(), g["prompt_L1"].tolist()]
    if WORLD.size % 2:
        pytest.skip("2-layer goldens: 2 stages, an even rank count")
    model = Model.load(model_dir(name), WORLD, "float64", pp=2)
    trace = Trace()
    out = generate_stages(model, prompts, 20, trace=trace)
    assert everywhere([r.token_ids for r in out] == [g[f"greedy_x64_L{L}"].tolist() for L in (7, 33, 1)])
    assert everywhere(my_logits_match(model, trace, 0, g["logits_x64_L33"], slice(7, 40)))
    steps = [my_logits_match(model, trace, s, g["step_logits_x64_L7"][s], 0) for s in range(1, 20)]
    assert everywhere(all(steps))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("preset", ["gpt2-6h", "llama-9h", "llama-mqa"])
def test_world_stages_match_the_dense_reference(tmp_path, preset):
    # 5 layers, which no stage count here divides; every rank writes the same seeded file for itself.
    layers = {"num_hidden_layers": 5} if preset.startswith("llama") else {"n_layer": 5}
    path = write_random_model(tmp_path / preset, preset, **layers)
    prompts = [[5, 80, 3, 3, 41, 7, 96, 0, 12], [4, 4], [9, 1, 8, 2]]
    expected = [dense_reference.dense_greedy(path, p, 8) for p in prompts]
    dense = dense_reference.dense_logits(path, prompts[0])
    for pp in stage_counts():
        model = Model.load(path, WORLD, "float64", pp=pp)
        trace = Trace()
        out = generate_stages(model, prompts, 8, trace=trace)
        assert everywhere([r.token_ids for r in out] == expected)
        assert everywhere(my_logits_match(model, trace, 0, dense, slice(0, 9)))


@pytest.mark.mpi(min_size=2)
def test_world_stages_sample_as_without_stages(tmp_path):
    path = write_random_model(tmp_path / "m", "llama-9h", num_hidden_layers=4)
    prompts = [[3, 1, 4], [1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]
    sampler = Sampler(0.8, top_p=0.9, seed=3)
    serial = [r.token_ids for r in generate_batch(load_model(path, comm.serial(), "float32"), prompts, 12, sampler)]
    for pp in stage_counts():
        model = Model.load(path, WORLD, "float32", pp=pp)
        assert everywhere([r.token_ids for r in generate_stages(model, prompts, 12, sampler)] == serial)
