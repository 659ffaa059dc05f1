"""The model against its oracles, in one process: Hugging Face goldens, the dense reference, the serial path.

Tensor parallelism is exercised here on simulated ranks (threads sharing memory, see threadcomm.py);
test_mpi.py repeats the key checks over real MPI.
"""

import json
import shutil

import numpy as np
import pytest

import dense_reference
from conftest import MODELS, golden, model_dir
from mpitp import Sampler, Trace, comm, generate_sequence, load_model
from mpitp.config import load_config
from mpitp.families import FAMILIES
from mpitp.model import Model
from st_util import write_safetensors
from random_models import write_random_model
from threadcomm import allreduce_calls, run_ranks

LENGTHS = (1, 7, 33)
TOL = {"float64": 1e-9, "float32": 2e-4}


def prefill_logits(model, ids):
    return model.forward(ids, model.new_cache(len(ids)), all_logits=True)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_and_greedy_match_hugging_face(name, dtype):
    g = golden(name)
    model = load_model(model_dir(name), comm.serial(), dtype)
    for L in LENGTHS:
        logits = prefill_logits(model, g[f"prompt_L{L}"])
        assert logits.dtype == np.dtype(dtype)
        assert np.abs(logits - g[f"logits_x64_L{L}"]).max() <= TOL[dtype]
        assert generate_sequence(model, g[f"prompt_L{L}"], 20).token_ids == g[f"greedy_x64_L{L}"].tolist()


@pytest.mark.parametrize("name", MODELS)
def test_cached_decode_equals_recompute(name):
    # Logits of every decode step against the cache == logits of a full recompute of the whole sequence,
    # and both == HF's per-step logits.
    g = golden(name)
    model = load_model(model_dir(name), comm.serial(), "float64")
    prompt, tokens = g["prompt_L7"].tolist(), g["greedy_x64_L7"].tolist()
    cache = model.new_cache(len(prompt) + len(tokens))
    step_logits = [model.forward(prompt, cache)[-1]]
    for t in tokens[:-1]:
        step_logits.append(model.forward([t], cache)[-1])
    recomputed = prefill_logits(model, prompt + tokens[:-1])[len(prompt) - 1:]
    assert np.abs(np.array(step_logits) - recomputed).max() <= 1e-12
    assert np.abs(np.array(step_logits) - g["step_logits_x64_L7"]).max() <= 1e-9


@pytest.mark.parametrize("name", MODELS)
def test_matches_dense_reference(name):
    ids = golden(name)["prompt_L33"]
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
        model = load_model(model_dir(name), comm.serial(), dtype)
        expected = dense_reference.dense_logits(model_dir(name), ids, dtype=np.dtype(dtype).type)
        assert np.abs(prefill_logits(model, ids) - expected).max() <= tol


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("name", MODELS)
def test_tensor_parallel_equals_serial_at_every_rank_count(name, dtype, tol):
    # Every P from 2 to the number of query heads: 3 cuts gpt2-tiny's 4 heads and llama-gqa's groups of 4
    # query heads unevenly, 5..7 leave some ranks one head and others two.
    ids = golden(name)["prompt_L33"]
    serial = prefill_logits(load_model(model_dir(name), comm.serial(), dtype), ids)
    for size in range(2, load_config(model_dir(name)).n_head + 1):
        per_rank = run_ranks(size, lambda c: prefill_logits(load_model(model_dir(name), c, dtype), ids))
        for logits in per_rank:
            assert np.array_equal(logits, per_rank[0])  # replicated exactly
            assert np.abs(logits - serial).max() <= tol


@pytest.mark.parametrize("name", MODELS)
def test_tensor_parallel_greedy_at_every_rank_count(name):
    g = golden(name)
    for size in range(2, load_config(model_dir(name)).n_head + 1):
        outs = run_ranks(size, lambda c: generate_sequence(load_model(model_dir(name), c, "float32"),
                                                           g["prompt_L7"], 20).token_ids)
        assert all(o == g["greedy_x64_L7"].tolist() for o in outs)


@pytest.mark.parametrize("name", MODELS)
def test_two_allreduce_per_block_per_forward(name):
    # Two per block (after W_B and after W_D), and one for the vocab-parallel embedding; a prefill, then two decode
    # steps.
    for calls, n_layer in allreduce_calls(3, lambda c: load_model(model_dir(name), c, "float32")):
        assert calls == [2 * n_layer + 1] * 3


