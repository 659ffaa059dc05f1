"""Checks that the dense NumPy oracle (dense_reference.py) matches Hugging Face.

Golden data: tests/data/<model>/ (HF checkpoint) and tests/data/<model>.npz
(HF transformers outputs; see the goldens README). No MPI here.
"""

import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import dense_reference as dr  # noqa: E402

DATA = Path(__file__).parent / "data"
MODELS = ["gpt2-tiny", "llama-gqa"]
LENGTHS = [1, 7, 33]


def _golden(model):
    return np.load(DATA / f"{model}.npz", allow_pickle=False)


# ---------------------------------------------------------------------------
# logits and greedy tokens against Hugging Face
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-9), (np.float32, 2e-4)])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("model", MODELS)
def test_logits(model, L, dtype, tol):
    g = _golden(model)
    ref = g[f"logits_x64_L{L}"]
    out = dr.dense_logits(DATA / model, g[f"prompt_L{L}"], dtype=dtype)
    assert out.dtype == dtype
    assert out.shape == ref.shape == (L, int(g["vocab_size"]))
    assert np.max(np.abs(out.astype(np.float64) - ref)) <= tol


@pytest.mark.parametrize("model", MODELS)
def test_greedy_float64(model):
    g = _golden(model)
    toks = dr.dense_greedy(DATA / model, g["prompt_L7"], 20, dtype=np.float64)
    assert isinstance(toks, list) and all(isinstance(t, int) for t in toks)
    assert toks == g["greedy_x64_L7"].tolist()


# ---------------------------------------------------------------------------
# RoPE frequencies
# ---------------------------------------------------------------------------

def test_llama3_scaling_three_bands():
    # Llama 3.1 parameters: factor 8, low 1, high 4, original 8192
    # -> low_freq_wavelen = 8192, high_freq_wavelen = 2048.
    two_pi = 2.0 * math.pi
    inv = np.array([two_pi / 1000.0,    # wavelen 1000  < 2048: unchanged
                    two_pi / 4096.0,    # wavelen 4096 in band: smooth = (2 - 1) / 3 = 1/3
                    two_pi / 10000.0])  # wavelen 10000 > 8192: divided by factor
    out = dr.llama3_scale_inv_freq(inv, 8.0, 1.0, 4.0, 8192)
    expected = np.array([two_pi / 1000.0,
                         two_pi / 4096.0 * (2.0 / 3.0 / 8.0 + 1.0 / 3.0),  # = 5/12 of original
                         two_pi / 10000.0 / 8.0])
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=0)
    np.testing.assert_allclose(out[1], two_pi / 4096.0 * 5.0 / 12.0, rtol=1e-13)


def test_rope_inv_freq_llama3_from_config_layouts():
    theta, d = 500000.0, 128
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg5 = {"rope_parameters": dict(scaling, rope_theta=theta, rope_type="llama3")}
    cfg4_a = {"rope_theta": theta, "rope_scaling": dict(scaling, rope_type="llama3")}
    cfg4_b = {"rope_theta": theta, "rope_scaling": dict(scaling, type="llama3")}
    f5 = dr.rope_inv_freq(cfg5, d)
    assert f5.shape == (d // 2,)
    np.testing.assert_array_equal(f5, dr.rope_inv_freq(cfg4_a, d))
    np.testing.assert_array_equal(f5, dr.rope_inv_freq(cfg4_b, d))

    base = lambda i: theta ** (-(2 * i) / d)  # noqa: E731
    # i = 0: wavelen 2*pi (high-frequency band) -> unchanged.
    assert f5[0] == pytest.approx(1.0, rel=1e-14)
    # i = 32: base = 1/sqrt(5e5), wavelen = 2*pi*sqrt(5e5) ~ 4443 (between 2048 and 8192).
    f = 1.0 / math.sqrt(theta)
    s = (8192.0 * f / (2.0 * math.pi) - 1.0) / 3.0
    assert 0.0 < s < 1.0
    assert f5[32] == pytest.approx((1.0 - s) * f / 8.0 + s * f, rel=1e-13)
    # i = 63: wavelen huge (low-frequency band) -> divided by 8.
    assert f5[63] == pytest.approx(base(63) / 8.0, rel=1e-13)


def test_rope_inv_freq_default_and_errors():
    d = 8
    want = 1.0 / (5e5 ** (np.arange(0, d, 2) / d))
    np.testing.assert_allclose(
        dr.rope_inv_freq({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}, d),
        want, rtol=1e-15)
    np.testing.assert_allclose(dr.rope_inv_freq({"rope_theta": 5e5, "rope_scaling": None}, d),
                               want, rtol=1e-15)
    np.testing.assert_allclose(dr.rope_inv_freq({}, d),
                               1.0 / (10000.0 ** (np.arange(0, d, 2) / d)), rtol=1e-15)
    with pytest.raises(NotImplementedError):
        dr.rope_inv_freq({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}, d)
    with pytest.raises(NotImplementedError):
        dr.rope_inv_freq({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}}, d)


