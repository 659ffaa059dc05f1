"""Layer math: small pure functions of arrays and weights, no state, no communication.

Shape comments use named dims: n_seq (tokens in this call), n_kv (keys visible after the cache update),
n_embd, n_head_local, n_kv_head_local, d_head, n_ffn_local. Every function computes in its inputs' dtype.
"""

import functools

import numpy as np


# The elementwise functions below work in place on one temporary: on the hot path, each avoided
# temporary is one pass less over memory and one allocation less per layer.

_MEAN_VECTORS = {}


def _row_mean(x):
    # Mean over the last axis as a matrix-vector product with [1/n, ..., 1/n]: one BLAS call, which is
    # several times cheaper than NumPy's reductions for the one-row arrays of decoding. [n_seq, n] -> [n_seq]
    key = (x.shape[-1], x.dtype)
    if key not in _MEAN_VECTORS:
        _MEAN_VECTORS[key] = np.full(x.shape[-1], 1.0 / x.shape[-1], dtype=x.dtype)
    return x @ _MEAN_VECTORS[key]


def layer_norm(x, weight, bias, eps):
    # [n_seq, n_embd] -> [n_seq, n_embd] (a new array; x is unchanged)
    y = x - _row_mean(x)[:, None]
    std = _row_mean(np.square(y))
    std += eps
    np.sqrt(std, out=std)
    y /= std[:, None]
    y *= weight
    y += bias
    return y


def rms_norm(x, weight, eps):
    # [n_seq, n_embd] -> [n_seq, n_embd] (a new array; x is unchanged)
    rms = _row_mean(np.square(x))
    rms += eps
    np.sqrt(rms, out=rms)
    y = x / rms[:, None]
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


def silu(x):
    # x * sigmoid(x). [...] -> [...] (overwrites x)
    t = np.negative(x)
    np.exp(t, out=t)
    t += 1.0
    x /= t
    return x


def softmax(x):
    # softmax over the last axis; -inf entries get weight 0. [..., n] -> [..., n] (overwrites x)
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x *= 1.0 / x.sum(axis=-1, keepdims=True)  # one division per row, then multiplications
    return x


def rope_inv_freq(rope, d_head):
    """Rotary inverse frequencies, ``[d_head // 2]`` float64, including llama3 scaling when configured."""
    inv_freq = rope.theta ** (-np.arange(0, d_head, 2, dtype=np.float64) / d_head)
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
    """``cos, sin`` of shape ``[n_seq, d_head // 2]`` for the given integer positions."""
    angles = np.outer(np.asarray(positions, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def apply_rope(x, cos, sin):
    # Hugging Face's rotate-half convention: dimension i is paired with i + d_head/2.
    # [n_seq, n_heads, d_head] -> [n_seq, n_heads, d_head]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


@functools.lru_cache(maxsize=8)
def _causal_mask(n_seq, n_kv, start_pos, dtype):
    # [n_seq, n_kv]: 0 where the query at start_pos + i may see key j (j <= start_pos + i), else -inf.
    # Cached: every layer of a forward uses the same one. Read-only.
    mask = np.triu(np.full((n_seq, n_kv), -np.inf, dtype=dtype), k=start_pos + 1)
    mask.flags.writeable = False
    return mask


def attention(Q, K, V, start_pos):
    """Causal scaled dot-product attention of this rank's heads against its cached keys and values.

    Parameters
    ----------
    Q : ndarray, [n_seq, n_head_local, d_head]
        Queries of the new tokens, at positions ``start_pos .. start_pos + n_seq - 1``.
    K, V : ndarray, [n_kv_head_local, n_kv, d_head]
        Every key and value so far (cache plus new tokens); ``n_kv = start_pos + n_seq``.
        Query head j uses key/value head ``j // (n_head_local // n_kv_head_local)``.
    start_pos : int
        Position of the first new token.

    Returns
    -------
    ndarray, [n_seq, n_head_local * d_head]
        The attention output B of this rank's heads, heads concatenated.
    """
    n_seq, n_head_local, d_head = Q.shape
    n_kv_head_local, n_kv, _ = K.shape
    group = n_head_local // n_kv_head_local
    # [n_kv_head_local, group * n_seq, d_head]: the query heads that share one key/value head, stacked.
    # Scale the queries, not the scores: a pass over n_seq * d_head values instead of n_seq * n_kv.
    Qg = Q.transpose(1, 0, 2).reshape(n_kv_head_local, group * n_seq, d_head) * Q.dtype.type(1.0 / np.sqrt(d_head))
    scores = Qg @ K.transpose(0, 2, 1)  # [n_kv_head_local, group * n_seq, n_kv]
    # Causal mask: the query at position start_pos + i sees keys 0 .. start_pos + i; later keys get -inf.
    if n_seq > 1:
        scores.reshape(n_kv_head_local, group, n_seq, n_kv)[...] += _causal_mask(n_seq, n_kv, start_pos,
                                                                                  scores.dtype.str)
    probs = softmax(scores)
    B = probs @ V  # [n_kv_head_local, group * n_seq, d_head]
    return B.reshape(n_head_local, n_seq, d_head).transpose(1, 0, 2).reshape(n_seq, n_head_local * d_head)