@pytest.mark.parametrize("name", MODELS)
def test_shards_tile_the_model_in_near_equal_blocks(name):
    cfg = load_config(model_dir(name))
    for size in range(1, cfg.n_head + 1):
        models = run_ranks(size, lambda c: load_model(model_dir(name), c, "float32"))
        heads, ffn, vocab = [], [], []
        for m in models:
            s, w, dh = m.shard, m.blocks[0], cfg.d_head
            heads.append(s.n_head_local)
            # W_QKV holds exactly this rank's query heads and the key/value heads they use
            used = {h // (cfg.n_head // cfg.n_kv_head) for h in range(s.head_start, s.head_start + s.n_head_local)}
            assert used == set(range(s.kv_head_start, s.kv_head_start + s.n_kv_head_local))
            assert w.W_QKV.shape == (cfg.n_embd, (s.n_head_local + 2 * s.n_kv_head_local) * dh)
            assert w.W_B.shape == (s.n_head_local * dh, cfg.n_embd)
            n_mlp_in = 2 if FAMILIES[cfg.family].gated else 1
            assert w.W_C.shape == (cfg.n_embd, n_mlp_in * s.n_ffn_local) and w.W_D.shape[0] == s.n_ffn_local
            ffn.append(s.n_ffn_local)
            vocab.append(m.weights.W_vocab.shape[1])
            assert m.weights.W_embed.shape == (s.n_vocab_local, cfg.n_embd)
            assert np.shares_memory(m.weights.W_embed, m.weights.W_vocab) == cfg.tie_word_embeddings
            # the LM head's rows start on cache lines: padded rows, the padding outside the view
            assert m.weights.W_vocab.strides[0] % 64 == 0
        # contiguous ranges in rank order, each of near-equal size, together the whole model once
        for counts, total in ((heads, cfg.n_head), (ffn, cfg.n_ffn), (vocab, cfg.n_vocab)):
            assert sum(counts) == total and max(counts) - min(counts) <= 1
        assert [m.shard.head_start for m in models] == list(np.cumsum([0] + heads[:-1]))


@pytest.mark.parametrize("name", MODELS)
def test_fast_layout_equals_plain_arrays(name):
    # The arena (huge pages, read order, padded LM-head rows) changes where weights live, never a value.
    ids = golden(name)["prompt_L33"]
    fast, plain = (load_model(model_dir(name), comm.serial(), "float64", arena=a) for a in (True, False))
    assert fast.weights.W_vocab.base is not None and plain.weights.W_vocab.strides[0] == 8 * plain.weights.W_vocab.shape[1]
    np.testing.assert_allclose(prefill_logits(fast, ids), prefill_logits(plain, ids), rtol=0, atol=1e-13)


def test_gpt2_hub_layout(tmp_path):
    # Hub checkpoints have no "transformer." prefix and carry attn.bias mask buffers to ignore.
    src = model_dir("gpt2-tiny")
    tensors = dense_reference.read_safetensors(f"{src}/model.safetensors")
    hub = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for layer in range(2):
        hub[f"h.{layer}.attn.bias"] = np.tril(np.ones((128, 128), np.float32))[None, None]
    write_safetensors(tmp_path / "model.safetensors", hub)
    shutil.copy(f"{src}/config.json", tmp_path)
    g = golden("gpt2-tiny")
    logits = prefill_logits(load_model(str(tmp_path), comm.serial(), "float64"), g["prompt_L7"])
    assert np.abs(logits - g["logits_x64_L7"]).max() <= 1e-9


def test_row_parallel_bias_is_added_once(tmp_path):
    # Make the row-parallel biases large: counting them P times would move the logits far.
    src = model_dir("gpt2-tiny")
    tensors = dense_reference.read_safetensors(f"{src}/model.safetensors")
    for key in tensors:
        if key.endswith("c_proj.bias"):
            tensors[key] = tensors[key] + 3.0
    write_safetensors(tmp_path / "model.safetensors", tensors)
    shutil.copy(f"{src}/config.json", tmp_path)
    ids = [3, 1, 4, 1, 5]
    expected = dense_reference.dense_logits(str(tmp_path), ids)
    for logits in run_ranks(4, lambda c: prefill_logits(load_model(str(tmp_path), c, "float64"), ids)):
        assert np.abs(logits - expected).max() <= 1e-12


def test_trace_records_every_named_tensor():
    g = golden("llama-gqa")
    model = load_model(model_dir("llama-gqa"), comm.serial(), "float64")
    trace = Trace()
    out = generate_sequence(model, g["prompt_L7"], 3, trace=trace)
    a = trace.arrays
    assert out.token_ids == g["greedy_x64_L7"][:3].tolist()
    assert a["step0/logits"].shape == (7, 258) and a["step2/logits"].shape == (1, 258)
    assert "step3/logits" not in a  # the last token needs no forward
    assert np.abs(a["step0/logits"] - g["logits_x64_L7"]).max() <= 1e-9
    assert np.abs(a["step1/logits"][0] - g["step_logits_x64_L7"][1]).max() <= 1e-9
    for s, n_seq in ((0, 7), (1, 1), (2, 1)):
        for layer in range(2):
            shapes = {k: a[f"step{s}/layer{layer}/{k}"].shape for k in "ABCDEQKV"}
            assert shapes == {"A": (n_seq, 64), "Q": (n_seq, 64), "K": (n_seq, 16), "V": (n_seq, 16),
                              "B": (n_seq, 64), "C": (n_seq, 64), "D": (n_seq, 176), "E": (n_seq, 64)}


def test_sampling_is_reproducible_and_tp_independent():
    g = golden("gpt2-tiny")

    def sample(c):
        model = load_model(model_dir("gpt2-tiny"), c, "float64")
        return generate_sequence(model, g["prompt_L7"], 15, Sampler(temperature=0.9, top_k=50, top_p=0.95, seed=7)).token_ids

    serial = sample(comm.serial())
    assert serial == sample(comm.serial())
    assert serial != generate_sequence(load_model(model_dir("gpt2-tiny"), comm.serial(), "float64"), g["prompt_L7"],
                              15).token_ids  # really sampling, not greedy
    for size in (2, 3, 4):
        assert run_ranks(size, sample) == [serial] * size


def test_generation_stops_at_eos(tmp_path):
    # Declare the golden continuation's 5th token as eos: generation must stop right after emitting it.
    g = golden("gpt2-tiny")
    expected = g["greedy_x64_L7"].tolist()
    eos = expected[4]
    shutil.copy(f"{model_dir('gpt2-tiny')}/model.safetensors", tmp_path)
    cfg = json.load(open(f"{model_dir('gpt2-tiny')}/config.json"))
    cfg["eos_token_id"] = eos
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_model(str(tmp_path), comm.serial(), "float64")
    out = generate_sequence(model, g["prompt_L7"], 20, stop_ids=model.config.eos_token_ids)
    assert out.token_ids == expected[:expected.index(eos) + 1] and out.finish_reason == "eos"


@pytest.mark.parametrize("name", ["gpt2-6h", "llama-mqa", "llama-9h"])
def test_random_models_at_every_rank_count(tmp_path, name):
    # Shapes the goldens lack: 6 heads (uneven at 4 and 5 ranks), multi-query attention, 9 query heads in 3
    # groups (SmolLM2's layout: uneven at 2, 4..8), uneven MLP split, tied Llama head, attention and MLP
    # biases, llama3 rope scaling.
    path = write_random_model(tmp_path / name, name)
    ids = [5, 80, 3, 3, 41, 7, 96, 0, 12]
    expected = dense_reference.dense_logits(path, ids)
    for size in range(1, load_config(path).n_head + 1):
        for logits in run_ranks(size, lambda c: prefill_logits(load_model(path, c, "float64"), ids)):
            assert np.abs(logits - expected).max() <= 1e-12


def test_mistral_is_llama_math_with_its_window_a_mask(tmp_path):
    src = model_dir("llama-gqa")
    cfg = json.load(open(f"{src}/config.json"))
    cfg.update(model_type="mistral", sliding_window=64)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(f"{src}/model.safetensors", tmp_path)
    mistral = load_model(str(tmp_path), comm.serial(), "float64")
    # The window is a mask (tests/test_families.py checks it against Hugging Face), not a cap on the context;
    # a prompt within it is plain causal attention.
    assert mistral.config.n_ctx == cfg["max_position_embeddings"] and mistral.windows == (64,) * cfg["num_hidden_layers"]
    g = golden("llama-gqa")
    assert np.abs(prefill_logits(mistral, g["prompt_L33"]) - g["logits_x64_L33"]).max() <= 1e-9


def test_qwen2_has_biases_on_q_k_v_only(tmp_path):
    # A Qwen2 checkpoint (q/k/v biases, no o_proj bias) equals a Llama with attention_bias and a zero o bias.
    src = write_random_model(tmp_path / "src", "llama-mqa")
    tensors = dense_reference.read_safetensors(f"{src}/model.safetensors")
    cfg = json.load(open(f"{src}/config.json"))
    qwen_dir, ref_dir = tmp_path / "qwen2", tmp_path / "ref"
    qwen_dir.mkdir()
    ref_dir.mkdir()
    qwen = {k: v for k, v in tensors.items() if not (k.endswith("o_proj.bias") or k.endswith("mlp.gate_proj.bias")
                                                      or k.endswith("mlp.up_proj.bias")
                                                      or k.endswith("mlp.down_proj.bias"))}
    write_safetensors(qwen_dir / "model.safetensors", qwen)
    (qwen_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2", "mlp_bias": False,
                                                      "attention_bias": None}))
    ref = dict(qwen, **{k: np.zeros_like(v) for k, v in tensors.items() if k not in qwen})
    write_safetensors(ref_dir / "model.safetensors", ref)
    (ref_dir / "config.json").write_text(json.dumps({**cfg, "attention_bias": True, "mlp_bias": True}))
    ids = [4, 8, 15, 16, 23, 42]
    for size in (1, 2, 3):
        for logits in run_ranks(size, lambda c: prefill_logits(load_model(str(qwen_dir), c, "float64"), ids)):
            assert np.abs(logits - dense_reference.dense_logits(str(ref_dir), ids)).max() <= 1e-12


