"""Dense, single-process reference forward pass used as a test oracle.

A deliberately simple second implementation of GPT-2 and Llama inference,
written from the Hugging Face model definitions: no tensor parallelism, no KV
cache, full recompute of the whole sequence, pure NumPy. Clarity over speed.

It does not import anything from ``mpitp``; it only reads a Hugging Face model
folder (``config.json`` plus ``model.safetensors`` or a sharded checkpoint with
``model.safetensors.index.json``).
"""

import json
import math
import struct
from pathlib import Path

import numpy as np

__all__ = [
    "read_safetensors",
    "load_weights",
    "rope_inv_freq",
    "llama3_scale_inv_freq",
    "dense_logits",
    "dense_greedy",
]


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # converted to float32 below
}


def read_safetensors(path):
    """Read every tensor of one ``.safetensors`` file.

    Parameters
    ----------
    path : str or Path
        The file to read. Assumed well formed.

    Returns
    -------
    dict[str, np.ndarray]
        Tensor name -> array (F32, F64, F16 keep their dtype; BF16 becomes
        float32). ``__metadata__`` is skipped.
    """
    data = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len].decode("utf-8"))
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name = info["dtype"]
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise NotImplementedError(f"safetensors dtype {dtype_name!r} ({name})")
        begin, end = info["data_offsets"]
        raw = np.frombuffer(data, dtype=_SAFETENSORS_DTYPES[dtype_name],
                            count=(end - begin) // _SAFETENSORS_DTYPES[dtype_name].itemsize,
                            offset=base + begin)
        if dtype_name == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.astype(raw.dtype.newbyteorder("="))  # native-endian copy
        tensors[name] = arr.reshape(info["shape"])
    return tensors


def load_weights(model_dir):
    """Load all weights of a Hugging Face checkpoint folder.

    Parameters
    ----------
    model_dir : str or Path
        Folder with ``model.safetensors``, or with
        ``model.safetensors.index.json`` whose ``weight_map`` names the shards.

    Returns
    -------
    dict[str, np.ndarray]
        Tensor name -> array, as stored (no renaming, no dtype cast except
        BF16 -> float32).
    """
    model_dir = Path(model_dir)
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for fname in files:
        weights.update(read_safetensors(model_dir / fname))
    return weights


def _load_config(model_dir):
    return json.loads((Path(model_dir) / "config.json").read_text())


# ---------------------------------------------------------------------------
# small building blocks (all operate in the dtype of their inputs)
# ---------------------------------------------------------------------------

def _layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + x.dtype.type(eps)) * weight + bias


def _rms_norm(x, weight, eps):
    ms = (x * x).mean(axis=-1, keepdims=True)
    return x / np.sqrt(ms + x.dtype.type(eps)) * weight


def _gelu_new(x):
    t = x.dtype.type
    c = t(math.sqrt(2.0 / math.pi))
    return t(0.5) * x * (t(1.0) + np.tanh(c * (x + t(0.044715) * x * x * x)))


def _silu(x):
    return x / (x.dtype.type(1.0) + np.exp(-x))


def _softmax(scores):
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