# ---------------------------------------------------------------------------
# checkpoint-format handling (files written to tmp_path only)
# ---------------------------------------------------------------------------

def _write_safetensors(path, tensors):
    """Minimal writer: tensors is {name: (dtype_str, shape, raw_bytes)}."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))


def _f32_entries(weights):
    return {k: ("F32", v.shape, np.ascontiguousarray(v, dtype="<f4").tobytes())
            for k, v in weights.items()}


def test_safetensors_dtypes(tmp_path):
    a64 = np.array([[1.5, -2.25], [3.0, 1e-300]], dtype="<f8")
    a32 = np.array([0.1, -7.0, 3.5], dtype="<f4")
    a16 = np.array([0.5, -1.0, 65504.0], dtype="<f2")
    vals = np.array([1.0, -2.5, 0.15625, 2.0 ** 100], dtype=np.float32)
    bf16 = (vals.view(np.uint32) >> 16).astype("<u2")  # these values are exact in bf16
    _write_safetensors(tmp_path / "model.safetensors", {
        "a64": ("F64", a64.shape, a64.tobytes()),
        "a32": ("F32", a32.shape, a32.tobytes()),
        "a16": ("F16", a16.shape, a16.tobytes()),
        "bf": ("BF16", (2, 2), bf16.tobytes()),
    })
    w = dr.load_weights(tmp_path)
    assert set(w) == {"a64", "a32", "a16", "bf"}
    np.testing.assert_array_equal(w["a64"], a64)
    assert w["a64"].dtype == np.float64
    np.testing.assert_array_equal(w["a32"], a32)
    assert w["a32"].dtype == np.float32
    np.testing.assert_array_equal(w["a16"], a16)
    assert w["a16"].dtype == np.float16
    assert w["bf"].dtype == np.float32 and w["bf"].shape == (2, 2)
    np.testing.assert_array_equal(w["bf"].ravel(), vals)


def _copy_configs(src, dst):
    for name in ("config.json",):
        (dst / name).write_text((src / name).read_text())


def test_gpt2_hub_layout(tmp_path):
    """No 'transformer.' prefix plus h.N.attn.bias / masked_bias buffers."""
    src = DATA / "gpt2-tiny"
    w = dr.load_weights(src)
    hub = {k[len("transformer."):]: v for k, v in w.items()}
    n_pos = json.loads((src / "config.json").read_text())["n_positions"]
    mask = np.tril(np.ones((n_pos, n_pos), dtype=np.float32))[None, None]
    for i in range(2):
        hub[f"h.{i}.attn.bias"] = mask
        hub[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    _write_safetensors(tmp_path / "model.safetensors", _f32_entries(hub))
    _copy_configs(src, tmp_path)
    g = _golden("gpt2-tiny")
    out = dr.dense_logits(tmp_path, g["prompt_L7"])
    assert np.max(np.abs(out - g["logits_x64_L7"])) <= 1e-9


def test_sharded_checkpoint(tmp_path):
    src = DATA / "llama-gqa"
    w = dr.load_weights(src)
    names = sorted(w)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        _write_safetensors(tmp_path / fname, _f32_entries({k: w[k] for k in keys}))
        weight_map.update({k: fname for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    _copy_configs(src, tmp_path)
    w2 = dr.load_weights(tmp_path)
    assert set(w2) == set(w)
    for k in w:
        np.testing.assert_array_equal(w2[k], w[k])
    g = _golden("llama-gqa")
    out = dr.dense_logits(tmp_path, g["prompt_L7"])
    assert np.max(np.abs(out - g["logits_x64_L7"])) <= 1e-9


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    _write_safetensors(tmp_path / "model.safetensors", {})
    with pytest.raises(NotImplementedError):
        dr.dense_logits(tmp_path, [1, 2, 3])
