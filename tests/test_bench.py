"""The benchmark (the top-level ``bench`` package): its arithmetic against hand counts, the breakdown's
bookkeeping, the random-weight models, the outputs, and the command end to end.

No timing is asserted but lower bounds that sleeps set. The in-process end-to-end test runs the benchmark on
every rank of the session (so under ``mpirun -n P pytest`` it is a real P-rank run); the CLI tests launch their
own ``mpirun``.
"""

import errno
import json
import os
import re
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from mpi4py import MPI

from bench import ceilings, cluster, environment, models, plots, report, summary, timing
from bench.__main__ import batch_test, main, parse_batches
from bench.record import table_rows
from conftest import CLOSED, FULL, REPO, child_env, model_dir, mpirun, serial_only, unwritable_stdout
from mpitp.weights import n_params
from mpitp import comm, load_model
from mpitp.comm import TimedComm
from mpitp.config import config_from_dict
from mpitp.cli.runner import replace_file
from mpitp.errors import MpitpError
from mpitp.model import Model
from mpitp.sharding import shard_for
from threadcomm import run_ranks

GPT2 = config_from_dict(models.PRESETS["gpt2-124m"])
TINY = config_from_dict(models.PRESETS["tiny"])
TINY_ARGS = ["--preset", "tiny", "-r", "2", "-p", "16", "-n", "8", "--roofline-mib", "8", "--batch", "3,1",
             "--batch-prompt", "8", "--batch-gen", "4", "--batch-repeats", "2"]


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


