"""bench.moe: the bytes each layout's MLP sends, counted at its collectives, against the arithmetic of
mpitp.experts.bytes_per_token, and the expert-load figures of the JSON record (simulated ranks, a tiny preset)."""

from types import SimpleNamespace

import numpy as np
import pytest

from bench.moe import PRESETS, report, run
from threadcomm import run_ranks


def test_counted_bytes_follow_the_arithmetic_and_the_load_adds_up():
    args = SimpleNamespace(preset="mixtral-tiny", n_prompt=24, n_gen=3, repeats=2)
    for size in (2, 3):
        rec = run_ranks(size, lambda c: run(args, c))[0]
        d, k, b = PRESETS["mixtral-tiny"]["hidden_size"], 2, 4
        tensor, expert = (rec["layouts"][x] for x in ("tensor", "expert"))
        # tensor: one Allreduce of every row, whatever the routing
        for phase in ("arithmetic", "prefill", "decode"):
            assert tensor["mlp_bytes_per_token_per_layer"][phase] == 2 * (size - 1) / size * d * b
        # expert: the gather, plus at most every pair out (d + 2 values) and back (d), spread over the ranks
        gather, pairs = (size - 1) / size * d * b, k * (2 * d + 2) * b / size
        for phase in ("prefill", "decode"):
            assert gather <= expert["mlp_bytes_per_token_per_layer"][phase] <= gather + pairs
        even = gather + pairs * (size - 1) / size
        assert expert["mlp_bytes_per_token_per_layer"]["arithmetic"] == pytest.approx(even)
        for layout in (tensor, expert):  # at the routing the run made, the arithmetic is what was counted
            for phase in ("prefill", "decode"):
                assert layout["mlp_bytes_at_the_routing"][phase] == pytest.approx(
                    layout["mlp_bytes_per_token_per_layer"][phase], rel=1e-12)
            assert len(layout["decode_tokens_per_s_per_repeat"]) == 2 and layout["decode_tokens_per_s"] > 0
        for layout in (tensor, expert):  # every token went to k experts in every layer (2 layers)
            assert sum(layout["tokens_per_expert"]) == 2 * k * args.n_prompt
            counts = np.array(layout["tokens_per_expert"])  # over the layers; the imbalance is the worst layer's
            assert layout["imbalance_max_over_mean"] >= counts.max() / counts.mean() >= 1
        assert "expert" in report(rec) and "tensor" in report(rec)
