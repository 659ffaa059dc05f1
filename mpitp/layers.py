"""Layer math: small pure functions of arrays and weights, no state, no communication.

Shapes use named dims: n_rows (new tokens, n_batch sequences of n_seq), n_kv (keys visible after the cache
update), n_embd, n_head_local, n_kv_head_local, d_head. Functions compute in their inputs' dtype; elementwise
ones work in place on one temporary (each avoided one is a pass less over memory on the hot path).
"""

import math

import numpy as np

_MEAN_VECTORS = {}


def _row_mean(x):
    # Mean over the last axis as a matrix-vector product with [1/n, ..., 1/n]: one BLAS call, which is
    # several times cheaper than NumPy's reductions for the one-row arrays of decoding. [..., n] -> [...]
    key = (x.shape[-1], x.dtype)
    if key not in _MEAN_VECTORS:
        _MEAN_VECTORS[key] = np.full(x.shape[-1], 1.0 / x.shape[-1], dtype=x.dtype)
    return x @ _MEAN_VECTORS[key]


def layer_norm(x, weight, bias, eps):
    # GPT-2's LayerNorm. [..., n_embd] -> [..., n_embd] (a new array; x is unchanged)
    y = x - _row_mean(x)[..., None]
    std = _row_mean(np.square(y))
    std += eps
    np.sqrt(std, out=std)
    y /= std[..., None]
    y *= weight
    y += bias
    return y


def rms_norm(x, weight, bias, eps):
    # Llama's RMSNorm; it has no bias (None: the argument keeps one signature for both norms).
    # [..., n_embd] -> [..., n_embd] (a new array; x is unchanged)
    rms = _row_mean(np.square(x))
    rms += eps
    np.sqrt(rms, out=rms)
    y = x / rms[..., None]
    y *= weight
    return y


def gelu_tanh(x):
    # GPT-2's "gelu_new", the tanh approximation of GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    # [...] -> [...] (overwrites x)
    t = x * x
    t *= 0.044715
    t += 1.0
    t *= x  # x + 0.044715 x^3
    t *= np.sqrt(2.0 / np.pi)
    np.tanh(t, out=t)
    t += 1.0
    x *= 0.5
    x *= t
    return x


# erf(z) for |z| <= 2.5 as its Maclaurin series, 2/sqrt(pi) sum (-1)^n z^(2n+1) / (n! (2n+1)), 42 terms in Horner
# form in z^2 (its terms peak near 16 at z = 2.5: a digit of cancellation, no more); beyond, erfc(z) as the continued
# fraction e^(-z^2)/sqrt(pi) / (z + (1/2)/(z + 1/(z + (3/2)/(z + ...)))), 20 levels. Within 6e-15 of math.erf
# everywhere (tests/test_layers.py); NumPy has no erf of its own.
_ERF_SERIES = [2 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(42)][::-1]


def erf(x):
    # The error function. [...] -> [...] (a new array)
    z = np.abs(x)
    out, small = np.empty_like(z), z <= 2.5
    zs = z[small]
    t, y = zs * zs, np.full_like(zs, _ERF_SERIES[0])
    for c in _ERF_SERIES[1:]:
        y *= t
        y += c
    out[small] = y * zs
    zl = z[~small]
    f = zl.copy()
    for k in range(20, 0, -1):
        f = zl + (k / 2) / f
    out[~small] = 1 - np.exp(-zl * zl) / (math.sqrt(math.pi) * f)
    return np.copysign(out, x, out=out)


def gelu_erf(x):
    # GPT-NeoX's "gelu", the exact GELU: x Phi(x) = 0.5 x (1 + erf(x / sqrt(2))). [...] -> [...] (overwrites x)
    t = erf(x * x.dtype.type(1 / math.sqrt(2)))
    t += 1.0
    x *= 0.5
    x *= t
    return x


def silu(x):
    # x * sigmoid(x). [...] -> [...] (overwrites x)
    t = np.negative(x)
    with np.errstate(over="ignore"):  # x below -88 in float32: exp(-x) is inf, and x / inf is the right -0
        np.exp(t, out=t)
    t += 1.0
    x /= t
    return x


def swiglu(x):
    # Llama's MLP activation on [C W_gate | C W_up]: silu(C W_gate) * (C W_up). [..., 2 n] -> [..., n]
    n = x.shape[-1] // 2
    return silu(x[..., :n]) * x[..., n:]


def geglu(x):
    # Gemma's MLP activation on [C W_gate | C W_up]: gelu_tanh(C W_gate) * (C W_up). [..., 2 n] -> [..., n]
    n = x.shape[-1] // 2
    return gelu_tanh(x[..., :n]) * x[..., n:]


def linear(x, W, b):
    # x @ W + b, the bias added in place. [..., in] -> [..., out]
    y = x @ W
    y += b
    return y


def softmax(x):
    # softmax over the last axis; -inf entries get weight 0. [..., n] -> [..., n] (overwrites x)
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x *= 1.0 / x.sum(axis=-1, keepdims=True)  # one division per row, then multiplications
    return x


