"""Config parsing, the rank-count rule and shard ranges, and the strict safetensors reader."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from conftest import model_dir
from mpitp import CheckpointError, ConfigError, ShardingError, comm, load_model
from mpitp.checkpoint import Checkpoint, SafetensorsFile
from mpitp.config import config_from_dict, load_config
from mpitp.families import FAMILIES
from mpitp.weights import checkpoint_shapes, n_params
from mpitp.sharding import block_range, check_rank_count, rank_slice, shard_for
from st_util import CORRUPTIONS, corrupt, valid_file_parts, write_raw, write_safetensors, write_sharded


def gpt2_124m():
    return config_from_dict({"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12,
                             "n_positions": 1024, "vocab_size": 50257})


def llama(heads, kv, **extra):
    return config_from_dict({"model_type": "llama", "hidden_size": 64 * heads, "num_attention_heads": heads,
                             "num_key_value_heads": kv, "num_hidden_layers": 2, "intermediate_size": 300,
                             "vocab_size": 100, "max_position_embeddings": 64, **extra})


# --- config -------------------------------------------------------------------------------------------

def test_gpt2_config_fields():
    c = gpt2_124m()
    assert (c.n_embd, c.n_head, c.d_head, c.n_ffn, c.n_kv_head, c.n_ctx) == (768, 12, 64, 3072, 12, 1024)
    assert n_params(c) == 124_439_808  # GPT-2 small as published, tied head counted once


def test_llama_config_both_rope_layouts():
    v5 = load_config(model_dir("llama-gqa"))
    assert (v5.n_head, v5.n_kv_head, v5.d_head, v5.rope.theta) == (8, 2, 8, 500000.0)
    v4 = llama(8, 2, rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192})
    assert (v4.rope.theta, v4.rope.scaling, v4.rope.factor) == (5e5, "llama3", 8.0)
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        llama(8, 2, rope_scaling={"rope_type": "yarn", "factor": 4.0})


NEOX = {"model_type": "gpt_neox", "hidden_size": 48, "num_attention_heads": 6, "num_hidden_layers": 2,
        "vocab_size": 10, "max_position_embeddings": 8}


def test_gpt_neox_config_both_rotary_layouts():
    # transformers 4 writes rotary_pct and rotary_emb_base; transformers 5 rope_parameters; the defaults are
    # Pythia's: a quarter of each head turned, the parallel block, biases, an untied head.
    c4 = config_from_dict({**NEOX, "rotary_pct": 0.5, "rotary_emb_base": 5000, "rope_scaling": None})
    c5 = config_from_dict({**NEOX, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0,
                                                       "partial_rotary_factor": 0.5}})
    assert c4 == c5 and (c4.rotary_dims, c4.rope.theta) == (4, 5000.0)
    d = config_from_dict(NEOX)
    assert (d.rotary_dims, d.parallel_residual, d.qkv_bias, d.tie_word_embeddings, d.activation) == (
        2, True, True, False, "gelu")


@pytest.mark.parametrize("cfg, message", [
    ({"model_type": "bert"}, "model_type 'bert' is not supported"),
    ({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 10}, "'n_positions' is missing"),
    ({"model_type": "gpt2", "n_embd": 64, "n_head": 3, "n_layer": 2, "vocab_size": 10, "n_positions": 8},
     "not divisible by n_head"),
    ({"model_type": "gpt2", "n_embd": -64, "n_head": 4, "n_layer": 2, "vocab_size": 10, "n_positions": 8},
     "'n_embd' must be a positive integer"),
    ({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 10, "n_positions": 8,
      "activation_function": "relu"}, "activation 'relu' is not supported"),
    ([1, 2], "expected a JSON object"),
    ({**NEOX, "rotary_pct": 0.1}, r"the rotary fraction 0.1 of head_dim=8 must turn an even number"),
    ({**NEOX, "rope_parameters": {"partial_rotary_factor": 1.5}}, r"rotary fraction 1.5 .* in \(0, 1\]"),
    ({**NEOX, "use_parallel_residual": 1}, "'use_parallel_residual' must be true or false"),
    ({**NEOX, "hidden_act": "relu"}, "activation 'relu' is not supported for gpt_neox"),
])
def test_bad_configs_are_refused_by_name(cfg, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(cfg)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="model folder not found"):
        load_config(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="config.json: file not found"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable as JSON"):
        load_config(str(tmp_path))


# --- the sharding plan --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-gqa"])
def test_plan_names_every_checkpoint_tensor(name):
    # The family's plan, expanded over the layers, is exactly what the checkpoint holds: nothing left unread.
    config, ckpt = load_config(model_dir(name)), Checkpoint(model_dir(name))
    prefix = "transformer." if "transformer.wte.weight" in ckpt else ""
    assert checkpoint_shapes(config, prefix) == {n: tuple(ckpt.shape(n)) for n in ckpt.names()}


@pytest.mark.parametrize("config", [gpt2_124m(), llama(6, 2)], ids=["gpt2", "llama"])
def test_which_rows_of_W_D_rank_2_of_3_holds(config):
    # One table (the plan: W_D is rowwise) and one function (rank_slice) answer it, for every family that has W_D.
    for family in FAMILIES.values():
        rows = {row[1]: row[2] for row in family.plan}
        if "W_D" not in rows:
            continue
        first, cols = rank_slice(config, shard_for(config, 2, 3), "W_D", rows["W_D"])
        assert rows["W_D"] == "rowwise" and cols == slice(0, config.n_embd)
        assert (first.start, first.stop - first.start) == block_range(config.n_ffn, 3, 2)
        if "b_D" in rows:  # added once, after the reduction: every rank holds it whole
            assert rank_slice(config, shard_for(config, 2, 3), "b_D", rows["b_D"]) == (slice(0, config.n_embd),)


# --- rank counts and shards ---------------------------------------------------------------------------

def test_rank_count_limit_is_the_query_heads():
    for size in range(1, 13):
        check_rank_count(gpt2_124m(), size)  # any P up to the 12 heads, dividing or not
    with pytest.raises(ShardingError, match=r"13 ranks \(mpirun -n 13\): each rank needs at least one of its 12 "
                                            r"attention heads; use -n 1 to 12\."):
        check_rank_count(gpt2_124m(), 13)
    # a narrower MLP than the heads: the message names what binds (before: the heads, with "use -n 1 to 2")
    narrow = dataclasses.replace(gpt2_124m(), n_ffn=2)
    with pytest.raises(ShardingError, match=r"3 ranks \(mpirun -n 3\): each rank needs at least one of its 2 MLP "
                                            r"columns; use -n 1 to 2\."):
        check_rank_count(narrow, 3)
    with pytest.raises(ShardingError, match=r"stages of 13 ranks \(mpirun -n 26 --pp 2\): each rank needs at least "
                                            r"one of its 12 attention heads; use a --pp that leaves 1 to 12 ranks"):
        check_rank_count(gpt2_124m(), 13, stages=2)


@pytest.mark.parametrize("heads, kv", [(8, 8), (8, 2), (8, 1), (12, 4), (9, 3), (15, 5), (32, 8)])
def test_every_query_head_sees_its_own_kv_head(heads, kv):
    cfg = llama(heads, kv)
    group = heads // kv
    for size in range(1, heads + 1):
        owned = []
        for rank in range(size):
            s = shard_for(cfg, rank, size)
            owned += range(s.head_start, s.head_start + s.n_head_local)
            needed = [h // group for h in range(s.head_start, s.head_start + s.n_head_local)]
            assert sorted(set(needed)) == list(range(s.kv_head_start, s.kv_head_start + s.n_kv_head_local))
            # attention's runs map every local query head to its key/value head, and nothing else
            mapped = [k for h0, h1, k0, k1 in s.head_runs for k in range(k0, k1) for _ in range((h1 - h0) // (k1 - k0))]
            assert [s.kv_head_start + k for k in mapped] == needed
        assert owned == list(range(heads))  # each query head on exactly one rank


def test_uneven_split_of_smollm2_heads():
    # 9 query heads in 3 groups over 2 ranks: 5 and 4 heads; the middle group is cut, so both hold its KV head.
    cfg = llama(9, 3)
    r0, r1 = shard_for(cfg, 0, 2), shard_for(cfg, 1, 2)
    assert (r0.head_start, r0.n_head_local, r0.kv_head_start, r0.n_kv_head_local) == (0, 5, 0, 2)
    assert (r1.head_start, r1.n_head_local, r1.kv_head_start, r1.n_kv_head_local) == (5, 4, 1, 2)
    assert r0.head_runs == ((0, 3, 0, 1), (3, 5, 1, 2)) and r1.head_runs == ((0, 1, 0, 1), (1, 4, 1, 2))


def test_block_range_tiles_evenly():
    for n, size in ((10, 3), (176, 8), (5, 5), (3072, 12)):
        parts = [block_range(n, size, r) for r in range(size)]
        assert [s for s, _ in parts] == [sum(c for _, c in parts[:r]) for r in range(size)]
        assert sum(c for _, c in parts) == n and max(c for _, c in parts) - min(c for _, c in parts) <= 1


# --- checkpoint reading -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_malformed_headers_raise_checkpoint_error(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    write_raw(path, *corrupt(kind))
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value)


def test_valid_file_reads_slices(tmp_path):
    path = tmp_path / "model.safetensors"
    write_raw(path, *valid_file_parts())
    f = SafetensorsFile(path)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    for index in [(), (slice(None), slice(1, 3)), (slice(1, 2),), (slice(0, 2), slice(0, 1))]:
        for dtype in (np.float32, np.float64):
            part = f.read("a", dtype, index)
            assert part.dtype == dtype and part.flags.c_contiguous and np.array_equal(part, a[index])
    assert np.array_equal(f.read("b", np.float32, (slice(1, 3),)), [1, 1])
    assert f.metadata == {}


def test_truncated_file_is_refused(tmp_path):
    header, data = valid_file_parts()
    write_raw(tmp_path / "model.safetensors", header, data[:-5])
    with pytest.raises(CheckpointError):
        SafetensorsFile(tmp_path / "model.safetensors")


@pytest.mark.parametrize("chunk_bytes", [None, 512])
def test_bf16_and_f16_checkpoints_load_as_their_float32_values(tmp_path, monkeypatch, chunk_bytes):
    # With 512-byte chunks every tensor is read in many chunks through the one reused scratch buffer (and rows
    # longer than a chunk through fresh ones): the values must not depend on how a read was cut up.
    import dense_reference
    from mpitp import checkpoint
    if chunk_bytes:
        monkeypatch.setattr(checkpoint, "CHUNK_BYTES", chunk_bytes)
    src = model_dir("llama-gqa")
    tensors = dense_reference.read_safetensors(f"{src}/model.safetensors")
    shutil.copy(f"{src}/config.json", tmp_path)
    ids = [5, 6, 7]
    for kind in ("bf16", "f16"):
        if kind == "bf16":
            write_safetensors(tmp_path / "model.safetensors", tensors, bf16=set(tensors))
        else:
            write_safetensors(tmp_path / "model.safetensors", {k: v.astype(np.float16) for k, v in tensors.items()})
        expected = dense_reference.dense_logits(str(tmp_path), ids)  # the oracle reads the same rounded file
        model = load_model(str(tmp_path), comm.serial(), "float64")
        logits = model.forward(ids, model.new_cache(3), all_logits=True)
        assert np.abs(logits - expected).max() <= 1e-12


def test_multi_file_checkpoint_matches_single_file(tmp_path):
    import dense_reference
    src = model_dir("llama-gqa")
    tensors = dense_reference.read_safetensors(f"{src}/model.safetensors")
    write_sharded(tmp_path, tensors)
    shutil.copy(f"{src}/config.json", tmp_path)
    ids = [1, 2, 3, 4]
    single = load_model(src, comm.serial(), "float64")
    multi = load_model(str(tmp_path), comm.serial(), "float64")
    assert np.array_equal(single.forward(ids, single.new_cache(4)), multi.forward(ids, multi.new_cache(4)))


def test_index_errors(tmp_path):
    index = {"weight_map": {"x": "../outside.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lies outside the model folder"):
        Checkpoint(tmp_path)
    index["weight_map"]["x"] = "missing.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard file not found"):
        Checkpoint(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle checkpoints are refused.*safetensors"):
        Checkpoint(tmp_path)


def test_missing_or_misshapen_tensor_is_named(tmp_path):
    import dense_reference
    src = model_dir("gpt2-tiny")
    tensors = dense_reference.read_safetensors(f"{src}/model.safetensors")
    shutil.copy(f"{src}/config.json", tmp_path)
    broken = dict(tensors)
    del broken["transformer.h.1.mlp.c_fc.weight"]
    write_safetensors(tmp_path / "model.safetensors", broken)
    with pytest.raises(CheckpointError, match=r"transformer.h.1.mlp.c_fc.weight'.*missing"):
        load_model(str(tmp_path), comm.serial())
    broken = dict(tensors)
    broken["transformer.h.0.attn.c_attn.weight"] = np.zeros((64, 100), np.float32)
    write_safetensors(tmp_path / "model.safetensors", broken)
    with pytest.raises(CheckpointError, match=r"shape \[64, 100\] does not match config.json.*\[64, 192\]"):
        load_model(str(tmp_path), comm.serial())


def test_hugging_face_cache_layout_with_symlinks(tmp_path):
    # The Hub cache: snapshots/<rev>/ holds symbolic links into ../../blobs/. They must load.
    import os
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{model_dir('gpt2-tiny')}/{name}", blobs / f"blob-{name}")
        os.symlink(f"../../blobs/blob-{name}", snap / name)
    model = load_model(str(snap), comm.serial(), "float64")
    reference = load_model(model_dir("gpt2-tiny"), comm.serial(), "float64")
    assert np.array_equal(model.forward([1, 2, 3], model.new_cache(3)), reference.forward([1, 2, 3], reference.new_cache(3)))