def test_prefill_product_flops_count_the_whole_attention_square():
    # what the model multiplies: Q K^T and P V over every key of the prompt, before the mask hides half
    model = load_model(model_dir("gpt2-tiny"), comm.serial(), "float32")
    n, d, f, h, dh, layers = 5, 64, 256, 4, 16, 2
    matmuls = 2 * n * (d * 3 * d + d * d + d * f + f * d)
    assert ceilings.prefill_product_flops(model, n) == layers * (matmuls + 2 * 2 * dh * h * n * n)
    assert ceilings.prefill_product_flops(model, n) - ceilings.prefill_flops(model, n, include_head=False) == (
        layers * 2 * 2 * dh * h * (n * n - n * (n + 1) // 2))
    assert ceilings.measure_gemm_rate(model, n, n_kv=n) > 0 and ceilings.measure_gemm_rate(model, 3) > 0


def test_prefill_flops_count_only_this_ranks_share():
    def flops(size):
        return run_ranks(size, lambda c: ceilings.prefill_flops(load_model(model_dir("llama-gqa"), c, "float32"), 6))

    full = flops(1)[0]
    shares = flops(2)
    assert shares[0] == shares[1] == full / 2  # heads, MLP columns and vocabulary all split evenly here
    # Over 3 ranks (heads 3, 3, 2) rank 1's query heads use both key/value heads: it holds both, so both
    # are projected twice over the job: 2 heads x d_head 8 columns of W_K and W_V, 6 tokens, 2 layers.
    assert sum(flops(3)) == full + 2 * 6 * 2 * (2 * 64 * 2 * 8)


def test_batched_decode_flops_and_bytes_per_step_against_a_hand_count():
    # The tiny preset over 2 ranks, each: 2 heads of 16 (q = k = v = 32 columns), MLP 128 columns, vocabulary 128.
    # Per token and layer, 2 x (W_QKV 64 x 96 + W_B 32 x 64 + W_C 64 x 128 + W_D 128 x 64) = 49152 flops; attention
    # over 80 positions (Q K^T and P V, 2 heads of 16) 2 x 2 x 16 x 2 x 80 = 10240; the LM head 2 x 64 x 128 = 16384.
    # Read per step: every weight once, 234752 bytes (per layer 2 LayerNorms 256 values, W_QKV + b 6240, W_B + b
    # 2112, W_C + b 8320, W_D + b 8256; the final LayerNorm 128 and the tied LM head 8192; the positions' and
    # the embedding's rows are not counted), plus each sequence's K and V: 2 x 2 layers x 2 heads x 80 x 16 values.
    for m in run_ranks(2, lambda c: models.random_model(TINY, c, np.float32)):
        assert ceilings.decode_flops(m, 80) == 2 * (49152 + 10240) + 16384 == 135168
        assert ceilings.decode_read_bytes(m, 80) == 234752 + 40960
        assert ceilings.decode_read_bytes(m, 80, 4) == 234752 + 4 * 40960 == 398592
        assert ceilings.decode_read_bytes(m, 80, 64) == 234752 + 64 * 40960 == 2856192
        # a decode token is the next prefill position's work plus the LM head
        step = ceilings.prefill_flops(m, 80, include_head=False) - ceilings.prefill_flops(m, 79, include_head=False)
        assert ceilings.decode_flops(m, 80) == step + 16384
    # batch 4 at 20 GB/s and 50 GFLOP/s: reading 398592 B takes 19.93 us, computing 4 x 135168 flops 10.81 us
    assert ceilings.batch_ceiling(4, 398592, 135168, 20e9, 50e9) == (pytest.approx(4 / 19.9296e-6), "DRAM")
    # batch 64: reading 2856192 B takes 142.8 us, computing 64 x 135168 flops 173.0 us
    assert ceilings.batch_ceiling(64, 2856192, 135168, 20e9, 50e9) == (pytest.approx(64 / 173.01504e-6), "GEMM")


def test_batch_record_from_raw_runs():
    runs = [{"prefill_tokens": 256, "prefill_seconds": 0.5, "decode_tokens": 124, "decode_seconds": 2.0,
             "seconds": 2.5},
            {"prefill_tokens": 256, "prefill_seconds": 0.25, "decode_tokens": 124, "decode_seconds": 1.0,
             "seconds": 1.25}]
    # 1e6 bytes at 1e9 and 2e9 B/s: 1 and 0.5 ms a step; 4 x 1e5 flops at 1e9 flop/s: 0.4 ms. DRAM binds both
    # times: ceilings 4000 and 8000 tok/s, against 62 and 124 measured.
    rec = ceilings.batch_record(4, 64, 32, runs, [1e9, 2e9], 1e6, 1e5, 1e9)
    assert rec["batch"] == 4 and rec["n_kv"] == 4 * (64 + 31) and rec["runs"] == runs
    assert rec["prefill_tokens_per_s"] == pytest.approx((512 + 1024) / 2)
    assert rec["decode_tokens_per_s"] == pytest.approx(93) and rec["decode_tokens_per_s_per_sequence"] == 93 / 4
    assert rec["total_seconds"] == pytest.approx(1.875)
    assert rec["total_tokens_per_s"] == pytest.approx((380 / 2.5 + 380 / 1.25) / 2)
    assert rec["read_bytes_per_step"] == 1e6 and rec["flops_per_step"] == 4e5 and rec["gemm_GFps"] == 1
    assert rec["read_bandwidth_GBps"] == [1, 2] and rec["bound"] == "DRAM"
    assert rec["ceiling_tokens_per_s"] == pytest.approx(6000)
    assert rec["percent_of_ceiling"] == pytest.approx(100 * (62 / 4000 + 124 / 8000) / 2)  # each run, own ceiling
    assert ceilings.batch_record(4, 64, 32, runs, [1e9, 2e9], 1e5, 1e6, 1e9)["bound"] == "GEMM"
    json.dumps(rec)  # plain numbers only


def test_parse_batches():
    assert parse_batches("1,2,4,8,16,32,64") == [1, 2, 4, 8, 16, 32, 64]
    assert parse_batches("4, 1,4") == [1, 4] and parse_batches("None") == []
    for bad in ("", "0", "1,-2", "1,,2", "x"):
        with pytest.raises(MpitpError, match="--batch must be"):
            parse_batches(bad)


class WithBarrier:
    """A simulated rank's communicator with a Barrier (an allgather is one), which the bench's timing needs."""

    def __init__(self, c):
        self.c = c

    def Barrier(self):
        self.c.allgather(None)

    def __getattr__(self, name):
        return getattr(self.c, name)


def test_batch_test_on_simulated_ranks():
    def run(c):
        model = models.random_model(TINY, TimedComm(WithBarrier(c)), np.float32)
        return batch_test(model, [1, 2, 6], 6, 4, 2, lambda: 10e9, np.random.default_rng(0))

    recs = run_ranks(2, run)
    assert recs[0] == recs[1]  # the slowest rank's times, the same record on every rank
    assert [r["batch"] for r in recs[0]] == [1, 2, 6]
    for r in recs[0]:
        b = r["batch"]
        assert len(r["runs"]) == 2 and r["read_bandwidth_GBps"] == [10, 10]
        assert all(x["prefill_tokens"] == 6 * b and x["decode_tokens"] == 3 * b for x in r["runs"])
        assert r["decode_tokens_per_s"] == pytest.approx(b * r["decode_tokens_per_s_per_sequence"])
        assert r["bound"] in ("DRAM", "GEMM") and r["ceiling_tokens_per_s"] > 0
        # as in the hand count above, at the mean position a decode step sees, 6 + 4 // 2 = 8
        assert r["n_kv"] == b * 9 and r["flops_per_step"] == b * (2 * (49152 + 2 * 2 * 16 * 2 * 8) + 16384)
        assert r["read_bytes_per_step"] == 234752 + b * 2 * 2 * 2 * 8 * 16 * 4
        # the products both ways (one way for one row), the model's choice, and the measured ceiling: the fastest
        # products plus the KV cache at 10 GB/s
        ways = {1: ["GEMV"], 2: ["GEMM", "padded GEMM", "row by row"], 6: ["GEMM", "padded GEMM", "row by row"]}[b]
        assert sorted(r["products_seconds"]) == ways and r["fastest_product"] in ways
        assert r["product"] == {1: "GEMV", 2: "row by row", 6: "padded GEMM"}[b]
        assert r["cache_bytes_per_step"] == b * 2 * 2 * 2 * 8 * 16 * 4
        step = min(r["products_seconds"].values()) + r["cache_bytes_per_step"] / 10e9
        assert r["products_ceiling_tokens_per_s"] == pytest.approx(b / step, rel=1e-12)
        assert r["percent_of_products_ceiling"] == pytest.approx(100 * r["decode_tokens_per_s"] * step / b, rel=1e-9)
        # the projection's counts, from its instrumented run: the embedding's Allreduce and the seed's 2 in each of
        # the 2 layers, one Gather for every sequence's choice and one Bcast (each half a choice); its link
        # measured with a step's message
        p = r["projection"]
        assert (p["allreduce_calls_per_step"], p["choices_per_step"]) == (5, 1)
        assert p["link"]["message_bytes"] == b * 64 * 4 and p["tokens_per_s"] > 0 and p["compute_ms_per_step"] > 0


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
    lines = summary.scaling_table(recs).splitlines()
    assert lines[-1] == "| 2 | 60.00 | 1.50x | 75% |"
    recs = [{"ranks": n, "tests": [{"mean": 0}, {"mean": tg}], "roofline": {"decode_bound_tokens_per_s": dram},
             "decode_products": {"ms_per_token": ms}}
            for n, tg, dram, ms in ((1, 40.0, 50.0, 20.0), (2, 60.0, 80.0, 12.5))]
    lines = summary.ceiling_table(recs).splitlines()
    assert lines[-1] == "| 2 | 60.00 | 1.50x | 80.00 | 1.60x | 80.00 | 1.60x |"
    osu = report.format_osu([(4, 1.5), (3072, 4.25)], np.float32).splitlines()
    assert osu[2].startswith("# Size") and osu[-1].split() == ["3072", "4.25"]
    held = [10.2e6, 9.8e6]
    weights = {"bytes_per_rank": held, "imbalance": ceilings.imbalance(held)}
    assert report.format_weights(weights) == "weights per rank: 10.2, 9.8 MB; imbalance (max/mean) 1.02"
    lines = summary.weights_table([{"ranks": 2, "weights": weights},
                                  {"ranks": 1, "weights": {"bytes_per_rank": [20e6], "imbalance": 1.0}}])
    assert lines.splitlines()[2:] == ["| 1 | 20 | 1.00 |", "| 2 | 10.2, 9.8 | 1.02 |"]


def test_a_share_above_its_ceiling_always_has_a_warning_beside_it():
    assert report.percent(99.6) == "100%" and report.percent(100) == "100%"
    assert report.percent(100.4) == "100% (warning: above its ceiling)"
    assert report.percent(161.2) == "161% (warning: above its ceiling)"


def machine(load_start, load_end, steal, cores=2):
    return {"hosts": ["node0", "node1"], "machine_id": "x", "cores": cores, "load_start": load_start,
            "load_end": load_end, "steal_percent": steal}


def test_warnings_name_a_busy_machine_disagreeing_repeats_and_shares_above_a_ceiling():
    quiet = {"environment": {"machine": [machine([0.3, 0.5, 0.5], [2.2, 1.0, 0.6], 0.1)]},
             "tests": [{"test": "pp128", "tokens_per_s": [100.0, 105.0]}, {"test": "tg64", "tokens_per_s": [50.0]}]}
    assert report.find_warnings(quiet) == []  # the bench's own 2 ranks at the end: 2.2 on 2 cores is not busy
    busy = {"environment": {"machine": [machine([3.1, 2.0, 1.0], [2.6, 2.0, 1.0], 7.5)]},
            "tests": [{"test": "pp128", "tokens_per_s": [100.0, 125.0]}],
            "roofline": {"decode_percent": 94.0, "prefill_percent": 161.0},
            "decode_products": {"percent_of_read_bandwidth": 101.0, "forward_percent_of_products": 80.0},
            "batch": [{"batch": 4, "percent_of_ceiling": 120.0,
                       "runs": [{"decode_tokens": 12, "decode_seconds": 1.0}, {"decode_tokens": 12,
                                                                               "decode_seconds": 1.5}]}]}
    w = report.find_warnings(busy)
    assert len(w) == 8
    assert "load average 3.10 (1 minute) at the start of the run on node0, node1 (2 cores" in w[0]
    assert "load average 2.60 (1 minute) at the end" in w[1] and "stole 7.5% of the CPU time" in w[2]
    assert w[3].startswith("pp128's 2 repeats disagree by 22% ((max - min) / mean, more than 10%)")
    assert w[4].startswith("batch 4's 2 repeats disagree by 40%")
    assert w[5].startswith("prefill (pp) against its roofline is 161%: above 100% the ceiling")
    assert w[6].startswith("decode's products alone against the DRAM read rate is 101%")
    assert w[7].startswith("batch 4's decode against its ceiling is 120%")
    assert report.format_warnings(w[:2]).count("\nwarning: ") == 1
    # where the model did not multiply its rows as the ceiling's GEMM does, that ceiling does not bound it
    ways = dict(busy, batch=[dict(busy["batch"][0], product=p) for p in ("row by row", "padded GEMM", "GEMM")])
    assert [x for x in report.find_warnings(ways) if "against its ceiling" in x] == [w[7]]


def test_machine_state_and_environment():
    state = environment.machine_state()
    if os.path.exists("/proc/loadavg"):
        assert len(state["load"]) == 3 and state["jiffies"] >= state["steal_jiffies"] >= 0
    (m,) = environment.machine_entry(comm.serial(), state)
    assert m["cores"] >= 1 and m["hosts"] and (m["steal_percent"] is None or 0 <= m["steal_percent"] <= 100)
    env = environment.environment(comm.serial(), 1, state)
    assert env["machine"][0]["load_start"] == state["load"] and "load_end" in env["machine"][0]
    assert env["cluster_rate"] == os.environ.get("MPITP_CLUSTER_RATE")


def fake_record(rate, tg, projected, allreduce_ms, waits):
    per_rank = [dict(blocks=8.0, lm_head=3.0, other=0.2, wait=w, allreduce=allreduce_ms, gather_bcast=0.05,
                     barrier=0.9, total=11.25 + w + allreduce_ms) for w in waits]
    return {"model": "gpt2-124m (random)", "dtype": "float32", "ranks": 2, "threads": 1, "repeats": 3,
            "tests": [{"test": "pp128", "mean": 1000.0, "sd": 5.0}, {"test": "tg64", "mean": tg, "sd": 0.5}],
            "environment": {"hosts": ["node0", "node1"], "cluster_rate": rate},
            "decode_breakdown": {"categories": list(timing.CATEGORIES), "rank": 1, "runs": 3,
                                 "per_rank_ms": per_rank, "critical_compute_ms": 11.2 + max(waits)},
            "projection": {"tokens_per_s": projected, "error_percent": 100 * (projected - tg) / tg,
                           "compute_ms_per_token": 11.5, "allreduce_in_situ_ms_per_token": allreduce_ms,
                           "allreduce_model_ms_per_token": 1.25, "link_sustained_MBps": 12.1 if rate else None,
                           "bound": "compute + latency"},
            "warnings": ["tg64's 3 repeats disagree by 12%"] if rate == "100mbit" else []}


def test_cluster_table(tmp_path, capsys):
    recs = [fake_record(None, 80.0, 78.0, 1.5, [0.4, 0.1]), fake_record("100mbit", 75.0, 77.5, 2.0, [0.2, 0.6])]
    lines = cluster.cluster_table(recs).splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == [
        "link", "pp t/s", "tg t/s", "projected t/s", "error", "compute ms/tok", "Allreduce ms/tok",
        "modelled ms/tok", "wait ms/tok", "link MB/s", "bound"]
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == [
        "2 hosts", "1000.0", "80.00 ± 0.50", "78.00", "-2.5%", "11.500", "1.500", "1.250", "0.400", "-",
        "compute + latency"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]][:5] == ["100mbit", "1000.0", "75.00 ± 0.50", "77.50",
                                                                 "+3.3%"]
    assert lines[3].split("|")[9].strip() == "0.600" and lines[3].split("|")[10].strip() == "12.1"
    paths = []
    for i, r in enumerate(recs):
        paths.append(str(tmp_path / f"{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(r, f)
    assert cluster.print_cluster_table(paths) == 0
    out = capsys.readouterr().out
    assert "largest projection error: 3.3%" in out and "warning (100mbit): tg64's 3 repeats" in out


def test_scaling_plot_starts_at_zero_and_shows_the_ceilings():
    plt = pytest.importorskip("matplotlib.pyplot")
    recs = [{"model": "m", "ranks": n, "tests": [{"test": "pp128", "mean": pp, "sd": 1.0},
                                                {"test": "tg64", "mean": tg, "sd": 1.0}],
             "roofline": {"prefill_bound_tokens_per_s": 1.2 * pp, "decode_bound_tokens_per_s": 1.1 * tg},
             "decode_products": {"ms_per_token": 900 / tg}} for n, pp, tg in ((1, 500.0, 48.0), (2, 900.0, 80.0))]
    fig = plots.scaling_figure(recs, plt)
    pp_ax, tg_ax = fig.axes
    for ax in (pp_ax, tg_ax):
        assert ax.get_ylim()[0] == 0
    labels = [line.get_label() for line in tg_ax.get_lines()]
    assert "ceiling: DRAM roofline" in labels and "ceiling: products alone" in labels
    assert any(label.startswith("ceiling: prefill roofline") for label in [x.get_label() for x in pp_ax.get_lines()])
    plt.close(fig)


def test_batch_tables():
    def rec(b, agg, ceiling, bound):
        return {"batch": b, "n_prompt": 64, "n_gen": 32, "n_kv": b * 95, "prefill_seconds": 0.07 * b,
                "prefill_tokens_per_s": 914.3, "decode_seconds": 0.35, "decode_tokens_per_s": agg,
                "decode_tokens_per_s_per_sequence": agg / b, "total_seconds": 0.07 * b + 0.35,
                "total_tokens_per_s": b * 95 / (0.07 * b + 0.35), "read_bytes_per_step": 250e6 + b * 1e6,
                "flops_per_step": b * 124e6, "read_bandwidth_GBps": [25.0, 27.0], "gemm_GFps": 80.0,
                "ceiling_tokens_per_s": ceiling, "bound": bound, "percent_of_ceiling": 100 * agg / ceiling,
                "runs": [{}, {}]}

    batch = [rec(1, 88.57, 100.0, "DRAM"), rec(16, 708.6, 1000.0, "GEMM")]
    lines = report.batched_bench_table(batch).splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s",
                                                             "T_TG s", "S_TG t/s", "T s", "S t/s"]
    assert lines[2] == "| 64 | 32 |  1 |   95 |  0.070 |   914.30 |  0.350 |    88.57 | 0.420 |  226.19 |"
    lines = report.batch_ceiling_table(batch).splitlines()
    assert lines[0].startswith("| batch | aggregate t/s | per sequence t/s | x batch 1 | MB read/step |")
    assert "| ----- | -----------: | ------- | ------- | -------------------: | ------: |" in lines[1]  # words left
    # a record from before the products were timed: no product, no measured ceiling
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["16", "708.60", "44.29", "8.00x", "266.00", "1984.0",
                                                             "26.0", "80.0", "1000.00", "GEMM", "71%", "-", "-", "-",
                                                             "-"]
    timed = dict(batch[1], product="GEMM", fastest_product="row by row", products_ceiling_tokens_per_s=800.0,
                 percent_of_products_ceiling=100 * 708.6 / 800)
    assert [c.strip() for c in report.batch_ceiling_table([batch[0], timed]).splitlines()[3].split("|")[12:-1]] == [
        "GEMM", "row by row", "800.00", "89%"]
    text = report.format_batch({"batch": batch})
    assert text.count("| S_TG t/s |") == 1 and text.count("% of ceiling") == 1 and "mean of 2 run(s)" in text
    assert "projected" not in text  # a record from before the projection
    for r, t in zip(batch, (80.0, 600.0)):
        r["projection"] = {"tokens_per_s": t, "error_percent": 100 * (t / r["decode_tokens_per_s"] - 1),
                           "compute_ms_per_step": 9.5, "allreduce_calls_per_step": 25.0, "link_ms_per_step": 2.25,
                           "bound": "compute + latency"}
    lines = report.batch_projection_table(batch).splitlines()
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["16", "708.60", "600.00", "-15.3%", "9.500", "25",
                                                             "2.250", "compute + latency"]
    assert report.format_batch({"batch": batch}).count("| projected t/s |") == 1


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
    block_fn = vars(model)["block_fn"]
    n = 6
    rec = timing.decode_breakdown(model, n)
    assert rec["calls"] == n * 5  # not the prompt's
    assert rec["bytes"] == n * ceilings.allreduce_payload_bytes(TINY, 1, 4)
    assert rec["collectives"] == n * (5 + 2)  # and each token's choice: a Gather and a Bcast
    (parts,) = rec["ranks"]
    assert list(parts) == list(timing.CATEGORIES) + ["barrier", "total"] and rec["rank"] == 0
    assert sum(parts[k] for k in timing.CATEGORIES) == pytest.approx(parts["total"], rel=1e-12)
    assert rec["seconds"] == parts["total"] and parts["lm_head"] >= n * head_sleep
    assert parts["wait"] == pytest.approx(0, abs=1e-9)  # one rank waits for nobody
    assert rec["critical_s"] == pytest.approx(parts["blocks"] + parts["lm_head"] + parts["other"], rel=1e-9)
    assert min(parts[k] for k in ("blocks", "lm_head", "other", "allreduce", "gather_bcast")) >= 0
    assert parts["blocks"] > 0  # the block function the forward calls is the one timed (it ran, so it took time)
    assert vars(model)["lm_head"] is slow_head and vars(model)["block_fn"] is block_fn and model.comm is tc  # restored
    rec = timing.prefill_breakdown(model, 8)
    (parts,) = rec["ranks"]
    assert parts["lm_head"] >= head_sleep and parts["gather_bcast"] == 0
    assert sum(parts[k] for k in timing.CATEGORIES) == pytest.approx(rec["seconds"], rel=1e-12)


def test_combine_tells_the_wait_for_the_slowest_rank_from_the_collectives():
    # Hand-made figures (seconds, binary fractions: exact). Rank 0 computes 1 + 1 + 1 between its collectives,
    # rank 1 2 + 2 + 1.5: the critical path is 5.5. Rank 0's Barriers took 4, of which 2.5 was its wait for
    # rank 1 and 1.5 the Barrier's own latency; rank 1's took 0.25, all latency (it was last to arrive).
    def parts(blocks, lm_head, other, barrier):
        return dict(blocks=blocks, lm_head=lm_head, other=other, allreduce=0.25, gather_bcast=0.125, barrier=barrier)

    own = [(7.375, parts(2, 0.5, 0.5, 4), [1, 1, 1]), (6.125, parts(4, 1, 0.5, 0.25), [2, 2, 1.5])]
    recs = run_ranks(2, lambda c: timing.combine(c, *own[c.Get_rank()]))
    assert recs[0] == recs[1] and recs[0]["critical_s"] == 5.5 and recs[0]["rank"] == 1
    fast, slow = recs[0]["ranks"]
    assert (fast["wait"], fast["barrier"], fast["total"]) == (2.5, 1.5, 5.875)
    assert (slow["wait"], slow["barrier"], slow["total"]) == (0, 0.25, 5.875) and recs[0]["seconds"] == 5.875
    assert fast["allreduce"] == slow["allreduce"] == 0.25  # the collectives alone: no wait in them
    bad = [(1.0, parts(1, 0, 0, 0), [1]), (1.0, parts(1, 0, 0, 0), [0.5, 0.5])]
    with pytest.raises(RuntimeError, match="different numbers of collective calls"):
        run_ranks(2, lambda c: timing.combine(c, *bad[c.Get_rank()]))


def test_breakdown_on_ranks_that_wait_for_a_slow_one_adds_up():
    # Rank 1's LM head sleeps 20 ms a token, so rank 0 waits for it. What the instrument guarantees whatever
    # the machine's load: the sleep lies on the critical path, each rank's compute plus its wait is that path,
    # its parts add up to its total, and the rank named is the one with the most compute.
    n, sleep = 4, 0.02

    def run(c):
        model = models.random_model(TINY, TimedComm(WithBarrier(c)), np.float32)
        if c.Get_rank() == 1:
            def slow_head(x):
                time.sleep(sleep)
                return Model.lm_head(model, x)

            model.lm_head = slow_head
        return timing.decode_breakdown(model, n)

    recs = run_ranks(2, run)
    assert recs[0]["ranks"] == recs[1]["ranks"] and recs[0]["critical_s"] >= n * sleep
    ranks = recs[0]["ranks"]
    assert ranks[1]["lm_head"] >= n * sleep
    compute = [r["blocks"] + r["lm_head"] + r["other"] for r in ranks]
    assert recs[0]["rank"] == int(np.argmax(compute))
    for r, own in zip(ranks, compute):
        assert sum(r[k] for k in timing.CATEGORIES) == pytest.approx(r["total"], rel=1e-9)
        assert own + r["wait"] == pytest.approx(recs[0]["critical_s"], rel=1e-9) and r["wait"] >= -1e-12
        # the Barriers' measured time is wait plus their own cost; the split between them is an estimate that a
        # rank leaving one collective later than another can push below 0 (CI saw -0.22 ms on a busy machine)
        assert min(r["allreduce"], r["gather_bcast"], r["barrier"] + r["wait"]) >= 0


def test_projection_adds_each_collective_or_lets_the_link_bind():
    # 10 ms of compute, 25 Allreduce of 50 us and one choice of 80 us: 11.33 ms a token; back to back the
    # calls take 50 us too (latency sets the pace), 1.33 ms
    assert ceilings.project_decode(0.010, 25, 50e-6, 1, 80e-6, 50e-6) == (pytest.approx(0.01133),
                                                                            "compute + latency")
    # the same token over a link that takes 3 ms a call once its burst is spent: 75.08 ms, and the link binds
    assert ceilings.project_decode(0.010, 25, 50e-6, 1, 80e-6, 3e-3) == (pytest.approx(0.07508), "link rate")
    assert ceilings.project_decode(0.010, 0, 0, 0, 0, 0) == (0.010, "compute + latency")  # one rank


def test_link_measurement_on_one_rank():
    link = ceilings.measure_link(comm.serial(), np.float32, 3072, 5, bulk_bytes=1 << 16, rounds=2, min_seconds=0.01)
    assert link["bulk_bytes"] == 1 << 16
    assert link["sustained_Bps"] is None and link["pause_s"] == 0  # nothing crosses a link
    assert link["message_bytes"] == 3072 and min(link["allreduce_s"], link["gather_bcast_s"],
                                                 link["back_to_back_s"]) > 0


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
    # a GEMM rate measured before each prefill repeat: each against its own
    rf = ceilings.roofline([50.0], [10e9], 100e6, [400.0, 400.0], [10e9, 10e9], 100, 1e8, [50e9, 25e9], 20e6)
    assert rf["gemm_GFps"] == 37.5 and rf["gemm_GFps_per_repeat"] == [50, 25]
    assert rf["prefill_percent"] == pytest.approx(100 * 400 * (0.202 + 0.402) / 2 / 100)


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-1b", "qwen2-0.5b", "gemma3-270m", "qwen3-0.6b",
                                    "pythia-160m"])
