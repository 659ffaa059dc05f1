"""The benchmark (the top-level ``bench`` package): its arithmetic against hand counts, the breakdown's
bookkeeping, the random-weight models, the outputs, and the command end to end.

No timing is asserted. The in-process end-to-end test runs the benchmark on every rank of the session (so
under ``mpirun -n P pytest`` it is a real P-rank run); the CLI tests launch their own ``mpirun``.
"""

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from mpi4py import MPI

from bench import ceilings, models, report, timing
from bench.__main__ import main
from conftest import REPO, child_env, model_dir, mpirun, serial_only
from mpitp.weights import n_params
from mpitp import comm, load_model
from mpitp.comm import TimedComm
from mpitp.config import config_from_dict
from mpitp.model import Model
from mpitp.sharding import shard_for
from threadcomm import run_ranks

GPT2 = config_from_dict(models.PRESETS["gpt2-124m"])
TINY = config_from_dict(models.PRESETS["tiny"])
TINY_ARGS = ["--preset", "tiny", "-r", "2", "-p", "16", "-n", "8", "--roofline-mib", "8"]


def tiny_weight_bytes(size):
    """Each rank's weight bytes of the tiny preset (GPT-2: d 64, 4 heads of 16, MLP 256, vocabulary 256,
    128 positions, 2 layers, float32) over ``size`` ranks, counted by hand: near-equal contiguous blocks."""
    def split(n):
        return [n // size + (r < n % size) for r in range(size)]

    out = []
    for heads, f, v in zip(split(4), split(256), split(256)):
        q = 16 * heads
        # two LayerNorms (weight, bias), W_QKV + b_QKV, W_B + b_B, W_C + b_C, W_D + b_D
        layer = 4 * 64 + (64 * 3 * q + 3 * q) + (q * 64 + 64) + (64 * f + f) + (f * 64 + 64)
        out.append(4 * (2 * layer + 2 * 64 + 64 * v + 128 * 64))  # final norm, LM head (tied), positions
    return out


def test_allreduce_prediction_matches_what_the_model_sends():
    assert ceilings.allreduce_calls(GPT2) == 25
    assert ceilings.allreduce_payload_bytes(GPT2, 1, 4) == 25 * 768 * 4
    assert ceilings.allreduce_payload_bytes(GPT2, 7, 8) == 25 * 7 * 768 * 8
    assert ceilings.ring_wire_bytes(1000, 1) == 0
    assert ceilings.ring_wire_bytes(1000, 2) == 1000 and ceilings.ring_wire_bytes(1000, 4) == 1500

    def measure(c):
        tc = TimedComm(c)
        model = load_model(model_dir("llama-gqa"), tc, "float64")
        cache = model.new_cache(8)
        model.forward([1, 2, 3], cache, gather=False)
        prefill = (tc.calls, tc.bytes)
        tc.reset()
        model.forward([4], cache, gather=False)
        return prefill, (tc.calls, tc.bytes), model.config

    for size in (2, 3):  # 3 splits llama-gqa's 8 heads 3, 3, 2
        for prefill, decode, cfg in run_ranks(size, measure):
            assert prefill == (2 * 2 + 1, ceilings.allreduce_payload_bytes(cfg, 3, 8)) == (5, 5 * 3 * 64 * 8)
            assert decode == (5, 5 * 64 * 8)


def test_decode_read_bytes_counts_every_weight_once_plus_the_cache():
    # llama-gqa: d 64, 8 query heads and 2 key/value heads of 8, MLP 176, vocabulary 258, 2 layers, untied
    model = load_model(model_dir("llama-gqa"), comm.serial(), "float32")
    qkv = (8 + 2 * 2) * 8
    # RMSNorms, W_QKV, W_B, W_gate|W_up, W_D, and the biases the model lacks, held (and read) as zeros
    layer = 2 * 64 + 64 * qkv + 64 * 64 + 64 * 2 * 176 + 176 * 64 + (qkv + 64 + 2 * 176 + 64)
    head = 64 + 64 * 258  # final norm and the LM head; of the embedding one row only, not counted
    kv = 2 * 2 * 2 * 10 * 8  # K and V of 2 layers, 2 heads, 10 positions, d_head 8
    assert ceilings.decode_read_bytes(model, n_kv=10) == 4 * (2 * layer + head + kv)


def test_prefill_flops_against_a_hand_count():
    model = load_model(model_dir("gpt2-tiny"), comm.serial(), "float32")
    n, d, f, h, dh, v, layers = 5, 64, 256, 4, 16, 256, 2
    matmuls = 2 * n * (d * 3 * d + d * d + d * f + f * d)  # per layer: QKV, W_B, W_C, W_D
    attention = 2 * (2 * dh * h * (1 + 2 + 3 + 4 + 5))  # Q K^T and P V, over the keys each query sees
    head = 2 * d * v  # logits of the last position
    assert ceilings.prefill_flops(model, n) == layers * (matmuls + attention) + head
    assert ceilings.prefill_flops(model, n, include_head=False) == layers * (matmuls + attention)


def test_prefill_flops_count_only_this_ranks_share():
    def flops(size):
        return run_ranks(size, lambda c: ceilings.prefill_flops(load_model(model_dir("llama-gqa"), c, "float32"), 6))

    full = flops(1)[0]
    shares = flops(2)
    assert shares[0] == shares[1] == full / 2  # heads, MLP columns and vocabulary all split evenly here
    # Over 3 ranks (heads 3, 3, 2) rank 1's query heads use both key/value heads: it holds both, so both
    # are projected twice over the job: 2 heads x d_head 8 columns of W_K and W_V, 6 tokens, 2 layers.
    assert sum(flops(3)) == full + 2 * 6 * 2 * (2 * 64 * 2 * 8)


def test_imbalance_of_the_weights_over_ranks():
    assert ceilings.imbalance([5, 5]) == 1 and ceilings.imbalance([3, 1]) == 1.5
    for size in (1, 2, 3):  # 3: 4 heads split 2, 1, 1
        held = [m.weight_bytes for m in run_ranks(size, lambda c: models.random_model(TINY, c, np.float32))]
        assert held == tiny_weight_bytes(size)
    held = tiny_weight_bytes(3)
    assert ceilings.imbalance(held) == pytest.approx(max(held) / (sum(held) / 3))


def test_threads_without_threadpoolctl(monkeypatch):
    from mpitp.resources import set_blas_threads
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    threads, warning = set_blas_threads(2, 1)
    assert threads is None and "--threads 2 was not applied" in warning
    assert set_blas_threads(None, 2) == (None, None)  # nothing asked for: nothing to warn about


def test_mean_sd():
    assert timing.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert timing.mean_sd([4.0]) == (4.0, 0.0)


def test_tables():
    rows = [dict(model="m", params=124.4e6, dtype="float32", ranks=2, threads=1, test=t, mean=m, sd=0.5)
            for t, m in (("pp128", 800.0), ("tg64", 55.0))]
    table = report.format_table(rows).splitlines()
    assert table[0].split("|")[1:-1] == [" model ", "   params ", " dtype   ", " ranks ", " threads ", " test  ",
                                         "           t/s "]
    assert "800.00 ± 0.50" in table[2] and "tg64" in table[3]
    recs = [{"model": "m", "dtype": "float32", "ranks": n, "threads": 1,
             "tests": [{"test": "tg64", "mean": m, "sd": 0}]} for n, m in ((1, 40.0), (2, 60.0))]
    lines = report.scaling_table(recs).splitlines()
    assert lines[-1] == "| 2 | 60.00 | 1.50x | 75% |"
    recs = [{"ranks": n, "tests": [{"mean": 0}, {"mean": tg}], "roofline": {"decode_bound_tokens_per_s": dram},
             "decode_products": {"ms_per_token": ms}}
            for n, tg, dram, ms in ((1, 40.0, 50.0, 20.0), (2, 60.0, 80.0, 12.5))]
    lines = report.ceiling_table(recs).splitlines()
    assert lines[-1] == "| 2 | 60.00 | 1.50x | 80.00 | 1.60x | 80.00 | 1.60x |"
    osu = report.format_osu([(4, 1.5), (3072, 4.25)], np.float32).splitlines()
    assert osu[2].startswith("# Size") and osu[-1].split() == ["3072", "4.25"]
    held = [10.2 * 2**20, 9.8 * 2**20]
    weights = {"bytes_per_rank": held, "imbalance": ceilings.imbalance(held)}
    assert report.format_weights(weights) == "weights per rank: 10.2, 9.8 MiB; imbalance (max/mean) 1.02"
    lines = report.weights_table([{"ranks": 2, "weights": weights},
                                  {"ranks": 1, "weights": {"bytes_per_rank": [20 * 2**20], "imbalance": 1.0}}])
    assert lines.splitlines()[2:] == ["| 1 | 20 | 1.00 |", "| 2 | 10.2, 9.8 | 1.02 |"]


def test_random_model_has_the_shapes_of_a_loaded_checkpoint():
    def arrays(m):
        return [a for w in m.blocks + [m.weights] for a in vars(w).values() if a is not None]

    for size in (1, 2, 3):
        rand = run_ranks(size, lambda c: models.random_model(TINY, c, np.float32))
        loaded = run_ranks(size, lambda c: load_model(model_dir("gpt2-tiny"), c, "float32"))
        for m, ref in zip(rand, loaded):
            assert [a.shape for a in arrays(m)] == [a.shape for a in arrays(ref)]
            assert [a.strides for a in arrays(m)] == [a.strides for a in arrays(ref)]  # the same padded layout
            assert m.weight_bytes == ref.weight_bytes


def test_random_checkpoint_values():
    m = models.random_model(TINY, comm.serial(), np.float32, seed=3)
    w, g = m.blocks[1], m.weights
    for a in (w.norm_1_weight, w.norm_2_weight, g.norm_f_weight):
        assert np.all(a == 1)
    for a in (w.norm_1_bias, w.b_QKV, w.b_B, w.b_C, w.b_D, g.norm_f_bias):
        assert np.all(a == 0)
    for a, scale in ((w.W_QKV, 0.02), (w.W_D, 0.02), (g.W_vocab, 0.02), (g.W_pos, 0.01)):
        assert abs(a.mean()) < 0.1 * scale and abs(a.std() / scale - 1) < 0.05
    assert np.shares_memory(g.W_embed, g.W_vocab) and np.array_equal(g.W_embed, g.W_vocab.T)  # tied, as GPT-2
    again = models.random_model(TINY, comm.serial(), np.float32, seed=3)
    assert np.array_equal(again.blocks[1].W_QKV, w.W_QKV)
    other = models.random_model(TINY, comm.serial(), np.float32, seed=4)
    assert not np.array_equal(other.blocks[1].W_QKV, w.W_QKV)


@pytest.mark.parametrize("preset", ["llama-1b", "qwen2-0.5b"])
def test_random_checkpoint_has_every_tensor_of_the_llama_family(preset):
    cfg = models.fixed_cost_config(config_from_dict(models.PRESETS[preset]), 2)
    for m in run_ranks(2, lambda c: models.random_model(cfg, c, np.float32)):
        w = m.blocks[0]
        assert np.all(w.norm_1_weight == 1) and np.all(w.b_QKV == 0)  # qwen2's q, k, v biases are read as zeros
        assert w.norm_1_bias is None and m.weights.W_pos is None
        assert abs(m.weights.W_vocab.std() / 0.02 - 1) < 0.05


def test_breakdown_counts_the_decode_forwards_only_and_adds_up():
    tc = TimedComm(comm.serial())
    model = models.random_model(TINY, tc, np.float32)
    head_sleep = 0.002

    def slow_head(x):  # an LM head known to take at least head_sleep
        time.sleep(head_sleep)
        return Model.lm_head(model, x)

    model.lm_head = slow_head
    n = 6
    seconds, parts, calls, nbytes = timing.decode_breakdown(model, n)
    assert calls == n * 5 and nbytes == n * ceilings.allreduce_payload_bytes(TINY, 1, 4)  # not the prompt's
    assert set(parts) == set(timing.CATEGORIES)
    assert sum(parts.values()) == pytest.approx(seconds, rel=1e-12)
    assert parts["lm_head"] >= n * head_sleep and min(parts.values()) >= 0
    assert vars(model)["lm_head"] is slow_head and "block" not in vars(model)  # instance restored
    seconds, parts = timing.prefill_breakdown(model, 8)
    assert parts["lm_head"] >= head_sleep and sum(parts.values()) == pytest.approx(seconds, rel=1e-12)


def test_roofline_compares_each_repeat_with_its_own_ceiling():
    # decode: 100 MB per token; repeats at 50 and 90 tok/s against 10 and 20 GB/s (ceilings 100 and 200 tok/s)
    rf = ceilings.roofline([50.0, 90.0], [10e9, 20e9], 100e6, [400.0], [10e9], 100, 1e8, 50e9, 20e6)
    assert rf["decode_bound_tokens_per_s"] == pytest.approx(150)
    assert rf["decode_percent"] == pytest.approx(100 * (0.5 + 0.45) / 2)  # not 70 / 150
    assert rf["read_bandwidth_GBps"] == pytest.approx(15)
    # prefill: 100 tokens x 1e8 flop at 50 GFLOP/s = 0.2 s, plus 20 MB of head at 10 GB/s = 2 ms
    assert rf["prefill_bound_tokens_per_s"] == pytest.approx(100 / 0.202)
    assert rf["prefill_percent"] == pytest.approx(100 * 400 * 0.202 / 100)
    assert rf["prefill_lm_head_read_seconds"] == pytest.approx(0.002)


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-1b", "qwen2-0.5b"])
def test_fixed_cost_model_keeps_depth_heads_and_layer_kinds(preset):
    cfg = config_from_dict(models.PRESETS[preset])
    small = models.fixed_cost_config(cfg, 2)
    same = ("family", "n_layer", "n_head", "n_kv_head", "n_ctx", "qkv_bias", "out_bias", "mlp_bias",
            "tie_word_embeddings", "rope")
    assert [getattr(small, k) for k in same] == [getattr(cfg, k) for k in same]
    assert small.d_head == 4 and small.n_embd == 4 * cfg.n_head
    assert n_params(small) * 4 < 8 << 20  # every weight fits in the last-level cache
    shard_for(small, 0, 2)  # valid wherever the real model is


def test_bandwidth_probe_matrix():
    probe = ceilings.BandwidthProbe(comm.serial(), np.float32, 4 << 20)
    assert probe.W.nbytes == 4 << 20 and probe.W.ctypes.data % (2 << 20) == 0  # huge-page aligned, like weights
    assert probe.x.shape == (probe.W.shape[0],)


def check_record(rec, ranks):
    assert rec["ranks"] == ranks and [t["test"] for t in rec["tests"]] == ["pp16", "tg8"]
    assert all(len(t["tokens_per_s"]) == 2 for t in rec["tests"])
    ar = rec["allreduce"]
    assert ar["measured_calls_per_token"] == ar["calls_per_token"] == 5
    assert ar["measured_bytes_per_token"] == ar["predicted_bytes_per_token"] == 5 * 64 * 4
    assert list(rec["decode_breakdown_ms"]) == list(rec["prefill_breakdown_ms"]) == list(timing.CATEGORIES)
    held = tiny_weight_bytes(ranks)
    assert rec["weights"]["bytes_per_rank"] == held == [m["weight_bytes"] for m in rec["memory_per_rank"]]
    assert rec["weights"]["imbalance"] == pytest.approx(max(held) * ranks / sum(held))
    assert rec["lm_head"]["bytes_per_rank"] == 64 * rec["lm_head"]["n_vocab_local"] * 4
    assert rec["lm_head"]["n_vocab_local"] == -(-256 // ranks)
    assert "projection" not in rec and rec["environment"]["mpi_library"]


def test_bench_end_to_end_on_every_rank(tmp_path):
    # The same path on every rank of this session (a real MPI run under mpirun -n P pytest).
    world = MPI.COMM_WORLD
    out = str(tmp_path / "rec.json")
    rc = main(TINY_ARGS + ["--osu", "--json-out", out])
    valid = world.size <= TINY.n_head
    assert world.allreduce(rc, op=MPI.MAX) == (0 if valid else 2)  # 2: refused up front, on every rank
    if valid and world.rank == 0:
        with open(out) as f:
            rec = json.load(f)
        check_record(rec, world.size)
        assert rec["allreduce_latency_us"][0][0] == 4


def run_bench(args, n, timeout=300):
    return subprocess.run((mpirun(n) if n > 1 else []) + [sys.executable, "-m", "bench", *args], capture_output=True,
                          text=True, timeout=timeout, env=child_env(), cwd=str(REPO))


@serial_only
def test_cli_runs_reports_and_summarizes(tmp_path):
    out = tmp_path / "rec.json"
    r = run_bench(TINY_ARGS + ["--json-out", str(out)], 2)
    assert r.returncode == 0, r.stderr
    with open(out) as f:
        rec = json.load(f)
    check_record(rec, 2)
    assert re.search(r"^\| tiny \(random\) \| +0\.12 M \| float32 \| +2 \| .* \| tg8 +\| ", r.stdout, re.M)
    mib = ", ".join(f"{b / 2**20:.3g}" for b in tiny_weight_bytes(2))
    assert f"weights per rank: {mib} MiB; imbalance (max/mean) 1.00" in r.stdout
    s = run_bench(["--summarize", str(out), str(out), "--plot", str(tmp_path / "s.png")], 1)
    assert s.returncode == 0, s.stderr
    assert "| 2 | " in s.stdout and s.stdout.count("| 1.00x | 100% |") == 4  # pp and tg of both records
    assert (tmp_path / "s.png").exists() or "plot: skipped" in s.stdout


@serial_only
def test_cli_long_run(tmp_path):
    out = tmp_path / "long.json"
    r = run_bench(["--preset", "tiny", "--long", "20", "--json-out", str(out)], 2)
    assert r.returncode == 0, r.stderr
    with open(out) as f:
        rec = json.load(f)
    assert rec["n_gen"] == 20 and len(rec["seconds_per_token_by_tenth"]) == 10
    assert rec["kv_cache_bytes"] == 2 * 2 * 2 * 21 * 16 * 4  # K, V x 2 layers x 2 local heads x 21 positions
    assert "ms per token, by tenth of the run" in r.stdout


@serial_only
@pytest.mark.parametrize("args, message", [
    (["-n", "200"], "--n-prompt must be at most 128 and --n-gen/--long at most 126"),
    (["--long", "5"], "--long must be >= 10"),
])
def test_cli_refuses_bad_input_once(args, message):
    r = run_bench(["--preset", "tiny", *args], 2)
    assert r.returncode == 2
    assert r.stderr.count("bench: error:") == 1 and f"bench: error: {message}" in r.stderr
