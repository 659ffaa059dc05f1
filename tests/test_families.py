"""The newer families against Hugging Face's own classes: Gemma 3 (QK-norm, norms after each reduction, (1 + w)
norms, a scaled embedding, local and global layers with two RoPE thetas), Qwen3 (QK-norm) and Mistral with a
real sliding window, each shorter than the prompt, and GPT-NeoX (partial rotary, a QKV fused per head, exact GELU,
LayerNorms with biases) with its parallel block (one Allreduce) and its sequential one. Tiny random checkpoints
are built and saved by transformers (the hf extra; skipped without it), then run by mpitp on 1 to 4 simulated
ranks, heads splitting unevenly. Sliding layers keep a ring of their window: exact beyond it, bounded in bytes."""

import numpy as np
import pytest

from mpitp import comm, generate_sequence, load_model
from threadcomm import allreduce_calls, run_ranks

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [3, 17, 92, 5, 41, 8, 66, 23, 1, 77, 30, 12, 54, 9, 88, 2, 61, 45, 19, 70]  # longer than every window
COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=100, num_hidden_layers=4, max_position_embeddings=64,
              rms_norm_eps=1e-6)
FAMILIES = {
    # 6 query heads, 1 key/value head (every rank past the first replicates it); windows of 5 on 3 of 4 layers.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_attention_heads=6, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        num_attention_heads=6, num_key_value_heads=3, sliding_window=7, tie_word_embeddings=False)),
    # 6 heads of 8 dimensions, 2 of them turned (rotary_pct 0.25); the parallel block.
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        num_attention_heads=6, rotary_pct=0.25, use_parallel_residual=True, layer_norm_eps=1e-5)),
    # 5 heads of 8 dimensions, 4 of them turned, rotary base 5000; the sequential block.
    "gpt_neox_sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=40, num_attention_heads=5, rotary_pct=0.5, rotary_emb_base=5000, use_parallel_residual=False,
        layer_norm_eps=1e-5)),
}
# HF runs GPT-NeoX's LayerNorms in float64 and only its softmax in float32: mpitp is within 2e-8 of it (the tanh
# GELU in place of the exact one would be 1e-5 away).
TOLERANCE = {"gpt_neox": 1e-6, "gpt_neox_sequential": 1e-6}


def hf_model(name, tmp_path):
    config_class, model_class, extra = FAMILIES[name]
    torch.manual_seed(0)
    common = {k: v for k, v in COMMON.items() if k != "rms_norm_eps" or "neox" not in name}
    config = getattr(transformers, config_class)(**{**common, **extra})
    model = getattr(transformers, model_class)(config).double().eval()
    with torch.no_grad():  # norms away from their initial values, so that a norm applied wrongly shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    model.save_pretrained(tmp_path)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(model, ids, n):
    out = list(ids)
    for _ in range(n):
        out.append(int(hf_logits(model, out)[-1].argmax()))
    return out[len(ids):]


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_greedy_equal_hugging_face_at_every_rank_count(name, tmp_path):
    model = hf_model(name, tmp_path)
    expected, greedy = hf_logits(model, PROMPT), hf_greedy(model, PROMPT, 12)
    for size in (1, 2, 3, 4):
        def run(c):
            m = load_model(str(tmp_path), c, "float64")
            logits = m.forward(PROMPT, m.new_cache(len(PROMPT)), all_logits=True)
            return logits, generate_sequence(m, PROMPT, 12).token_ids
        for logits, tokens in run_ranks(size, run):
            # HF runs Gemma's and Qwen3's norms in float32 even in a float64 model: not closer than that.
            assert np.abs(logits - expected).max() <= TOLERANCE.get(name, 1e-4), (size, np.abs(logits - expected).max())
            assert tokens == greedy, size


def test_a_sliding_window_changes_what_a_query_sees(tmp_path):
    # The window is not decoration: the same weights with full attention give other logits past the window.
    model = hf_model("mistral", tmp_path)
    mpitp = load_model(str(tmp_path), comm.serial(), "float64")
    logits = mpitp.forward(PROMPT, mpitp.new_cache(len(PROMPT)), all_logits=True)
    model.config.sliding_window = None
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    full = hf_logits(model, PROMPT)
    assert np.abs(logits[:7] - full[:7]).max() <= 1e-4  # within the window: the same
    assert np.abs(logits[7:] - full[7:]).max() > 1e-3  # beyond it: not


def test_the_parallel_block_reduces_once_and_the_sequential_twice(tmp_path):
    # GPT-NeoX's parallel block adds attention's and the MLP's partial sums on each rank: one Allreduce per block
    # (and one for the vocab-parallel embedding); its sequential block is the seed's two.
    for name, per_block in (("gpt_neox", 1), ("gpt_neox_sequential", 2)):
        hf_model(name, tmp_path / name)
        for calls, n_layer in allreduce_calls(3, lambda c: load_model(str(tmp_path / name), c, "float64")):
            assert calls == [per_block * n_layer + 1] * 3, name


