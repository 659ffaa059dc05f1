"""The benchmark's own logic: what the model's shape predicts, the roofline arithmetic, the outputs.

No timing is asserted. The end-to-end test runs the benchmark on every rank of the session (so under
``mpirun -n P pytest`` it is a real P-rank run) on a tiny preset.
"""

import json

import numpy as np
import pytest
from mpi4py import MPI

from conftest import model_dir
from mpitp import comm, load_model
from mpitp import bench
from mpitp.config import config_from_dict
from mpitp.sharding import shard_for, valid_rank_counts
from threadcomm import CountingComm, run_ranks

GPT2 = config_from_dict(bench.PRESETS["gpt2-124m"])


class BytesComm(CountingComm):
    """Also adds up the bytes handed to Allreduce."""

    def __init__(self, comm):
        super().__init__(comm)
        self.allreduce_bytes = 0

    def Allreduce(self, sendbuf, recvbuf, *args, **kwargs):
        self.allreduce_bytes += recvbuf.nbytes
        return super().Allreduce(sendbuf, recvbuf, *args, **kwargs)


@pytest.mark.parametrize("vocab_parallel", [True, False])
def test_allreduce_bytes_prediction_matches_what_the_model_sends(vocab_parallel):
    assert bench.allreduce_payload_bytes(GPT2, 1, 4, vocab_parallel=False) == 2 * 12 * 768 * 4
    assert bench.allreduce_payload_bytes(GPT2, 1, 4, vocab_parallel=True) == (2 * 12 + 1) * 768 * 4
    assert bench.ring_wire_bytes(1000, 1) == 0
    assert bench.ring_wire_bytes(1000, 2) == 1000 and bench.ring_wire_bytes(1000, 4) == 1500

    def measure(c):
        counting = BytesComm(c)
        model = load_model(model_dir("llama-gqa"), counting, "float64", vocab_parallel=vocab_parallel)
        cache = model.new_cache(8)
        model.forward([1, 2, 3], cache, gather=False)
        before = counting.allreduce_bytes
        model.forward([4], cache, gather=False)
        return counting.allreduce_bytes - before, model.config

    for sent, cfg in run_ranks(2, measure):
        assert sent == bench.allreduce_payload_bytes(cfg, 1, 8, vocab_parallel)


def test_decode_read_bytes_counts_every_weight_once_plus_the_cache():
    model = load_model(model_dir("llama-gqa"), comm.serial(), "float32")  # untied: embedding rows not read
    cfg = model.config
    weights = 4 * (cfg.n_params - cfg.n_vocab * cfg.n_embd)
    head_padding = 4 * cfg.n_embd * (-cfg.n_vocab % 16)  # the LM head's rows are read padded to 16 columns
    kv = 2 * cfg.n_layer * cfg.n_kv_head * 10 * cfg.d_head * 4
    assert bench.decode_read_bytes(model, n_kv=10) == weights + head_padding + kv


def test_prefill_flops_against_a_hand_count():
    model = load_model(model_dir("gpt2-tiny"), comm.serial(), "float32")
    n, d, f, h, dh, v, layers = 5, 64, 256, 4, 16, 256, 2
    matmuls = 2 * n * (d * 3 * d + d * d + d * f + f * d)  # per layer: QKV, W_B, W_C, W_D
    attention = 2 * (2 * dh * h * (1 + 2 + 3 + 4 + 5))  # Q K^T and P V, over the keys each query sees
    head = 2 * d * v  # logits of the last position
    assert bench.prefill_flops(model, n) == layers * (matmuls + attention) + head
    assert bench.prefill_flops(model, n, include_head=False) == layers * (matmuls + attention)


def test_prefill_flops_count_only_this_ranks_share():
    full = bench.prefill_flops(load_model(model_dir("llama-gqa"), comm.serial(), "float32"), 6)
    shares = run_ranks(2, lambda c: bench.prefill_flops(load_model(model_dir("llama-gqa"), c, "float32"), 6))
    assert shares[0] == shares[1] == full / 2  # heads, MLP columns and vocabulary all split evenly here


def test_threads_warning_without_threadpoolctl(monkeypatch):
    import sys
    from mpitp import threads
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    assert threads.apply_blas_threads(1) is None
    assert "--threads 2 was not applied" in threads.missing_threadpoolctl_warning(2)
    assert threads.missing_threadpoolctl_warning(None) is None


def test_projection_and_mean_sd():
    assert bench.project_tokens_per_s(0.01, 24, 3072, 1, 1e-6, 1e9) == pytest.approx(100)
    # 24 messages of 3 KB over 2 ranks: 2 * alpha + 3072 / beta each
    t = 0.01 + 24 * (2 * 25e-6 + 3072 / 1.25e9)
    assert bench.project_tokens_per_s(0.01, 24, 3072, 2, 25e-6, 1.25e9) == pytest.approx(1 / t)
    assert bench.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)