def rope_inv_freq(rope, d_head):
    """Rotary inverse frequencies, ``[d_head // 2]`` float64, including llama3 scaling when configured."""
    inv_freq = rope.theta ** (-np.arange(0, d_head, 2, dtype=np.float64) / d_head)
    if rope.scaling == "linear":
        inv_freq = inv_freq / rope.factor
    if rope.scaling == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
        wavelen = 2 * np.pi / inv_freq
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        inv_freq = np.where(wavelen > low_wavelen, inv_freq / rope.factor,
                            np.where(wavelen < high_wavelen, inv_freq, blended))
    return inv_freq


def rope_tables(inv_freq, positions, dtype):
    """``(cos, sin)``, each ``[n_rows, 1, r]`` (r = 2 len(inv_freq), the rotary dimensions), for integer positions
    ``[n_rows]``: per dimension the cosine of its angle, and its sine with the sign the turn gives it (``apply_rope``):
    -sin on the first half, +sin on the second."""
    angles = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq
    cos, sin = np.cos(angles), np.sin(angles)
    return (np.concatenate([cos, cos], -1)[:, None].astype(dtype),
            np.concatenate([-sin, sin], -1)[:, None].astype(dtype))


_HALVES_SWAPPED = {}


def apply_rope(x, rope):
    # Hugging Face's rotate-half convention: dimension i is paired with i + r/2 among the first r dimensions of each
    # head (r = d_head but for GPT-NeoX's partial rotary); the rest pass unturned. With the tables' signed sine, the
    # pair (x1, x2) becomes (x1 cos - x2 sin, x2 cos + x1 sin) = x cos + [x2, x1] sin, rounded exactly as that
    # textbook formula is (a - b s = a + b (-s)). No tables, no rotation.
    # [n_rows, n_heads, d_head] -> [n_rows, n_heads, d_head]
    if rope is None:
        return x
    cos, sin = rope
    r = cos.shape[-1]
    if r not in _HALVES_SWAPPED:
        _HALVES_SWAPPED[r] = np.r_[r // 2:r, 0:r // 2]
    y = x[..., :r] * cos
    y += x[..., _HALVES_SWAPPED[r]] * sin
    return y if r == x.shape[-1] else np.concatenate([y, x[..., r:]], axis=-1)


def causal_mask(positions, keys, dtype, window=0):
    """``[n_batch, n_seq, n_kv]``, added to the scores: 0 where the query at ``positions[b, i]`` may see the key at
    position j (``j <= positions[b, i]``, and with a sliding ``window`` ``j > positions[b, i] - window``), -inf where
    it may not (later tokens, cache rows not yet written, keys that slid out of the window). ``keys``: n_kv, keys at
    positions 0 to n_kv - 1, or each key's position ``[n_batch, n_kv]`` (a sliding layer's ring of slots)."""
    positions = np.asarray(positions)[..., None]
    keys = np.arange(keys) if np.isscalar(keys) else np.asarray(keys)[:, None, :]
    visible = (keys <= positions) & (keys > positions - window if window else True)
    return np.where(visible, dtype(0), dtype(-np.inf))


def attention(Q, K, V, mask, head_runs, scale=None):
    """B = softmax(Q Kᵀ / √d_head + mask) V for this rank's heads, against every key and value so far (a model
    that says so scales the scores by its own ``scale`` instead of 1 / √d_head).

    Q ``[n_rows, n_head_local, d_head]`` (n_rows = n_batch n_seq); K, V ``[n_batch, n_kv_head_local, n_kv,
    d_head]``; mask ``[n_batch, n_seq, n_kv]`` (``causal_mask``); ``head_runs`` (``Shard.head_runs``): query heads
    ``h0:h1`` share key/value heads ``k0:k1``, the same number each. Returns B ``[n_rows, n_head_local d_head]``.
    """
    (n_batch, n_seq, n_kv), (_, n_head_local, d_head) = mask.shape, Q.shape
    Q = Q.reshape(n_batch, n_seq, n_head_local, d_head)
    scale = Q.dtype.type(1.0 / np.sqrt(d_head) if scale is None else scale)  # scale the queries, not the scores: n_seq * d_head values
    B = []
    for h0, h1, k0, k1 in head_runs:
        n_k, group = k1 - k0, (h1 - h0) // (k1 - k0)
        # [n_batch, n_k, group * n_seq, d_head]: the query heads that share one key/value head, stacked.
        Qg = (Q[:, :, h0:h1] * scale).transpose(0, 2, 1, 3).reshape(n_batch, n_k, group * n_seq, d_head)
        scores = Qg @ K[:, k0:k1].transpose(0, 1, 3, 2)  # [n_batch, n_k, group * n_seq, n_kv]
        scores.reshape(n_batch, n_k, group, n_seq, n_kv)[...] += mask[:, None, None]
        out = softmax(scores) @ V[:, k0:k1]  # [n_batch, n_k, group * n_seq, d_head]
        B.append(out.reshape(n_batch, h1 - h0, n_seq, d_head))
    B = B[0] if len(B) == 1 else np.concatenate(B, axis=1)  # [n_batch, n_head_local, n_seq, d_head]
    return B.transpose(0, 2, 1, 3).reshape(n_batch * n_seq, n_head_local * d_head)
