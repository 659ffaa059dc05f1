"""The newer families against Hugging Face's own classes: Gemma 3 (QK-norm, norms after each reduction, (1 + w)
norms, a scaled embedding, local and global layers with two RoPE thetas), Qwen3 (QK-norm) and Mistral with a
real sliding window, each shorter than the prompt. Tiny random checkpoints are built and saved by transformers
(the hf extra; skipped without it), then run by mpitp on 1 to 4 simulated ranks, heads splitting unevenly."""

import numpy as np
import pytest

from mpitp import comm, generate_sequence, load_model
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
}


def hf_model(name, tmp_path):
    config_class, model_class, extra = FAMILIES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**COMMON, **extra)
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
            assert np.abs(logits - expected).max() <= 1e-4, (size, np.abs(logits - expected).max())
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
