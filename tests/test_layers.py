"""Layer math against independent formulas."""

import math

import numpy as np
import pytest

import dense_reference
from mpitp.config import RopeConfig, config_from_dict
from mpitp.layers import apply_rope, attention, causal_mask, erf, gelu_erf, rope_inv_freq, rope_tables, silu
from mpitp import matrix as mx
from mpitp.matrix import ROW_BY_ROW, Matrix, matrix, padded_product, padded_rows, rows_product


def test_rope_is_a_complex_rotation_of_half_pairs():
    # Rotate-half RoPE: dims i and i + d/2 form the complex number x_i + 1j*x_{i+d/2}, turned by pos * f_i.
    rng = np.random.default_rng(0)
    d_head, positions = 16, np.array([0, 1, 5, 1000])
    x = rng.standard_normal((len(positions), 3, d_head))
    inv_freq = rope_inv_freq(RopeConfig(theta=10000.0), d_head)
    assert np.allclose(inv_freq, [10000.0 ** (-2 * i / d_head) for i in range(d_head // 2)], rtol=1e-15)
    out = apply_rope(x, rope_tables(inv_freq, positions, np.float64))
    z = (x[..., :d_head // 2] + 1j * x[..., d_head // 2:]) * np.exp(1j * positions[:, None, None] * inv_freq)
    assert np.abs(out - np.concatenate([z.real, z.imag], axis=-1)).max() < 1e-12


def test_partial_rope_turns_the_first_dims_and_passes_the_rest():
    # GPT-NeoX's partial rotary: rotate-half within the first r dims of each head (pairs i, i + r/2); the other
    # d_head - r dims pass unchanged.
    rng = np.random.default_rng(1)
    d_head, r, positions = 16, 4, np.array([0, 3, 77])
    x = rng.standard_normal((len(positions), 2, d_head))
    inv_freq = rope_inv_freq(RopeConfig(theta=10000.0), r)
    out = apply_rope(x, rope_tables(inv_freq, positions, np.float64))
    z = (x[..., :r // 2] + 1j * x[..., r // 2:r]) * np.exp(1j * positions[:, None, None] * inv_freq)
    assert np.abs(out[..., :r] - np.concatenate([z.real, z.imag], axis=-1)).max() < 1e-12
    assert np.array_equal(out[..., r:], x[..., r:])


def test_erf_and_the_exact_gelu_against_math_erf():
    # NumPy has no erf: mpitp's (a series, then a continued fraction past 2.5) against the C library's, over
    # the whole range, both branches and their seam, signs and the far tails.
    x = np.concatenate([np.linspace(-12, 12, 48001), [0.0, -0.0, 2.5, -2.5, 2.5000001, 1e-300, 40.0, -40.0]])
    expected = np.array([math.erf(v) for v in x])
    assert np.abs(erf(x) - expected).max() < 1e-14
    assert np.abs(gelu_erf(x.copy()) - x * 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x]))).max() < 1e-13
    assert gelu_erf(np.array([1.0], np.float32)).dtype == np.float32


def test_llama3_scaling_in_all_three_wavelength_bands():
    # Published llama3 rule (factor 8, low 1, high 4, original 8192): wavelengths under 8192/4 = 2048 are
    # kept, over 8192/1 are slowed 8x, and in between blended with smooth = (8192/wavelen - 1) / (4 - 1).
    rope = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_positions=8192)
    d_head = 128
    plain = 500000.0 ** (-np.arange(0, d_head, 2) / d_head)
    scaled = rope_inv_freq(rope, d_head)
    wavelen = 2 * math.pi / plain
    bands = {"kept": wavelen < 2048, "slowed": wavelen > 8192, "blended": (wavelen >= 2048) & (wavelen <= 8192)}
    assert all(b.any() for b in bands.values())
    assert np.array_equal(scaled[bands["kept"]], plain[bands["kept"]])
    assert np.allclose(scaled[bands["slowed"]], plain[bands["slowed"]] / 8, rtol=1e-15)
    i = int(np.flatnonzero(bands["blended"])[0])
    smooth = (8192 / wavelen[i] - 1) / 3
    assert math.isclose(scaled[i], (1 - smooth) * plain[i] / 8 + smooth * plain[i], rel_tol=1e-14)
    # and the same as the dense reference, read from a transformers-4 style config
    cfg = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    assert np.allclose(scaled, dense_reference.rope_inv_freq(cfg, d_head), rtol=1e-14)
    parsed = config_from_dict({"model_type": "llama", "hidden_size": 1024, "num_attention_heads": 8,
                               "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 8,
                               "max_position_embeddings": 8, **cfg})
    assert parsed.rope == rope


@pytest.mark.parametrize("head_runs, kv_of_head", [
    (((0, 4, 0, 2),), [0, 0, 1, 1]),  # an even split: 2 query heads per key/value head
    (((0, 1, 0, 1), (1, 4, 1, 2)), [0, 1, 1, 1]),  # a group cut by the rank before: 1 head, then 3
    (((0, 2, 0, 2), (2, 4, 2, 3)), [0, 1, 2, 2]),  # a cut group, then one of 2
])
def test_attention_against_explicit_loops(head_runs, kv_of_head):
    # Two sequences at different positions, a cache of earlier positions and a causal mask, against a
    # per-sequence, per-head, per-query loop.
    rng = np.random.default_rng(1)
    n_seq, n_head, d = 3, 4, 8
    starts = np.array([4, 1])
    n_kv_head = max(kv_of_head) + 1
    Q = rng.standard_normal((2 * n_seq, n_head, d))  # rows: sequence 0's tokens, then sequence 1's
    K = rng.standard_normal((2, n_kv_head, starts.max() + n_seq, d))
    V = rng.standard_normal((2, n_kv_head, starts.max() + n_seq, d))
    positions = starts[:, None] + np.arange(n_seq)
    out = attention(Q, K, V, causal_mask(positions, K.shape[2], np.float64), head_runs).reshape(2, n_seq, n_head, d)
    for b in range(2):
        for h in range(n_head):
            kv = kv_of_head[h]
            for i in range(n_seq):
                visible = starts[b] + i + 1
                s = K[b, kv, :visible] @ Q[b * n_seq + i, h] / math.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                assert np.allclose(out[b, i, h], p @ V[b, kv, :visible], atol=1e-14)


def test_silu_of_large_negative_values_is_exact_and_raises_nothing():
    # exp(-x) overflows float32 below -88: a legitimate inf, which must not trip the overflow check of a run.
    x = np.array([-500.0, -100.0, -89.0, -1.0, 0.0, 1.0, 100.0], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise"):  # as generate runs
        got = silu(x.copy())
    expected = x.astype(np.float64) / (1.0 + np.exp(-x.astype(np.float64)))
    assert np.allclose(got, expected, rtol=1e-6, atol=1e-30)


def test_a_weight_multiplies_a_few_rows_one_by_one_and_more_as_one_product():
    # mpitp.matrix: 2 to ROW_BY_ROW rows, each row's product is exactly its product alone (a GEMV), a panel of
    # columns at a time (4001 columns of 96 rows: two panels, the second ending off the alignment; a last panel of
    # one column or of 66), more rows are one GEMM, with zero rows up to a multiple of 4 (padded_product: 6 and 7
    # rows here); either way the result is a plain array, within float32's rounding of the product. At one BLAS
    # thread, as a rank of two on two cores runs (a threaded GEMV splits the columns its own way).
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        _few_rows_one_by_one_more_as_one_product()


def _few_rows_one_by_one_more_as_one_product():
    rng = np.random.default_rng(2)
    for shape in ((96, 40), (96, 4001), (768, 2305), (768, 2370), (576, 24577)):
        W = rng.standard_normal(shape).astype(np.float32)
        M = matrix(W)
        assert isinstance(M, Matrix) and np.shares_memory(M, W) and matrix(None) is None
        for n in range(1, ROW_BY_ROW + 3):
            x = rng.standard_normal((n, shape[0])).astype(np.float32)
            y = x @ M
            assert type(y) is np.ndarray and y.shape == (n, shape[1])
            if n <= ROW_BY_ROW:
                assert np.array_equal(y, np.stack([row @ W for row in x]))
            assert np.array_equal(rows_product(x, W), np.stack([row @ W for row in x]))
            assert np.abs(y - x.astype(np.float64) @ W.astype(np.float64)).max() < 1e-4
            assert np.abs(padded_product(x, W) - x.astype(np.float64) @ W.astype(np.float64)).max() < 1e-4
            assert padded_rows(n) % 4 == 0 and n <= padded_rows(n) < n + 4
        v = rng.standard_normal(shape[0]).astype(np.float32)
        assert type(v @ M) is np.ndarray and np.array_equal(v @ M, v @ W)
        # what is computed from a weight is a plain array or number; a view of it is still a weight
        assert all(type(a) is np.ndarray for a in (np.matmul(v, M), M * 2, M == W, M @ np.ones(shape[1], np.float32)))
        assert type(M.sum()) is np.float32 and M.sum() == W.sum()
        assert type(M.T) is Matrix and type(M[:, :8]) is Matrix
    # from 256 rows on (a long prompt), the rows are multiplied as they are
    assert [padded_rows(n) for n in (253, 255, 256, 257, 1001)] == [256, 256, 256, 257, 1001]


def test_a_weight_chooses_its_product_by_the_rows_and_leaves_other_shapes_to_numpy(monkeypatch):
    calls = []
    for name in ("rows_product", "padded_product"):
        monkeypatch.setattr(mx, name, lambda x, W, name=name, f=getattr(mx, name): calls.append(name) or f(x, W))
    rng = np.random.default_rng(3)
    W = rng.standard_normal((8, 6))
    M = matrix(W)
    for n, way in ((1, None), (2, "rows_product"), (5, "rows_product"), (6, "padded_product"), (8, "padded_product"),
                   (257, "padded_product")):  # which pads only where padded_rows says (above)
        calls.clear()
        x = rng.standard_normal((n, 8))
        assert np.allclose(x @ M, x @ W, rtol=1e-13, atol=1e-13) and calls == ([way] if way else []), (n, calls)
    # a view of another shape is NumPy's product, rows and all: a column of W, a stack of its halves
    x = rng.standard_normal((5, 8))
    calls.clear()
    assert np.allclose(x @ M[:, 0], x @ W[:, 0]) and calls == []
    assert (x[:, :4] @ M.reshape(2, 4, 6)).shape == (2, 5, 6) and calls == []
    assert np.allclose(x[:, :4] @ M.reshape(2, 4, 6), x[:, :4] @ W.reshape(2, 4, 6))
