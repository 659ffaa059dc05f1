"""Pipeline stages (``--pp``) on simulated ranks (threads, see threadcomm.py): the same tokens and float64 logits as
without stages and as Hugging Face's (the goldens) or the dense reference, at TP x PP = 1x2, 2x2, 1x3, 3x2 and
layer counts the stages do not divide; each stage holding and reading only its layers; the layout and its checks.
test_mpi_pipeline.py repeats the key checks over real MPI.
"""

import threading

import numpy as np
import pytest

import dense_reference
from conftest import golden, model_dir
from mpitp import Sampler, Trace, comm, load_model
from mpitp.checkpoint import Checkpoint
from mpitp.errors import MpitpError
from mpitp.generation import generate_batch
from mpitp.kvcache import KVCache
from mpitp.model import Model
from mpitp.pipeline import generate_stages, micro_batches
from mpitp.stages import stage_layers
from random_models import write_random_model
from threadcomm import run_ranks


def staged(path, size, pp, fn, pp_layers=None, dtype="float64"):
    """``fn(model)`` on ``size`` simulated ranks forming ``pp`` stages, per rank."""
    return run_ranks(size, lambda c: fn(Model.load(path, c, dtype, pp=pp, pp_layers=pp_layers)))


def traced(model, prompts, n_new, **kw):
    trace = Trace()
    out = generate_stages(model, prompts, n_new, trace=trace, **kw)
    return [r.token_ids for r in out], [r.finish_reason for r in out], trace.arrays, model.stage, model.shard


def stage_logits(per_rank, step):
    """The last stage's logits of ``step`` (its tensor-parallel ranks' columns side by side), from ``traced``."""
    last = [r for r in per_rank if r[3].is_last]
    return np.concatenate([r[2][f"step{step}/logits"] for r in sorted(last, key=lambda r: r[4].vocab_start)], -1)


@pytest.mark.parametrize("size, pp", [(2, 2), (4, 2)], ids=["1x2", "2x2"])
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-gqa"])
def test_stages_match_hugging_face(name, size, pp):
    # The goldens' models have 2 layers: a stage each. Greedy tokens of three prompts in one batch (two
    # micro-batches), and the float64 logits of the prefill (every position) and of each decode step.
    g = golden(name)
    prompts = [g["prompt_L33"].tolist(), g["prompt_L7"].tolist(), g["prompt_L1"].tolist()]
    per_rank = staged(model_dir(name), size, pp, lambda m: traced(m, prompts, 20))
    for tokens, *_ in per_rank:
        assert tokens == [g[f"greedy_x64_L{L}"].tolist() for L in (33, 7, 1)]
    prefill = stage_logits(per_rank, 0)  # the rows of every position of the three prompts, in order
    assert np.abs(prefill[:33] - g["logits_x64_L33"]).max() <= 1e-9
    steps = np.array([stage_logits(per_rank, s)[1] for s in range(1, 20)])  # prompt L7 is the second row
    assert np.abs(steps - g["step_logits_x64_L7"][1:20]).max() <= 1e-9


@pytest.mark.parametrize("size, pp, pp_layers", [(2, 2, None), (3, 3, None), (4, 2, None), (6, 2, None),
                                                 (3, 3, [1, 3, 1]), (2, 2, [4, 1])],
                         ids=["1x2", "1x3", "2x2", "3x2", "1x3-given", "1x2-given"])
