"""Layer math: small pure functions of arrays and weights, no state, no communication.

Shape comments use named dims: n_seq (tokens in this call), n_kv (keys visible after the cache update),
n_embd, n_head_local, n_kv_head_local, d_head, n_ffn_local. Every function computes in its inputs' dtype.
"""

import numpy as np


def layer_norm(x, weight, bias, eps):
    # [n_seq, n_embd] -> [n_seq, n_embd]
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * weight + bias


def rms_norm(x, weight, eps):
    # [n_seq, n_embd] -> [n_seq, n_embd]
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * weight


def gelu_tanh(x):
    # GPT-2's "gelu_new": the tanh approximation of GELU. [...] -> [...]
    c = x.dtype.type(np.sqrt(2.0 / np.pi))
    return 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * (x * x * x))))


def silu(x):
    # [...] -> [...]
    return x / (1.0 + np.exp(-x))


def softmax(x):
    # softmax over the last axis; -inf entries get weight 0. [..., n] -> [..., n]
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


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
    Qg = Q.transpose(1, 0, 2).reshape(n_kv_head_local, group * n_seq, d_head)
    scores = Qg @ K.transpose(0, 2, 1)  # [n_kv_head_local, group * n_seq, n_kv]
    scores *= Q.dtype.type(1.0 / np.sqrt(d_head))
    # Causal mask: the query at position start_pos + i sees keys 0 .. start_pos + i.
    if n_seq > 1:
        q_pos = start_pos + np.arange(n_seq)
        future = np.arange(n_kv)[None, :] > q_pos[:, None]  # [n_seq, n_kv]
        scores.reshape(n_kv_head_local, group, n_seq, n_kv)[:, :, future] = -np.inf
    probs = softmax(scores)
    B = probs @ V  # [n_kv_head_local, group * n_seq, d_head]
    return B.reshape(n_head_local, n_seq, d_head).transpose(1, 0, 2).reshape(n_seq, n_head_local * d_head)
