"""The newer families against Hugging Face's own classes: Gemma 3 (QK-norm, norms after each reduction, (1 + w)
norms, a scaled embedding, local and global layers with two RoPE thetas), Qwen3 (QK-norm) and Mistral with a
real sliding window, each shorter than the prompt, and GPT-NeoX (partial rotary, a QKV fused per head, exact GELU,
LayerNorms with biases) with its parallel block (one Allreduce) and its sequential one. Tiny random checkpoints are built and saved by transformers
(the hf extra; skipped without it), then run by mpitp on 1 to 4 simulated ranks, heads splitting unevenly."""

import numpy as np
import pytest

from mpitp import comm, generate_sequence, load_model
from mpitp.comm import TimedComm
from threadcomm import run_ranks

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

        def count(c):
            timed = TimedComm(c)
            model = load_model(str(tmp_path / name), timed, "float64")
            cache, calls = model.new_cache(8), []
            for ids in ([1, 2, 3, 4], [5], [6]):  # a prefill, then two decode steps
                before = timed.calls
                model.forward(ids, cache, gather=False)
                calls.append(timed.calls - before)
            return calls, model.config.n_layer

        for calls, n_layer in run_ranks(3, count):
            assert calls == [per_block * n_layer + 1] * 3, name