def _causal_attention(q, k, scale):
    """Softmax(q k^T * scale) with a causal mask, for one head.

    q, k : [T, d]. Returns probabilities [T, T].
    """
    t_len = q.shape[0]
    scores = (q @ k.T) * scale
    future = np.triu(np.ones((t_len, t_len), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores).astype(q.dtype, copy=False)
    return _softmax(scores)


# ---------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------

def _gpt2_forward(config, weights, token_ids, dtype):
    act = config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise NotImplementedError(f"gpt2 activation_function {act!r}")

    # save_pretrained layout has a "transformer." prefix; the Hub layout has none.
    prefix = "transformer." if "transformer.wte.weight" in weights else ""

    def w(name):
        return weights[prefix + name].astype(dtype)

    n_embd = config["n_embd"]
    n_head = config["n_head"]
    n_layer = config["n_layer"]
    eps = config.get("layer_norm_epsilon", 1e-5)
    d_head = n_embd // n_head
    t_len = len(token_ids)
    if t_len > config.get("n_positions", t_len):
        raise ValueError("sequence longer than n_positions")

    ids = np.asarray(token_ids, dtype=np.int64)
    x = w("wte.weight")[ids] + w("wpe.weight")[np.arange(t_len)]

    for layer in range(n_layer):
        p = f"h.{layer}."
        # --- attention ---
        h = _layer_norm(x, w(p + "ln_1.weight"), w(p + "ln_1.bias"), eps)
        qkv = h @ w(p + "attn.c_attn.weight") + w(p + "attn.c_attn.bias")  # Conv1D: [in, out]
        q_all = qkv[:, 0 * n_embd:1 * n_embd]
        k_all = qkv[:, 1 * n_embd:2 * n_embd]
        v_all = qkv[:, 2 * n_embd:3 * n_embd]
        scale = 1.0
        if config.get("scale_attn_weights", True):
            scale = scale / math.sqrt(d_head)
        if config.get("scale_attn_by_inverse_layer_idx", False):
            scale = scale / float(layer + 1)
        scale = dtype(scale)
        heads = []
        for hd in range(n_head):
            sl = slice(hd * d_head, (hd + 1) * d_head)
            probs = _causal_attention(q_all[:, sl], k_all[:, sl], scale)
            heads.append(probs @ v_all[:, sl])
        attn = np.concatenate(heads, axis=-1)
        x = x + attn @ w(p + "attn.c_proj.weight") + w(p + "attn.c_proj.bias")
        # --- MLP ---
        h = _layer_norm(x, w(p + "ln_2.weight"), w(p + "ln_2.bias"), eps)
        h = _gelu_new(h @ w(p + "mlp.c_fc.weight") + w(p + "mlp.c_fc.bias"))
        x = x + h @ w(p + "mlp.c_proj.weight") + w(p + "mlp.c_proj.bias")

    x = _layer_norm(x, w("ln_f.weight"), w("ln_f.bias"), eps)
    if "lm_head.weight" in weights:
        lm_head = weights["lm_head.weight"].astype(dtype)
    else:
        lm_head = w("wte.weight")  # tied
    return x @ lm_head.T


# ---------------------------------------------------------------------------
# Llama
# ---------------------------------------------------------------------------

def llama3_scale_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor,
                          original_max_position_embeddings):
    """Apply Llama 3 RoPE frequency scaling.

    Parameters
    ----------
    inv_freq : np.ndarray
        Unscaled inverse frequencies, ``theta ** (-arange(0, d, 2) / d)``.
    factor, low_freq_factor, high_freq_factor : float
        Scaling parameters from the config.
    original_max_position_embeddings : int
        Context length the model was trained with.

    Returns
    -------
    np.ndarray
        Scaled inverse frequencies (float64): long wavelengths divided by
        ``factor``, short ones unchanged, the band between interpolated.
    """
    inv_freq = np.asarray(inv_freq, dtype=np.float64)
    orig = float(original_max_position_embeddings)
    low = float(low_freq_factor)
    high = float(high_freq_factor)
    low_freq_wavelen = orig / low
    high_freq_wavelen = orig / high
    wavelen = 2.0 * math.pi / inv_freq
    out = np.empty_like(inv_freq)
    for i in range(inv_freq.shape[0]):
        f = inv_freq[i]
        if wavelen[i] > low_freq_wavelen:
            out[i] = f / factor
        elif wavelen[i] < high_freq_wavelen:
            out[i] = f
        else:
            smooth = (orig / wavelen[i] - low) / (high - low)
            out[i] = (1.0 - smooth) * f / factor + smooth * f
    return out