# --- sliding windows in bounded memory: a sliding layer's cache is a ring of its window and one chunk ---------------

def forward_greedy(model, cache, ids, n):
    # The logits of every position of ``ids``, then n greedy tokens, one forward each (through a ring, wrapping).
    logits = model.forward(ids, cache, all_logits=True)
    tokens = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        tokens.append(int(model.forward([tokens[-1]], cache).argmax()))
    return logits, tokens


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_a_ring_of_the_window_is_exact_beyond_it(name, tmp_path, monkeypatch):
    # Chunks of 3: the prompt of 20 goes through in 7 forwards, and a window of 5 (7) keeps 7 (9) slots, which
    # the prompt and the 12 new tokens wrap around several times. Full-attention layers keep every position.
    monkeypatch.setattr("mpitp.kvcache.RING_CHUNK", 3)
    model = hf_model(name, tmp_path)
    expected, greedy = hf_logits(model, PROMPT), hf_greedy(model, PROMPT, 12)
    for size in (1, 3):
        def run(c):
            m = load_model(str(tmp_path), c, "float64")
            cache = m.new_cache(len(PROMPT) + 12)
            return cache.slots, forward_greedy(m, cache, PROMPT, 12)
        for slots, (logits, tokens) in run_ranks(size, run):
            window = FAMILIES[name][2]["sliding_window"]
            assert slots == [32 if kind == "full_attention" else window + 2 for kind in
                             FAMILIES[name][2].get("layer_types", ["sliding_attention"] * 4)]
            assert np.abs(logits - expected).max() <= 1e-4, (size, np.abs(logits - expected).max())
            assert tokens == greedy, size


def test_a_batch_of_rings_at_different_lengths(tmp_path, monkeypatch):
    # Two sequences in one cache, wrapped at different places: one extended alone (KVCache.row), then both
    # together, then the first leaves the batch (KVCache.keep) and the other goes on.
    monkeypatch.setattr("mpitp.kvcache.RING_CHUNK", 3)
    model = hf_model("gemma3", tmp_path)
    other = PROMPT[::-1]
    m = load_model(str(tmp_path), comm.serial(), "float64")
    cache = m.new_cache(30, n_batch=2)
    logits = m.forward([PROMPT, other], cache, all_logits=True)
    for row, ids in zip(logits, (PROMPT, other)):
        assert np.abs(row - hf_logits(model, ids)).max() <= 1e-4
    m.forward([4, 40, 14], cache.row(1))  # the second sequence: 3 positions ahead
    first, second = PROMPT + [7], other + [4, 40, 14, 11]
    both = m.forward([[7], [11]], cache)
    assert np.abs(both[0] - hf_logits(model, first)[-1]).max() <= 1e-4
    assert np.abs(both[1] - hf_logits(model, second)[-1]).max() <= 1e-4
    cache.keep([1])
    alone = m.forward([5, 6], cache, all_logits=True)
    assert np.abs(alone - hf_logits(model, second + [5, 6])[-2:]).max() <= 1e-4


def test_the_cache_of_a_gemma_3_shape_is_bounded_by_its_windows(monkeypatch):
    # Gemma-3-270M's shape: 18 layers, 15 of them sliding by 512, one key/value head of 256. At its whole context
    # of 32,768 positions a full cache would be 1.12 GiB in float32; the rings bring it to 210.7 MiB, and that is
    # the figure the memory check asks for.
    from mpitp.config import config_from_dict
    from mpitp.model import Model
    from mpitp.sharding import shard_for
    config = config_from_dict(dict(
        model_type="gemma3_text", hidden_size=640, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        intermediate_size=2048, num_hidden_layers=18, vocab_size=262144, max_position_embeddings=32768,
        sliding_window=512, layer_types=["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]))
    model = Model(config, shard_for(config, 0, 1), [], None, comm.serial(), np.float32)
    full, ring = 2 * 18 * 32768 * 256 * 4, 2 * (15 * (511 + 128) + 3 * 32768) * 256 * 4
    assert model.cache_bytes(32768) == ring < full / 5
    assert model.cache_bytes(512) == 2 * 18 * 512 * 256 * 4  # shorter than a window: every layer holds it all
    monkeypatch.setattr("mpitp.resources.available_bytes", lambda: 200 * 2**20)
    with pytest.raises(Exception, match=r"a KV cache of 1 x 32768 positions needs 210\.7 MiB"):
        model.new_cache(32768)