def test_tables():
    rows = [dict(model="m", params=124.4e6, dtype="float32", ranks=2, threads=1, test=t, mean=m, sd=0.5)
            for t, m in (("pp128", 800.0), ("tg64", 55.0))]
    table = bench.format_table(rows).splitlines()
    assert table[0].split("|")[1:-1] == [" model ", "   params ", " dtype   ", " ranks ", " threads ", " test  ",
                                         "           t/s "]
    assert "800.00 ± 0.50" in table[2] and "tg64" in table[3]
    recs = [{"model": "m", "dtype": "float32", "ranks": n, "threads": 1,
             "tests": [{"test": "tg64", "mean": m, "sd": 0}]} for n, m in ((1, 40.0), (2, 60.0))]
    lines = bench.scaling_table(recs).splitlines()
    assert lines[-1] == "| 2 | 60.00 | 1.50x | 75% |"
    recs = [{"ranks": n, "tests": [{"mean": 0}, {"mean": tg}], "roofline": {"decode_bound_tokens_per_s": dram},
             "decode_products": {"ms_per_token": ms}} for n, tg, dram, ms in ((1, 40.0, 50.0, 20.0), (2, 60.0, 80.0, 12.5))]
    lines = bench.ceiling_table(recs).splitlines()
    assert lines[-1] == "| 2 | 60.00 | 1.50x | 80.00 | 1.60x | 80.00 | 1.60x |"
    osu = bench.format_osu([(4, 1.5), (3072, 4.25)], np.float32).splitlines()
    assert osu[2].startswith("# Size") and osu[-1].split() == ["3072", "4.25"]


def test_random_model_has_the_shapes_of_its_preset():
    cfg = config_from_dict(bench.PRESETS["tiny"])
    for size in (1, 2, 4):
        models = run_ranks(size, lambda c: bench.random_model(cfg, c, np.float32))
        loaded = run_ranks(size, lambda c: load_model(model_dir("gpt2-tiny"), c, "float32"))
        for m, ref in zip(models, loaded):
            assert m.weight_bytes == ref.weight_bytes
            assert [a.shape for a in m.blocks[0].arrays()] == [a.shape for a in ref.blocks[0].arrays()]


def test_bench_end_to_end_on_every_rank(tmp_path):
    # The same path on every rank of this session (a real MPI run under mpirun -n P pytest).
    world = MPI.COMM_WORLD
    out = str(tmp_path / "rec.json")
    rc = bench.main(["--preset", "tiny", "-r", "2", "-p", "16", "-n", "8", "--roofline-mib", "8", "--osu",
                     "--json-out", out])
    valid = world.size in valid_rank_counts(config_from_dict(bench.PRESETS["tiny"]))
    assert world.allreduce(rc, op=MPI.MAX) == (0 if valid else 2)  # 2: refused up front, on every rank
    if valid and world.rank == 0:
        rec = json.load(open(out))
        assert rec["ranks"] == world.size and [t["test"] for t in rec["tests"]] == ["pp16", "tg8"]
        assert rec["allreduce"]["measured_bytes_per_token"] == rec["allreduce"]["predicted_bytes_per_token"]
        assert set(rec["decode_breakdown_ms"]) == set(rec["prefill_breakdown_ms"]) == \
            {"matmul", "attention", "allreduce", "lm_head", "other"}
        assert rec["lm_head"]["bytes_per_rank"] == 64 * (-(-rec["lm_head"]["n_vocab_local"] // 16) * 16) * 4
        assert rec["environment"]["mpi_library"] and rec["allreduce_latency_us"]


def test_roofline_compares_each_repeat_with_its_own_ceiling():
    # decode: 100 MB per token; repeats at 50 and 90 tok/s against 10 and 20 GB/s (ceilings 100 and 200 tok/s)
    rf = bench.roofline([50.0, 90.0], [10e9, 20e9], 100e6, [400.0], [10e9], 100, 1e8, 50e9, 20e6)
    assert rf["decode_bound_tokens_per_s"] == pytest.approx(150)
    assert rf["decode_percent"] == pytest.approx(100 * (0.5 + 0.45) / 2)  # not 70 / 150
    assert rf["read_bandwidth_GBps"] == pytest.approx(15)
    # prefill: 100 tokens x 1e8 flop at 50 GFLOP/s = 0.2 s, plus 20 MB of head at 10 GB/s = 2 ms
    assert rf["prefill_bound_tokens_per_s"] == pytest.approx(100 / 0.202)
    assert rf["prefill_percent"] == pytest.approx(100 * 400 * 0.202 / 100)
    assert rf["prefill_lm_head_read_seconds"] == pytest.approx(0.002)


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-1b", "qwen2-0.5b"])
def test_fixed_cost_model_keeps_depth_heads_and_layer_kinds(preset):
    cfg = config_from_dict(bench.PRESETS[preset])
    small = bench.fixed_cost_config(cfg, 2)
    same = ("family", "n_layer", "n_head", "n_kv_head", "qkv_bias", "out_bias", "mlp_bias", "tie_word_embeddings",
            "rope")
    assert [getattr(small, k) for k in same] == [getattr(cfg, k) for k in same]
    assert small.d_head == 4 and small.n_embd == 4 * cfg.n_head
    assert small.n_params * 4 < 8 << 20  # every weight fits in the last-level cache
    shard_for(small, 0, 2)  # valid wherever the real model is


def test_bandwidth_probe_reads_its_whole_matrix():
    probe = bench.BandwidthProbe(comm.serial(), np.float32, 4 << 20)
    assert probe.W.nbytes == 4 << 20 and probe.W.ctypes.data % (2 << 20) == 0
    assert probe.measure(1) > 0