def rope_inv_freq(config, head_dim):
    """RoPE inverse frequencies for a Llama config.

    Parameters
    ----------
    config : dict
        Parsed ``config.json``. Reads ``rope_parameters`` (transformers 5) or
        top-level ``rope_theta`` / ``rope_scaling`` (transformers 4).
    head_dim : int
        Per-head dimension (even).

    Returns
    -------
    np.ndarray
        float64 array of shape [head_dim // 2].

    Raises
    ------
    NotImplementedError
        For a rope type other than default or ``llama3``.
    """
    params = config.get("rope_parameters")
    if params is None:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if theta is None:
        theta = 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))

    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float64) / head_dim
    inv_freq = 1.0 / (float(theta) ** exponents)
    if rope_type == "default":
        return inv_freq
    if rope_type == "llama3":
        return llama3_scale_inv_freq(
            inv_freq,
            params["factor"],
            params["low_freq_factor"],
            params["high_freq_factor"],
            params["original_max_position_embeddings"],
        )
    raise NotImplementedError(f"rope type {rope_type!r}")


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _llama_forward(config, weights, token_ids, dtype):
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"llama hidden_act {act!r}")

    def w(name):
        return weights[name].astype(dtype)

    def linear(x, name, has_bias):
        y = x @ w(name + ".weight").T  # nn.Linear: [out, in]
        if has_bias:
            y = y + w(name + ".bias")
        return y

    hidden = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    d_head = config.get("head_dim") or hidden // n_heads
    n_layer = config["num_hidden_layers"]
    eps = config.get("rms_norm_eps", 1e-6)
    attn_bias = bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    group = n_heads // n_kv
    t_len = len(token_ids)

    # RoPE tables, rotate-half convention, angles computed in `dtype`.
    inv_freq = rope_inv_freq(config, d_head).astype(dtype)
    positions = np.arange(t_len).astype(dtype)
    angles = positions[:, None] * inv_freq[None, :]          # [T, d/2]
    angles = np.concatenate([angles, angles], axis=-1)       # [T, d]
    cos = np.cos(angles)
    sin = np.sin(angles)

    def rope(x):  # x: [T, d]
        return x * cos + _rotate_half(x) * sin

    ids = np.asarray(token_ids, dtype=np.int64)
    x = w("model.embed_tokens.weight")[ids]
    scale = dtype(1.0 / math.sqrt(d_head))

    for layer in range(n_layer):
        p = f"model.layers.{layer}."
        # --- attention ---
        h = _rms_norm(x, w(p + "input_layernorm.weight"), eps)
        q_all = linear(h, p + "self_attn.q_proj", attn_bias)  # [T, n_heads*d]
        k_all = linear(h, p + "self_attn.k_proj", attn_bias)  # [T, n_kv*d]
        v_all = linear(h, p + "self_attn.v_proj", attn_bias)
        heads = []
        for hd in range(n_heads):
            kv = hd // group
            q = rope(q_all[:, hd * d_head:(hd + 1) * d_head])
            k = rope(k_all[:, kv * d_head:(kv + 1) * d_head])
            v = v_all[:, kv * d_head:(kv + 1) * d_head]
            probs = _causal_attention(q, k, scale)
            heads.append(probs @ v)
        attn = np.concatenate(heads, axis=-1)
        x = x + linear(attn, p + "self_attn.o_proj", attn_bias)
        # --- MLP ---
        h = _rms_norm(x, w(p + "post_attention_layernorm.weight"), eps)
        gate = linear(h, p + "mlp.gate_proj", mlp_bias)
        up = linear(h, p + "mlp.up_proj", mlp_bias)
        x = x + linear(_silu(gate) * up, p + "mlp.down_proj", mlp_bias)

    x = _rms_norm(x, w("model.norm.weight"), eps)
    if "lm_head.weight" in weights:
        lm_head = w("lm_head.weight")
    else:
        lm_head = w("model.embed_tokens.weight")  # tied
    return x @ lm_head.T


# ---------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------

def _forward(config, weights, token_ids, dtype):
    dtype = np.dtype(dtype).type
    if len(token_ids) == 0:
        raise ValueError("token_ids must be non-empty")
    model_type = config.get("model_type")
    if model_type == "gpt2":
        out = _gpt2_forward(config, weights, token_ids, dtype)
    elif model_type == "llama":
        out = _llama_forward(config, weights, token_ids, dtype)
    else:
        raise NotImplementedError(f"model_type {model_type!r}")
    assert out.dtype == dtype, (out.dtype, dtype)
    return out


def dense_logits(model_dir, token_ids, dtype=np.float64):
    """Logits at every position, computed densely.

    Parameters
    ----------
    model_dir : str or Path
        Hugging Face model folder (``config.json`` + safetensors).
    token_ids : sequence of int
        Input tokens, starting at position 0.
    dtype : numpy dtype, default np.float64
        Weights are cast to it and all math runs in it.

    Returns
    -------
    np.ndarray
        Shape [len(token_ids), vocab_size], dtype ``dtype``.
    """
    config = _load_config(model_dir)
    weights = load_weights(model_dir)
    return _forward(config, weights, list(token_ids), dtype)


def dense_greedy(model_dir, prompt_ids, n_new, dtype=np.float64):
    """Greedy decoding by recomputing the full sequence at every step.

    Parameters
    ----------
    model_dir : str or Path
        Hugging Face model folder.
    prompt_ids : sequence of int
        The prompt (non-empty).
    n_new : int
        Number of tokens to generate (no eos stopping).
    dtype : numpy dtype, default np.float64
        Compute dtype.

    Returns
    -------
    list[int]
        The ``n_new`` generated tokens (argmax; ties go to the lowest id).
    """
    config = _load_config(model_dir)
    weights = load_weights(model_dir)
    seq = [int(t) for t in prompt_ids]
    new = []
    for _ in range(n_new):
        logits = _forward(config, weights, seq, dtype)[-1]
        tok = int(np.argmax(logits))  # first maximum = lowest id
        new.append(tok)
        seq.append(tok)
    return new