def test_gathered_logits_are_whole_contiguous_rows():
    # llama-gqa's vocabulary (258) is not a multiple of the head's 16-column padding: the padded columns must
    # not leak into the logits, and the gathered logits are plain C-contiguous rows.
    def run(c):
        m = load_model(model_dir("llama-gqa"), c, "float64")
        return m.forward([1, 2, 3], m.new_cache(4), all_logits=True)

    serial = run(comm.serial())
    assert serial.flags.c_contiguous
    for logits in run_ranks(3, run):
        assert logits.shape == (3, 258) and logits.flags.c_contiguous
        np.testing.assert_allclose(logits, serial, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", MODELS)
def test_a_long_prompt_in_chunks_equals_one_pass(name, dtype, monkeypatch):
    # Chunked prefill (bounded attention memory) gives the logits of the prompt in one pass, and the HF goldens.
    g, model = golden(name), load_model(model_dir(name), comm.serial(), dtype)
    ids = g["prompt_L33"]
    whole = prefill_logits(model, ids)
    chunks = []
    monkeypatch.setattr("mpitp.model.SCORES_BYTES", 1)  # one position per chunk
    run = Model.forward_chunk
    monkeypatch.setattr(Model, "forward_chunk", lambda self, *a: chunks.append(1) or run(self, *a))
    chunked = prefill_logits(model, ids)
    assert len(chunks) == len(ids)
    assert np.abs(chunked - whole).max() <= {"float64": 1e-12, "float32": 1e-5}[dtype]
    assert np.abs(chunked - g["logits_x64_L33"]).max() <= TOL[dtype]


@pytest.mark.parametrize("positions_per_chunk", [None, 1, 5])
def test_logits_from_a_position_are_those_rows_of_all_logits(positions_per_chunk, monkeypatch):
    # Scoring's forward: the LM head only from ``logits_from`` on, in a batch, whole or in chunks of positions
    # (before, inside and across the first scored one), against the HF goldens' all-position logits.
    g, model = golden("llama-gqa"), load_model(model_dir("llama-gqa"), comm.serial(), "float64")
    ids = np.asarray(g["prompt_L33"])
    if positions_per_chunk is not None:
        monkeypatch.setattr(Model, "prefill_chunk", lambda self, n_batch, n_kv: positions_per_chunk)
    for start in (0, 7, len(ids) - 1, len(ids)):
        logits = model.forward([ids, ids], model.new_cache(len(ids), 2), all_logits=True, logits_from=start)
        assert logits.shape == (2, len(ids) - start, model.config.n_vocab)
        assert np.abs(logits - g["logits_x64_L33"][start:]).max(initial=0) <= TOL["float64"]


def test_the_trace_does_not_mask_an_error_inside_a_block(monkeypatch):
    # A frame that an exception unwinds "returns" too, with B unset: the hook said KeyError: 'B' instead.
    model = load_model(model_dir("gpt2-tiny"), comm.serial())

    def attention(*args):
        raise MemoryError("no memory for the scores")

    monkeypatch.setattr("mpitp.model.attention", attention)
    with pytest.raises(MemoryError, match="no memory for the scores"), Trace():
        model.forward([1, 2, 3], model.new_cache(3))


def test_the_trace_contract_is_the_block_locals():
    # The trace reads these locals of every block function by name: a renamed local would break --trace.
    from mpitp import trace
    from mpitp.model import Model
    for code, names in trace._BLOCKS.items():
        assert set(names) | {"layer"} <= set(code.co_varnames), code.co_name
    assert {Model.block.__code__, Model.block_normed.__code__, Model.block_parallel.__code__,
            Model.block_moe.__code__} == set(trace._BLOCKS)
    assert "A, Q, K, V, B, C, D, E" in Model.block.__doc__


def test_the_readme_quotes_the_block_as_the_code_has_it():
    # The README shows Model.block whole, as the diagram in code: a change to one must change the other.
    import inspect
    import re
    from conftest import REPO
    quoted = re.search(r"```python\n(    def block\(self.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    assert quoted == inspect.getsource(Model.block)