@pytest.mark.parametrize("preset", ["gpt2-6h", "llama-9h", "llama-mqa"])
def test_stages_match_the_dense_reference(tmp_path, preset, size, pp, pp_layers):
    # 5 layers: no stage count here divides them. llama-mqa ties its LM head to the embedding (both the first and
    # the last stage read it); llama-9h's 9 heads split unevenly over 2 and 4 ranks.
    layers = {"num_hidden_layers": 5} if preset.startswith("llama") else {"n_layer": 5}
    path = write_random_model(tmp_path / preset, preset, **layers)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3], [8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2]]
    per_rank = staged(path, size, pp, lambda m: traced(m, prompts, 6), pp_layers)
    expected = [dense_reference.dense_greedy(path, p, 6) for p in prompts]
    assert all(tokens == expected for tokens, *_ in per_rank)
    prefill = stage_logits(per_rank, 0)
    dense = np.concatenate([dense_reference.dense_logits(path, p) for p in prompts])
    assert np.abs(prefill - dense).max() <= 1e-9
    counts = [r[3].n_layer_local for r in per_rank[::size // pp]]
    assert counts == (pp_layers or counts) and sum(counts) == 5


@pytest.mark.parametrize("sliding, pp_layers", [([0, 2], None), ([2], [2, 2])], ids=["both-stages", "later-stage"])
def test_a_prompt_longer_than_a_window_and_a_chunk_gives_the_same_logits_as_without_stages(tmp_path, sliding,
                                                                                        pp_layers):
    # Window 4: a sliding layer's ring holds 4 - 1 + 128 positions, so a 150-token prompt must go through every
    # stage in chunks of at most 128. Before, the first stage cut it by memory alone (one piece of 150): the ring
    # overwrote keys that earlier positions still needed, and the full-attention layer after it read their
    # garbage (NaN: an "overflow" error; or other tokens with status 0). In "later-stage" the first stage holds
    # no sliding layer, so its own cache sets no limit: the whole model's layers must.
    kinds = ["sliding_attention" if i in sliding else "full_attention" for i in range(4)]
    path = write_random_model(tmp_path / "m", "llama-9h", model_type="mistral", sliding_window=4, layer_types=kinds,
                              max_position_embeddings=256, num_hidden_layers=4)
    prompt = [(i * 7) % 97 for i in range(150)]
    model = Model.load(path, comm.serial(), "float64")
    expected = model.forward(prompt, model.new_cache(160))
    alone = generate_batch(model, [prompt], 8)[0].token_ids
    per_rank = staged(path, 2, 2, lambda m: traced(m, [prompt], 8), pp_layers)
    assert all(tokens == [alone] for tokens, *_ in per_rank)
    assert np.abs(stage_logits(per_rank, 0)[-1] - expected).max() <= 1e-9


def test_a_ring_refuses_more_new_tokens_than_its_chunk():
    # The guard behind the test above: a forward that gave a sliding layer's ring more new tokens than it takes
    # raises, where it used to overwrite keys still needed and go on with wrong values.
    cache = KVCache(1, 1, 1, 2, 200, np.float64, windows=(4,))
    assert cache.chunk == 128
    cache.update(0, np.ones((128, 1, 2)), np.ones((128, 1, 2)))
    with pytest.raises(RuntimeError, match="129 new tokens in one forward; a sliding layer's ring takes 128"):
        cache.update(0, np.ones((129, 1, 2)), np.ones((129, 1, 2)))


@pytest.mark.parametrize("size", [1, 2])
def test_one_stage_of_every_layer_is_no_pipeline(size):
    # --pp-layers 2 on a 2-layer model: one stage, so no pipeline at all, and the goldens' tokens. Before, the
    # model held a stage that was both first and last, and its rows went to a next stage that does not exist.
    g = golden("gpt2-tiny")

    def run(c):
        model = Model.load(model_dir("gpt2-tiny"), c, "float64", pp_layers=[2])
        return model.stage, generate_batch(model, [g["prompt_L7"].tolist()], 20)[0].token_ids

    for stage, tokens in run_ranks(size, run):
        assert stage is None and tokens == g["greedy_x64_L7"].tolist()


def test_sampling_gives_the_same_tokens_as_without_stages(tmp_path):
    path = write_random_model(tmp_path / "m", "llama-9h", num_hidden_layers=3)
    prompts = [[3, 1, 4], [1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]
    for sampler in (Sampler(0.9, seed=7), Sampler(1.3, top_k=5, seed=1), Sampler(0.7, top_p=0.8, seed=3)):
        serial = [r.token_ids for r in generate_batch(load_model(path, comm.serial(), "float32"), prompts, 12,
                                                      sampler)]
        for size, pp in ((2, 2), (3, 3), (4, 2)):
            out = staged(path, size, pp, lambda m: [r.token_ids for r in generate_stages(m, prompts, 12, sampler)],
                         dtype="float32")
            assert all(tokens == serial for tokens in out), (sampler.__dict__, size, pp)


def test_sequences_that_stop_leave_their_micro_batch(tmp_path):
    # Stop ids that end some sequences early, in different micro-batches and steps: each sequence gets what it
    # gets alone, and every rank learns where each ended.
    path = write_random_model(tmp_path / "m", "gpt2-6h", n_layer=4)
    prompts = [[3, 1, 4], [1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7], [2, 7]]
    alone = [generate_batch(load_model(path, comm.serial(), "float64"), [p], 10)[0].token_ids for p in prompts]
    stops = {alone[1][3], alone[3][1]}
    expected = [generate_batch(load_model(path, comm.serial(), "float64"), [p], 10, stop_ids=stops)[0]
                for p in prompts]
    assert any(r.finish_reason == "eos" for r in expected) and any(r.finish_reason == "length" for r in expected)
    for n_micro in (None, 1, 5):
        out = staged(path, 4, 2, lambda m: [(r.token_ids, r.finish_reason) for r in
                                             generate_stages(m, prompts, 10, stop_ids=stops, n_micro=n_micro)])
        assert all(o == [(r.token_ids, r.finish_reason) for r in expected] for o in out)


def test_no_new_tokens_is_the_prefill_alone(tmp_path):
    out = staged(model_dir("gpt2-tiny"), 2, 2, lambda m: [r.token_ids for r in generate_stages(m, [[1, 2]], 0)])
    assert out == [[[]], [[]]]


def test_a_stage_holds_and_reads_only_its_layers(tmp_path, monkeypatch):
    path = write_random_model(tmp_path / "m", "gpt2-6h", n_layer=5)
    read = {}  # thread (simulated rank) -> the tensors it read
    original = Checkpoint.read_into

    def recording(self, name, *args, **kwargs):
        read.setdefault(threading.get_ident(), []).append(name)
        return original(self, name, *args, **kwargs)

    whole = load_model(path, comm.serial(), "float32")
    monkeypatch.setattr(Checkpoint, "read_into", recording)
    models = run_ranks(3, lambda c: Model.load(path, c, "float32", pp=3, pp_layers=[2, 2, 1]))
    assert [list(m.stage.layers) for m in models] == [[0, 1], [2, 3], [4]]
    assert [len(m.blocks) for m in models] == [2, 2, 1]
    first, middle, last = (m.weights for m in models)
    assert first.W_pos is not None and last.W_pos is None and last.norm_f_weight is not None
    assert middle.W_embed is None and middle.W_vocab is None and middle.W_pos is None and first.norm_f_weight is None
    # GPT-2 ties its LM head to the embedding: the first and the last stage both hold it, the rest once.
    assert sum(m.weight_bytes for m in models) == whole.weight_bytes + first.W_vocab.nbytes
    assert [len(m.new_cache(8).K) for m in models] == [2, 2, 1]  # a cache of its layers only
    layers = sorted(sorted({int(n.split(".")[2]) for n in names if ".h." in n}) for names in read.values())
    assert layers == [[0, 1], [2, 3], [4]]
    assert sorted("transformer.wte.weight" in names for names in read.values()) == [False, True, True]


def test_layer_ranges_are_near_equal_in_bytes():
    # 12 layers of 10 bytes; the embedding weighs 2.5 layers, the LM head 1.5: the end stages get fewer layers
    # (3, 5, 4 hold 55, 50, 55 bytes: no split holds less in its largest stage).
    assert stage_layers(12, 1, 10, 0, 0) == (12,)
    assert stage_layers(12, 3, 10, 0, 0) == (4, 4, 4)
    assert stage_layers(12, 2, 10, 25, 0) == (5, 7)
    assert stage_layers(12, 3, 10, 25, 15) == (3, 5, 4)
    assert stage_layers(5, 5, 10, 99, 99) == (1, 1, 1, 1, 1)
    assert stage_layers(12, 2, 10, 25, 0, given=[6, 6]) == (6, 6)


@pytest.mark.parametrize("size, pp, given, expected", [
    (2, 3, None, "--pp 3: 2 ranks (mpirun -n 2) cannot form 3 pipeline stages of equally many ranks; use --pp 1, 2."),
    (3, 2, None, "--pp 2: 3 ranks (mpirun -n 3) cannot form 2 pipeline stages of equally many ranks; use --pp 1, 3."),
    (3, 3, None, "--pp 3: more pipeline stages than the model's 2 layers; use --pp 1 to 2."),
    (2, 2, [1, 2], "--pp-layers 1,2: give 2 counts of at least 1 layer each (one per stage), summing to the "
                   "model's 2 layers."),
    (2, 2, [2, 0], "--pp-layers 2,0: give 2 counts"),
    (2, 1, [3], "--pp-layers 3: give 1 count of at least 1 layer each (one per stage), summing to the model's 2 "
                "layers."),
    (10, 2, None, "cannot run this model on stages of 5 ranks (mpirun -n 10 --pp 2): each rank needs at least one "
                  "of its 4 attention heads; use a --pp that leaves 1 to 4 ranks a stage."),
])
def test_layouts_that_cannot_work_are_refused(size, pp, given, expected):
    def load(c):
        try:
            Model.load(model_dir("gpt2-tiny"), c, pp=pp, pp_layers=given)
        except MpitpError as e:
            return str(e)

    assert all(expected in message for message in run_ranks(size, load))


def test_micro_batches_are_consecutive_groups():
    assert micro_batches(4, 2) == [(0, 2), (2, 2)]
    assert micro_batches(5, 2) == [(0, 3), (3, 2)]
    assert micro_batches(1, 3) == [(0, 1)]
    assert micro_batches(5, 2, 5) == [(i, 1) for i in range(5)]