def test_fixed_cost_model_keeps_depth_heads_and_layer_kinds(preset):
    cfg = config_from_dict(models.PRESETS[preset])
    small = models.fixed_cost_config(cfg, 2)
    same = ("family", "n_layer", "n_head", "n_kv_head", "n_ctx", "qkv_bias", "out_bias", "mlp_bias",
            "tie_word_embeddings", "rope", "windows", "parallel_residual")
    assert [getattr(small, k) for k in same] == [getattr(cfg, k) for k in same]
    assert small.d_head == 4 and small.n_embd == 4 * cfg.n_head
    assert n_params(small) * 4 < 8 << 20  # every weight fits in the last-level cache
    shard_for(small, 0, 2)  # valid wherever the real model is
    def run(c):  # and it runs
        m = models.random_model(small, c, np.float32)
        return m.forward([1, 2, 3], m.new_cache(3))
    assert all(np.isfinite(logits).all() for logits in run_ranks(2, run))


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
    for key, runs in (("decode_breakdown", 2), ("prefill_breakdown", 1)):
        b = rec[key]
        assert b["runs"] == runs and len(b["per_rank_ms"]) == ranks and 0 <= b["rank"] < ranks
        for r in b["per_rank_ms"]:
            assert sum(r[k] for k in timing.CATEGORIES) == pytest.approx(r["total"])
            assert r["blocks"] + r["lm_head"] + r["other"] + r["wait"] == pytest.approx(b["critical_compute_ms"],
                                                                                        rel=1e-9)
    pj = rec["projection"]
    assert pj["allreduce_calls_per_token"] == 5 and pj["choices_per_token"] == 1
    assert pj["wire_bytes_per_token"] == ceilings.ring_wire_bytes(5 * 64 * 4, ranks)
    assert pj["error_percent"] == pytest.approx(100 * (pj["tokens_per_s"] / rec["tests"][1]["mean"] - 1))
    assert len(pj["tokens_per_s_per_repeat"]) == 2 and pj["bound"] in ("compute + latency", "link rate")
    assert (pj["link_sustained_MBps"] is None) == (ranks == 1)
    (m,) = rec["environment"]["machine"]  # every rank of this test runs on this machine
    assert m["cores"] >= 1 and len(m["hosts"]) == len(rec["environment"]["hosts"])
    assert rec["warnings"] == report.find_warnings(rec)
    assert len(rec["roofline"]["gemm_GFps_per_repeat"]) == 2
    held = tiny_weight_bytes(ranks)
    assert rec["weights"]["bytes_per_rank"] == held == [m["weight_bytes"] for m in rec["memory_per_rank"]]
    assert rec["weights"]["imbalance"] == pytest.approx(max(held) * ranks / sum(held))
    assert rec["lm_head"]["bytes_per_rank"] == 64 * rec["lm_head"]["n_vocab_local"] * 4
    assert rec["lm_head"]["n_vocab_local"] == -(-256 // ranks)
    assert rec["environment"]["mpi_library"]
    check_ceilings(rec, ranks)


def check_ceilings(rec, ranks):
    """Each ceiling the record reports is computed from the figures it reports beside it."""
    rf, (pp, tg) = rec["roofline"], rec["tests"]
    read = run_ranks(ranks, lambda c: ceilings.decode_read_bytes(models.random_model(TINY, c, np.float32), 5))[0]
    assert rf["decode_bytes_per_token"] == read  # rank 0's: every weight once, the cache at 1 + 8 // 2 positions
    bws = [g * 1e9 for g in rf["read_bandwidth_GBps_per_repeat"]["tg"]]
    assert rf["decode_bound_tokens_per_s"] == pytest.approx(np.mean(bws) / read, rel=1e-9)
    assert rf["decode_percent"] == pytest.approx(100 * np.mean([t * read / bw for t, bw in
                                                                zip(tg["tokens_per_s"], bws)]), rel=1e-9)
    assert (rf["decode_tokens_per_s"], rf["prefill_tokens_per_s"]) == (tg["mean"], pp["mean"])
    assert (tg["mean"], tg["sd"]) == timing.mean_sd(tg["tokens_per_s"])
    assert [r["batch"] for r in rec["batch"]] == [1, 3]  # --batch 3,1: sorted
    for r in rec["batch"]:
        b = r["batch"]
        assert (r["n_prompt"], r["n_gen"], r["n_kv"], len(r["runs"])) == (8, 4, b * 11, 2)
        assert [(x["prefill_tokens"], x["decode_tokens"]) for x in r["runs"]] == [(8 * b, 3 * b)] * 2
        assert r["decode_tokens_per_s"] == pytest.approx(b * r["decode_tokens_per_s_per_sequence"])
        assert r["bound"] in ("DRAM", "GEMM") and len(r["read_bandwidth_GBps"]) == 2
        own = [ceilings.batch_ceiling(b, r["read_bytes_per_step"], r["flops_per_step"] / b, 1e9 * bw,
                                      1e9 * r["gemm_GFps"])[0] for bw in r["read_bandwidth_GBps"]]
        assert r["ceiling_tokens_per_s"] == pytest.approx(np.mean(own), rel=1e-9)
        agg = [x["decode_tokens"] / x["decode_seconds"] for x in r["runs"]]
        assert r["percent_of_ceiling"] == pytest.approx(100 * np.mean(np.divide(agg, own)), rel=1e-9)


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


def test_bench_reports_the_bytes_each_comm_dtype_sends(tmp_path):
    # The tiny preset (2 blocks of width 64) on every rank of this session; rank 0's record: per decode token, the
    # embedding's float32 row and 4 block rows of 2 q8_0o blocks (37 bytes each), as wire_allreduce sends them.
    world = MPI.COMM_WORLD
    if world.size > TINY.n_head:
        pytest.skip(f"the tiny preset has fewer heads than {world.size} ranks")
    sent = {}
    for fmt in ("float32", "q8_0o"):
        out = str(tmp_path / f"{fmt}.json")
        assert world.allreduce(main(TINY_ARGS + ["--comm-dtype", fmt, "--json-out", out]), op=MPI.MAX) == 0
        if world.rank == 0:
            with open(out) as f:
                rec = json.load(f)
            assert rec["comm_dtype"] == fmt and rec["allreduce"]["measured_calls_per_token"] == 5
            sent[fmt] = rec["allreduce"]["sent_bytes_per_token"]
    if world.rank == 0:
        assert sent["float32"] == 5 * comm.sent_bytes(64, 4, world.size, 0)
        assert sent["q8_0o"] == comm.sent_bytes(64, 4, world.size, 0) + 4 * comm.sent_bytes(2, 37, world.size, 0)


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
    # What is printed is the record's figures, formatted (each format is tested on hand-made figures above):
    # the table, the report under it, the batch tables and the warnings, section by section, as they came.
    sections = [report.format_table(table_rows(rec)), report.format_report(rec), report.format_batch(rec)]
    if rec["warnings"]:
        sections.append(report.format_warnings(rec["warnings"]))
    assert r.stdout == "\n\n".join(sections) + f"\n\nJSON record: {out}\n"
    assert re.search(r"^\| tiny \(random\) \| +0\.12 M \| float32 \| +2 \| .* \| tg8 +\| ", r.stdout, re.M)
    mb = ", ".join(f"{b / 1e6:.3g}" for b in tiny_weight_bytes(2))
    assert f"weights per rank: {mb} MB; imbalance (max/mean) 1.00" in r.stdout
    assert "MiB" not in r.stdout  # one unit family: decimal, like the rates
    assert re.search(r"^  wait for the slowest rank before the collectives, by rank: [\d.]+, [\d.]+ ms", r.stdout, re.M)
    assert re.search(r"^projection, decode: compute .* measured \([+-]\d+\.\d%\)", r.stdout, re.M)
    assert re.search(r"^\|  8 \|  4 \| 3 \|   33 \| ", r.stdout, re.M)  # the batched-bench table, batch 3
    share = re.escape(report.percent(rec["batch"][1]["percent_of_ceiling"]))  # the warning beside it if above 100%
    fastest = "(GEMM|padded GEMM|row by row)"  # whichever was faster in this run
    assert re.search(rf"^\|     3 \| .* \| (DRAM|GEMM)  \| +{share} \| row by row \| {fastest} +\| +[\d.]+ \| .+ \|$",
                     r.stdout, re.M)  # 3 rows: the model multiplies them row by row (mpitp.matrix)
    assert r.stderr.count("bench: ") == r.stderr.count(" ...\n") >= 3  # progress lines only: no error
    s = run_bench(["--summarize", str(out), str(out), "--plot", str(tmp_path / "s.png"),
                   "--batch-plot", str(tmp_path / "b.png")], 1)
    assert s.returncode == 0, s.stderr
    assert "| 2 | " in s.stdout and s.stdout.count("| 1.00x | 100% |") == 4  # pp and tg of both records
    assert (tmp_path / "s.png").exists() or "plot: skipped" in s.stdout
    assert s.stdout.count("# batched decode against its ceiling, 2 ranks") == 2
    assert (tmp_path / "b.png").exists() or "batch plot: skipped (matplotlib" in s.stdout
    c = run_bench(["--cluster-table", str(out), str(out)], 1)
    assert c.returncode == 0, c.stderr
    assert c.stdout.count("| 1 host ") == 2 and "largest projection error" in c.stdout


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


# Bad input, by what is wrong: the arguments after --preset tiny, and what the one error line says.
SIZES = [
    ("-n 200", "--n-prompt must be at most 128 and --n-gen/--long at most 126"),
    ("--long 5", "--long must be >= 10"), ("--long -5", "--long must be >= 10"),
    ("--roofline-mib 0", "--n-prompt, --n-gen, --repeats and --roofline-mib must be >= 1"),
    ("--roofline-mib 100000000", "--roofline-mib 100000000 (the probe's matrix, twice) needs 390625.00 GiB"),
    ("--dtype float16", "argument --dtype: invalid choice: 'float16'"),  # argparse's own errors too
]
OUTPUTS = [
    ("--json-out /proc/mpitp.json", "--json-out /proc/mpitp.json: cannot write in /proc"),
    ("--json-out=", "--json-out: give a file name, or leave the option out."),
    ("--batch-plot /proc/self/x/b.png", "--batch-plot /proc/self/x/b.png: cannot write in /proc/self"),
    # as root the temporary file can be made in /dev: the device itself is what must be refused
    ("--json-out /dev/null", "--json-out /dev/null: /dev/null is a character device, not a regular file"),
    ("--batch-plot /dev/null", "--batch-plot /dev/null: /dev/null is a character device, not a regular file"),
]
BATCHES = [
    ("--batch 1,x", "--batch must be batch sizes >= 1, comma-separated (e.g. 1,2,4), or none; got '1,x'"),
    ("--batch 0", "--batch must be batch sizes >= 1"),
    ("--batch-gen 1", "--batch-prompt and --batch-repeats must be >= 1 and --batch-gen >= 2"),
    ("--batch-prompt 100", "--batch-prompt plus --batch-gen must be at most the model's context of 128"),
    ("--batch 1,100000000", "this rank's shard of the model and its KV cache for --batch 100000000 "
                            "(100000000 x 95 positions) needs"),
]


@serial_only
@pytest.mark.parametrize("args, message", SIZES + OUTPUTS + BATCHES)
def test_cli_refuses_bad_input_once(args, message):
    r = run_bench(["--preset", "tiny", *args.split(" ")], 2)
    assert r.returncode == 2
    assert r.stderr.count("bench: error:") == 1 and f"bench: error: {message}" in r.stderr


def one_error(r, message):
    """One line on stderr names what is wrong, status 2, no traceback."""
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert r.returncode == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr, r.stderr


@serial_only
def test_outputs_replace_only_regular_files(tmp_path):
    # A FIFO (as a device, /dev/null above) is never replaced by a regular file, nor written into: refused before
    # the run (nothing on stdout), and still a FIFO after.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = run_bench(["--preset", "tiny", "--json-out", str(fifo)], 2)
    one_error(r, f"--json-out {fifo}: {fifo} is a FIFO, not a regular file")
    assert r.stdout == "" and stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["fifo"]
    record = tmp_path / "rec.json"
    record.write_text(json.dumps(fake_record(None, 80.0, 78.0, 1.5, [0.4, 0.1])))
    for option in ("--plot", "--batch-plot"):
        r = run_bench(["--summarize", str(record), option, str(fifo)], 1)
        one_error(r, f"{option} {fifo}: {fifo} is a FIFO, not a regular file")
        assert r.stdout == "" and stat.S_ISFIFO(os.stat(fifo).st_mode)


FULL_DISK = """
from mpi4py import MPI  # MPI first: its shared memory files must not meet the limit
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a write past 4 kB fails (EFBIG), like a full disk
from bench.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@serial_only
def test_a_record_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "rec.json"
    out.write_text("the record of an earlier run")
    args = ["--preset", "tiny", "-r", "1", "-p", "8", "-n", "4", "--roofline-mib", "8", "--batch", "none"]
    r = subprocess.run(mpirun(2) + [sys.executable, "-c", FULL_DISK, *args, "--json-out", str(out)],
                       capture_output=True, text=True, timeout=300, env=child_env(), cwd=str(REPO))
    one_error(r, f"bench: error: --json-out {out}: could not be written (File too large); nothing was left behind.")
    assert "| tg4 " in r.stdout and "JSON record" not in r.stdout  # the report came; the record did not
    assert os.listdir(tmp_path) == ["rec.json"] and out.read_text() == "the record of an earlier run"


def test_replace_file_writes_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out.png"
    replace_file(str(path), lambda f: f.write(b"first"), "--x")
    replace_file(str(path), lambda f: f.write(b"second"), "--x")
    assert path.read_bytes() == b"second" and os.listdir(tmp_path) == ["out.png"]

    def full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(MpitpError, match=r"^--x out: could not be written \(No space left on device\); nothing"):
        replace_file(str(path), full, "--x out")
    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C mid-write: the temporary file goes too
        replace_file(str(path), interrupted, "--x")
    assert path.read_bytes() == b"second" and os.listdir(tmp_path) == ["out.png"]
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(MpitpError, match="is a FIFO, not a regular file"):
        replace_file(str(tmp_path / "fifo"), lambda f: f.write(b"x"), "--x")
    replace_file(str(tmp_path / "new" / "deep.json"), lambda f: f.write(b"{}"), "--x")  # its folder made
    assert (tmp_path / "new" / "deep.json").read_bytes() == b"{}"


def test_records_without_the_fields_a_table_reads_are_refused_naming_the_file(tmp_path, capsys):
    def write(name, record):
        (tmp_path / name).write_text(json.dumps(record))
        return str(tmp_path / name)

    for record, why in (({"tests": []}, "no model, dtype, ranks, threads"),
                        (dict(fake_record(None, 1.0, 1.0, 1.0, [0.1]), tests=[]), "its tests are not a non-empty"),
                        (dict(fake_record(None, 1.0, 1.0, 1.0, [0.1]), ranks=0), "ranks 0 is not a rank count"),
                        ([1], "not a JSON object")):
        path = write("r.json", record)
        with pytest.raises(MpitpError, match=f"^{re.escape(path)}: not a JSON record of the bench \\({why}"):
            summary.read_records([path])
    lacking = dict(fake_record(None, 1.0, 1.0, 1.0, [0.1]))
    del lacking["projection"]
    paths = [write("a.json", fake_record(None, 1.0, 1.0, 1.0, [0.1])), write("b.json", lacking)]
    with pytest.raises(MpitpError, match="a.json, .*b.json: a record lacks a field the tables read, or holds "
                                         "another kind of value \\(KeyError: 'projection'\\)"):
        cluster.print_cluster_table(paths)
    with pytest.raises(MpitpError, match="ZeroDivisionError"):  # a record whose tokens/s are 0
        summary.summarize([write("z.json", dict(fake_record(None, 1.0, 1.0, 1.0, [0.1]), tests=[
            {"test": "tg64", "mean": 0.0, "sd": 0.0}])), paths[0]])
    assert capsys.readouterr().out == ""  # nothing printed before the refusal


@serial_only
def test_cli_summarize_of_an_empty_record_is_one_line(tmp_path):
    (tmp_path / "r.json").write_text('{"tests": []}')
    r = run_bench(["--summarize", str(tmp_path / "r.json")], 1)
    one_error(r, f"bench: error: {tmp_path / 'r.json'}: not a JSON record of the bench (no model, dtype, ranks")
    assert r.stdout == ""


@serial_only
def test_memory_script_errors_read_like_the_benchs(tmp_path):
    for args, message in (([], "the following arguments are required: --model"),
                          (["--model", str(tmp_path / "none")], "model folder not found")):
        r = subprocess.run([sys.executable, str(REPO / "bench" / "memory.py"), *args], capture_output=True,
                           text=True, timeout=60, env=child_env(), cwd=str(REPO))
        assert r.returncode == 2 and r.stderr.count("bench: error:") == 1 and message in r.stderr


@serial_only
@pytest.mark.parametrize("table", ["--summarize", "--cluster-table"])
def test_a_table_that_cannot_be_written_is_an_error(tmp_path, table):
    # Before: with stdout closed (>&-) the table was lost and the status was 0; on /dev/full "unexpected error",
    # status 1. A closed stdout is refused before any work.
    path = tmp_path / "r.json"
    path.write_text(json.dumps(fake_record(None, 80.0, 78.0, 1.5, [0.4, 0.1])))
    closed, full, gone = unwritable_stdout([sys.executable, "-m", "bench", table, str(path)])
    assert [(r.returncode, r.stderr) for r in (closed, full, gone)] == [(2, "bench: " + CLOSED), (2, "bench: " + FULL),
                                                                       (141, "")]


def test_the_pipeline_projection_takes_the_longest_of_its_three_bounds():
    from bench.stages import format_stages, project_stages
    hop = {"idle_s": 0.005, "stream_s": 0.004, "tokens_s": 0.001, "message_bytes": 6208}
    # 2 stages of 3 and 4 ms per micro-batch: a micro-batch's cycle 3 + 5 + 4 + 1 = 13 ms; the busiest stage's
    # 2 micro-batches 8 ms; the link's 2 messages back to back 8 ms: the cycle binds, 4 sequences in 13 ms
    p = project_stages([0.003, 0.004], hop, 2, 4)
    assert p["bound"] == "cycle" and p["tokens_per_s"] == pytest.approx(4 / 0.013)
    assert p["step_ms"] == pytest.approx({"cycle": 13.0, "busiest stage": 8.0, "link rate": 8.0})
    assert project_stages([0.003, 0.010], hop, 4, 8)["bound"] == "busiest stage"  # 40 ms against 19
    assert project_stages([0.001, 0.001], dict(hop, stream_s=0.02), 2, 4)["bound"] == "link rate"
    entry = {"n_batch": 4, "prefill_tokens_per_s": 900.0, "decode_tokens_per_s": 300.0, "bubble": 0.25,
             "stage_wait_share": [0.2, 0.3]}
    rec = {"model": "m", "dtype": "float32", "pp": 2, "tp": 1, "layers": [6, 6], "n_prompt": 8, "n_gen": 8,
           "pipeline": [dict(entry)]}
    row = format_stages(rec).splitlines()[-1]  # a record from before the projection
    assert [c.strip() for c in row.split("|")[1:-1]] == ["4", "900.0", "300.00"] + ["-"] * 5 + ["25%", "20% 30%"]
    assert p["hop_ms"] == pytest.approx({"idle_ms": 5.0, "stream_ms": 4.0, "tokens_ms": 1.0})
    rec["pipeline"][0]["projection"] = dict(p, error_percent=100 * (p["tokens_per_s"] / 300 - 1))
    row = format_stages(rec).splitlines()[-1]
    assert [c.strip() for c in row.split("|")[1:-1]] == ["4", "900.0", "300.00", "307.69", "+2.6%", "cycle",
                                                        "3.00 4.00", "5.00", "25%", "20% 30%"]


def test_the_pipeline_bench_holds_the_layers_given():
    # --pp-layers: each stage draws the layers given, in both orders (one of them is not the default split).
    from bench.stages import stage_model
    config = config_from_dict(dict(models.PRESETS["tiny"], n_layer=3), "preset tiny, 3 layers")
    split = lambda c, given: stage_model(config, c, np.float32, 2, given).stage.counts  # noqa: E731
    assert run_ranks(2, lambda c: (split(c, [1, 2]), split(c, [2, 1]))) == [((1, 2), (2, 1))] * 2
    # --comm-dtype: each stage's reductions in that format (before, the option was silently left out)
    wire = lambda c: type(stage_model(config, c, np.float32, 2, comm_dtype="bfloat16").comm).__name__  # noqa: E731
    assert run_ranks(4, wire) == ["WireComm"] * 4
