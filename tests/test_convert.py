"""mpitp.convert: GGUF files (written here with the gguf package's writer) to Hugging Face folders.

The oracles: the Hugging Face folders the GGUF files were made from (tensors equal, configs equal, mpitp's logits
equal to the transformers goldens), the GGUF bytes dequantized by the test itself from the block layouts, the
tokenizer the vocabulary was trained as, and transformers itself where it is installed.
"""

import json
import os
import resource
import signal
import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest

from conftest import REPO, child_env, golden, model_dir, serial_only
from dense_reference import read_safetensors
from gguf_util import K_QUANTS, dequantize, llama_names, permute_rows, random_blocks, tensor_fields, write_gguf
from mpitp import CheckpointError, MpitpError, comm, load_model
from mpitp.config import load_config
from mpitp.tools.convert import convert, main
from mpitp.tools.gguf_model import unpermute
from mpitp.tokenizer import Tokenizer
from random_models import write_random_model
from st_util import to_bf16_bits

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
TEXTS = ["Hello, world! A plain ASCII sentence; with (punctuation) [and] {brackets}...",
         "runs of spaces:  two   three    four     five, trailing   ", "   leading spaces",
         "tabs:\tone\t\ttwo\t\t\tthree \t mixed", "newlines:\none\n\ntwo\n\n\nthree\r\nwindows\n",
         "accents: naïve café résumé Ångström Zürich señor crème brûlée",
         "CJK: 日本語のテキスト、中文文本，한국어 텍스트", "emoji: 🎉🚀 👍🏽 👨‍👩‍👧‍👦 ❤️ ok🙂",
         "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif (x >= 10 && y != 0) { printf(\"%d\\n\", x); }",
         "numbers 2024 and 3.14159 and 1,000,000", "don't we'll they're I'M", "<|im_start|>user\nhi<|im_end|>", ""]


def logits(folder, ids, dtype="float64"):
    model = load_model(folder, comm.serial(), dtype)
    return model.forward(ids, model.new_cache(len(ids)), all_logits=True)


def run(*args):
    """``main(args)``: the command's exit status."""
    return main([str(a) for a in args])


# --- weights, configs and the permutation ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2-tiny"])
def test_f32_round_trip_is_exact_and_matches_hugging_face(tmp_path, name):
    src = tmp_path / "m.gguf"
    write_gguf(src, model_dir(name), tokenizer=_tokenizer_meta(model_dir(name)))
    convert(src, tmp_path / "out")
    original = {k.removeprefix("transformer."): v for k, v in read_safetensors(
        os.path.join(model_dir(name), "model.safetensors")).items()}
    converted = read_safetensors(tmp_path / "out" / "model.safetensors")
    assert set(converted) == set(original)
    for k in converted:
        assert converted[k].dtype == np.float32 and np.array_equal(converted[k], original[k]), k
    assert load_config(str(tmp_path / "out")) == load_config(model_dir(name))  # every field mpitp reads
    g = golden(name)
    for L in (7, 33):
        assert np.abs(logits(str(tmp_path / "out"), g[f"prompt_L{L}"]) - g[f"logits_x64_L{L}"]).max() <= 1e-9


def test_permutation_round_trip():
    rng = np.random.default_rng(0)
    for n_head, d_head, cols in ((8, 8, 64), (9, 64, 5), (3, 4, 1), (1, 16, 3)):
        w = rng.standard_normal((n_head * d_head, cols))
        stored = permute_rows(w, n_head)
        assert not np.array_equal(stored, w)  # the GGUF order really differs
        assert np.array_equal(unpermute(stored, n_head), w)
        assert np.array_equal(unpermute(permute_rows(w[:, 0], n_head), n_head), w[:, 0])  # a bias


def test_unpermuted_q_and_k_are_needed(tmp_path):
    # Without llama.cpp's row order in the file the converted model is wrong: the goldens notice.
    write_gguf(tmp_path / "m.gguf", model_dir("llama-gqa"), permute=False)
    convert(tmp_path / "m.gguf", tmp_path / "out", tokenizer=False)
    g = golden("llama-gqa")
    assert np.abs(logits(str(tmp_path / "out"), g["prompt_L7"]) - g["logits_x64_L7"]).max() > 1e-3


def test_biases_tied_head_and_one_kv_head(tmp_path):
    src_dir = write_random_model(tmp_path / "hf", "llama-mqa", rope_scaling=None)
    write_gguf(tmp_path / "m.gguf", src_dir)
    convert(tmp_path / "m.gguf", tmp_path / "out", tokenizer=False)
    assert load_config(str(tmp_path / "out")) == load_config(src_dir)
    ids = [3, 14, 15, 92, 65, 35]
    assert np.abs(logits(str(tmp_path / "out"), ids) - logits(src_dir, ids)).max() <= 1e-12


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    # llama.cpp stores Llama 3's RoPE scaling as a tensor of divisors, not as the parameters.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    src_dir = write_random_model(tmp_path / "hf", "llama-9h", hidden_size=288, intermediate_size=64,
                                 max_position_embeddings=1024, rope_scaling=scaling, tie_word_embeddings=True)
    write_gguf(tmp_path / "m.gguf", src_dir)
    convert(tmp_path / "m.gguf", tmp_path / "out", tokenizer=False)
    assert load_config(str(tmp_path / "out")) == load_config(src_dir)
    assert load_config(src_dir).rope.scaling == "llama3"
    ids = list(range(1, 40, 3))
    assert np.abs(logits(str(tmp_path / "out"), ids) - logits(src_dir, ids)).max() <= 1e-12
    # An equivalent choice (every parameter but the factor doubled) gives the same divisors, hence the same model
    write_random_model(tmp_path / "hf2", "llama-9h", hidden_size=288, intermediate_size=64,
                       max_position_embeddings=1024, tie_word_embeddings=True, rope_scaling=dict(
                           scaling, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=512))
    write_gguf(tmp_path / "m2.gguf", tmp_path / "hf2")
    convert(tmp_path / "m2.gguf", tmp_path / "out2", tokenizer=False)
    assert load_config(str(tmp_path / "out2")) == load_config(src_dir)


@pytest.mark.parametrize("kind", TYPES)
def test_every_supported_tensor_type(tmp_path, kind):
    # SmolLM2's layout (9 query heads, 3 key/value heads) with sizes that are whole quantization blocks; for
    # the k-quants (blocks of 256) a wider model, whose matrices are random blocks (the gguf package cannot
    # quantize to them): checked against the gguf package's dequantization, not against the original.
    src_dir = write_random_model(tmp_path / "hf", "llama-9h", hidden_size=288, intermediate_size=64) \
        if kind not in K_QUANTS else write_random_model(tmp_path / "hf", "llama-large", intermediate_size=256,
                                                        num_hidden_layers=2)
    written = write_gguf(tmp_path / "m.gguf", src_dir, types=lambda name: kind)
    convert(tmp_path / "m.gguf", tmp_path / "out", tokenizer=False)
    converted = read_safetensors(tmp_path / "out" / "model.safetensors")
    original = read_safetensors(os.path.join(src_dir, "model.safetensors"))
    cfg = load_config(src_dir)
    tolerance = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q4_0": 0.2, "Q4_1": 0.2, "Q5_0": 0.1,
                 "Q5_1": 0.1}.get(kind)
    for name, (stored_kind, raw, shape) in written.items():
        hf = next(k for k in converted if llama_names(cfg.n_layer).get(k) == name)
        expected = dequantize(raw, stored_kind, shape)
        if ".attn_q." in name or ".attn_k." in name:
            expected = _inverse_permutation(expected, cfg.n_head if ".attn_q." in name else cfg.n_kv_head)
        assert np.array_equal(converted[hf], expected), name
        error = np.linalg.norm(converted[hf] - original[hf]) / np.linalg.norm(original[hf])
        assert stored_kind != "F32" and tolerance is None or error <= (tolerance if stored_kind == kind else 0), \
            (name, error)
    assert np.all(np.isfinite(logits(str(tmp_path / "out"), [1, 2, 3])))


@pytest.mark.parametrize("kind", TYPES)
def test_dequantization_is_the_gguf_packages_bit_for_bit(monkeypatch, kind):
    # Random blocks with extreme float16 scales (0, -0, the largest, the smallest subnormal, ...), dequantized
    # a few blocks at a time (a small chunk, so that the chunking is crossed), against the gguf package.
    from mpitp.tools import gguf_quants
    monkeypatch.setattr(gguf_quants, "_CHUNK", 512)
    block, size, _ = gguf_quants.TYPES[kind]
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]] == (block, size)
    rng = np.random.default_rng(7)
    if kind == "BF16":  # every bit pattern, NaNs included
        raw = rng.integers(0, 2**16, 5000, dtype=np.uint16).view(np.uint8)
    elif kind in ("F32", "F16"):
        values = np.concatenate([rng.standard_normal(3000) * 10.0 ** rng.integers(-8, 8, 3000), [0, -0.0, np.inf,
                                 -np.inf, 65504, -65504, 6e-8, np.finfo(np.float32).max, 1e-45]])
        with np.errstate(over="ignore"):  # float32's largest is inf in float16
            raw = values.astype(np.float32 if kind == "F32" else np.float16).view(np.uint8)
    else:
        raw = random_blocks(kind, 3001, rng, scales=(0, -0.0, 1, -1, 65504, -65504, 6e-8, 6.1e-5, 0.1, -3.7))
    got = gguf_quants.dequantize(raw.tobytes(), kind)
    want = np.asarray(gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[kind]), np.float32)
    assert got.dtype == np.float32 and got.size == raw.size // size * block
    assert np.array_equal(got.view(np.uint32), want.reshape(-1).view(np.uint32))
    if kind not in ("F32", "F16", "BF16"):
        assert np.isfinite(got).all() and np.abs(got).max() > 1e5  # the extreme scales are there


def _tiny_family(folder, family):
    """A tiny random model of ``family`` built with transformers' own class, saved in float32 with its norms
    random multiples of 1/64 (so that llama.cpp's 1 + w for Gemma and back is exact)."""
    transformers, torch = pytest.importorskip("transformers"), pytest.importorskip("torch")
    sizes = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=128, rms_norm_eps=1e-6)
    config = {"gemma3": lambda: transformers.Gemma3TextConfig(**sizes, num_hidden_layers=7, head_dim=32,
                                                              query_pre_attn_scalar=32, sliding_window=5),
              "qwen3": lambda: transformers.Qwen3Config(**sizes, num_hidden_layers=2, head_dim=24,
                                                        tie_word_embeddings=False),
              "qwen2": lambda: transformers.Qwen2Config(**sizes, num_hidden_layers=2, tie_word_embeddings=True)}
    config = config[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randint(-32, 33, p.shape) / 64 if "norm" in name else torch.randn(p.shape) * 0.2)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", ["gemma3", "qwen3", "qwen2"])
def test_families_against_transformers(tmp_path, family):
    # A model of each family through llama.cpp's GGUF layout (Gemma's norms + 1, no Q/K permutation) and back:
    # the same tensors, and transformers computes the same logits from the converted folder (12 tokens, beyond
    # Gemma's window of 5, whose layer 5 is global). transformers' own GGUF reading gives the same tensors.
    transformers, torch = pytest.importorskip("transformers"), pytest.importorskip("torch")
    model = _tiny_family(tmp_path / "hf", family)
    write_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    convert(tmp_path / "m.gguf", tmp_path / "out", tokenizer=False)
    original = read_safetensors(tmp_path / "hf" / "model.safetensors")
    converted = read_safetensors(tmp_path / "out" / "model.safetensors")
    assert set(converted) == set(original)
    for k in converted:
        assert np.array_equal(converted[k], original[k]), k
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    ids = torch.tensor([[5, 17, 250, 3, 99, 42, 7, 7, 128, 299, 1, 64]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, model(ids).logits)
    a, b = ours.config.to_dict(), model.config.to_dict()
    for key in ("head_dim", "layer_types", "sliding_window", "query_pre_attn_scalar", "rope_parameters",
                "hidden_activation", "hidden_act", "tie_word_embeddings", "num_key_value_heads"):
        assert a.get(key) == b.get(key), key
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    theirs = load_gguf_checkpoint(str(tmp_path / "m.gguf"), return_tensors=True, model_to_load=ours)["tensors"]
    for k in converted:
        assert np.array_equal(np.asarray(theirs[k], np.float32), converted[k]), k


def _inverse_permutation(stored, n_head):
    # The test's own inverse of permute_rows, by index: Hugging Face row i + j*d/2 is GGUF row 2i + j.
    d = stored.shape[0] // n_head
    out = np.empty_like(stored)
    for h in range(n_head):
        for i in range(d // 2):
            for j in (0, 1):
                out[h * d + i + j * d // 2] = stored[h * d + 2 * i + j]
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_output_float_types(tmp_path, dtype):
    write_gguf(tmp_path / "m.gguf", model_dir("llama-gqa"))
    convert(tmp_path / "m.gguf", tmp_path / "f32", tokenizer=False)
    assert main([str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--dtype", dtype, "--no-tokenizer", "--quiet"]) == 0
    header = _header(tmp_path / "out" / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16" if dtype == "float16" else "BF16"}
    full = read_safetensors(tmp_path / "f32" / "model.safetensors")
    for k, v in read_safetensors(tmp_path / "out" / "model.safetensors").items():
        want = full[k].astype(np.float16) if dtype == "float16" else (
            to_bf16_bits(full[k]).astype(np.uint32) << 16).view(np.float32)
        assert np.array_equal(v.astype(np.float32), want.astype(np.float32)), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == dtype
    ids = golden("llama-gqa")["prompt_L7"]
    assert np.abs(logits(str(tmp_path / "out"), ids) - logits(str(tmp_path / "f32"), ids)).max() < 0.1


def _header(path):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0  # data 8-byte aligned
    return json.loads(raw[8:8 + n])


# --- the tokenizer ------------------------------------------------------------------------------------------


def _tokenizer_meta(folder, pre="gpt-2"):
    """The GGUF tokenizer metadata of a folder's byte-level BPE tokenizer.json."""
    t = json.loads(open(os.path.join(folder, "tokenizer.json"), encoding="utf-8").read())
    vocab = dict(t["model"]["vocab"], **{a["content"]: a["id"] for a in t["added_tokens"]})
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[k] for k in tokens] == list(range(len(tokens)))
    special = {a["content"]: 3 if a["special"] else 4 for a in t["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in t["model"]["merges"]]
    return {"tokens": tokens, "merges": merges, "token_type": [special.get(k, 1) for k in tokens], "pre": pre}


def _trained_tokenizer(folder, style):
    """A byte-level BPE tokenizer trained here on a little text, split before the merges as ``style`` says,
    with two control tokens and one user-defined token; saved as ``folder/tokenizer.json``."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers, decoders

    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style != "llama-bpe")
    split = {"gpt-2": level,
             "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), level]),
             "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(
                 r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+"), "isolated"), level])}[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = split, decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [t * 3 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog 0123456789 " * 5,
                                       "    indented code\n\t\ttabbed   spaced\n\n\n", "2024 1999 123456 3.14"] * 3
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    tok = Tokenizer(models.BPE(model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                                for m in model["merges"]], ignore_merges=style == "llama-bpe"))
    tok.pre_tokenizer, tok.decoder = split, decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in
                            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return tok


@pytest.mark.parametrize("style", ["gpt-2", "smollm", "llama-bpe"])
def test_tokenizer_round_trip(tmp_path, style):
    original = _trained_tokenizer(tmp_path / "tok", style)
    n_vocab = original.get_vocab_size()
    hf = write_random_model(tmp_path / "hf", "llama-9h", vocab_size=n_vocab, tie_word_embeddings=True)
    meta = _tokenizer_meta(str(tmp_path / "tok"), pre=style)
    assert sum(t == 3 for t in meta["token_type"]) == 3 and sum(t == 4 for t in meta["token_type"]) == 1
    write_gguf(tmp_path / "m.gguf", hf, tokenizer=dict(meta, bos=1, eos=2, chat_template="{{ messages }}"))
    convert(tmp_path / "m.gguf", tmp_path / "out")
    ours = Tokenizer(str(tmp_path / "out"), bos_token_id=1)  # mpitp's own reading of the folder
    for text in TEXTS + ["<think>why</think> 12345 x"]:
        ids = original.encode(text).ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == original.decode(ids)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert config["chat_template"] == "{{ messages }}"
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {"bos_token_id": 1,
                                                                                     "eos_token_id": 2}


def test_add_bos_token(tmp_path):
    _trained_tokenizer(tmp_path / "tok", "llama-bpe")
    meta = _tokenizer_meta(str(tmp_path / "tok"), pre="llama-bpe")
    hf = write_random_model(tmp_path / "hf", "llama-9h", vocab_size=len(meta["tokens"]))
    write_gguf(tmp_path / "m.gguf", hf, tokenizer=dict(meta, bos=0, eos=2, add_bos=True))
    convert(tmp_path / "m.gguf", tmp_path / "out")
    from tokenizers import Tokenizer as HFTokenizer
    raw = HFTokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert raw.encode("hello there").ids[0] == 0 and raw.encode("").ids == [0]
    assert Tokenizer(str(tmp_path / "out"), bos_token_id=0).encode("hello") == raw.encode("hello").ids


SP_WORDS = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "\u2581hello", "\u2581w", "or",
            "\u2581wor", "ld", "\u2581world"]


def _gemma3_sentencepiece(tmp_path):
    """A Gemma 3 GGUF file with a small SentencePiece vocabulary as llama.cpp writes Gemma's: control tokens,
    user-defined "\\n" and two spaces (spelled with real spaces), 256 byte tokens, then the pieces in merge
    order with falling scores; no merges. Returns (path, {token: id}); the weights are random."""
    from st_util import write_safetensors
    from mpitp.tools.gguf_model import hf_shapes
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
    types = [3] * 6 + [4, 4] + [6] * 256 + [1] * len(SP_WORDS)
    tokens += [f"<0x{b:02X}>" for b in range(256)] + SP_WORDS
    scores = [-1000.0] * 8 + [0.0] * 256 + [-float(i) for i in range(len(SP_WORDS))]
    cfg = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 64,
           "rms_norm_eps": 1e-6, "sliding_window": 8, "vocab_size": len(tokens), "tie_word_embeddings": True}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    write_safetensors(tmp_path / "hf" / "model.safetensors", {k: rng.standard_normal(v).astype(np.float32)
                                                              for k, v in hf_shapes("gemma3", cfg).items()})
    write_gguf(tmp_path / "m.gguf", tmp_path / "hf", tokenizer=dict(
        model="llama", tokens=tokens, token_type=types, scores=scores, bos=2, eos=1, add_bos=True))
    return tmp_path / "m.gguf", {t.replace(" ", "\u2581"): i for i, t in enumerate(tokens)}


def test_gemma3_sentencepiece_tokenizer(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    src, ids = _gemma3_sentencepiece(tmp_path)
    convert(src, tmp_path / "out")
    tok = HFTokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    byte = lambda b: ids[f"<0x{b:02X}>"]  # noqa: E731
    expected = {  # worked by hand: spaces are "\u2581", the piece earlier in the vocabulary merges first
        "hello world": ["hello", "\u2581world"], " hello": ["\u2581hello"],
        "hello  world": ["hello", "\u2581\u2581", "w", "or", "ld"],  # the two spaces merge before "\u2581w"
        "h\u00e9\n": ["h", 0xC3, 0xA9, "\n"], "x": [0x78],  # bytes where the vocabulary has no piece
        "<start_of_turn>hello<end_of_turn>": ["<start_of_turn>", "hello", "<end_of_turn>"], "": []}
    for text, pieces in expected.items():
        want = [ids["<bos>"]] + [byte(p) if isinstance(p, int) else ids[p] for p in pieces]
        assert tok.encode(text).ids == want, text
        assert tok.decode(want, skip_special_tokens=True) == text.replace("<start_of_turn>", "").replace(
            "<end_of_turn>", "")
    assert Tokenizer(str(tmp_path / "out"), bos_token_id=2).encode("hello world") == tok.encode("hello world").ids
    assert tok.id_to_token(7) == "\u2581\u2581" and tok.token_to_id("  ") is None  # spelled as Gemma's own
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in list(expected) + TEXTS + ["  hello   world  ", "\n\n hello\n"]:
        assert theirs(text)["input_ids"] == tok.encode(text).ids, text


def test_transformers_loads_the_converted_folders(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    for name in ("llama-gqa", "gpt2-tiny"):
        write_gguf(tmp_path / f"{name}.gguf", model_dir(name), tokenizer=_tokenizer_meta(model_dir(name)))
        convert(tmp_path / f"{name}.gguf", tmp_path / name)
        ids = torch.tensor([golden(name)["prompt_L33"].tolist()])
        with torch.no_grad():
            out, want = (transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)(ids).logits
                         for folder in (str(tmp_path / name), model_dir(name)))
        assert torch.equal(out, want)  # the same weights and config: the same computation
        tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
        ours = Tokenizer(str(tmp_path / name))
        for text in TEXTS[:-2]:
            assert tok(text)["input_ids"] == ours.encode(text), (name, text)


# --- bad input: one line, status 2, nothing written ---------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.gguf"
    write_gguf(path, model_dir("llama-gqa"), tokenizer=_tokenizer_meta(model_dir("llama-gqa")))
    return path


def _fails(capsys, tmp_path, src, *words, args=(), out="out"):
    out = tmp_path / out
    assert run(src, out, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mpitp.convert: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    return err


def test_truncated_files(capsys, tmp_path, good):
    data = good.read_bytes()
    for cut in (0, 10, 23, 40, 200, 2000, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        _fails(capsys, tmp_path, tmp_path / "cut.gguf", str(tmp_path / "cut.gguf"))


def test_bad_headers(capsys, tmp_path, good):
    data = good.read_bytes()
    cases = {b"GGUX" + data[4:]: "not the GGUF magic", data[:4] + (1).to_bytes(4, "little") + data[8:]: "version 1",
             data[:4] + (3 << 24).to_bytes(4, "little") + data[8:]: "big-endian",
             data[:8] + (2**60).to_bytes(8, "little") + data[16:]: "more than the",
             data[:16] + (2**62).to_bytes(8, "little") + data[24:]: "more than the"}
    for blob, words in cases.items():
        (tmp_path / "bad.gguf").write_bytes(blob)
        _fails(capsys, tmp_path, tmp_path / "bad.gguf", words)


def test_bad_metadata_and_tensors(capsys, tmp_path):
    hf = model_dir("llama-gqa")
    U32 = gguf.GGUFValueType.UINT32
    cases = [({"meta": {"general.architecture": ("falcon", None)}},
              ["architecture 'falcon'", "llama, qwen2, qwen3, gemma3, gpt2"]),
             ({"drop": ["llama.block_count"]}, ["'llama.block_count' is missing"]),
             ({"meta": {"llama.block_count": ("two", None)}}, ["'llama.block_count' must be an integer, got STRING"]),
             ({"meta": {"llama.attention.head_count": (0, U32)}}, ["positive integer"]),
             ({"meta": {"llama.block_count": (3, U32)}}, ["blk.2.", "missing"]),
             ({"drop": ["blk.1.ffn_up.weight"]}, ["blk.1.ffn_up.weight", "missing"]),
             ({"types": lambda n: "IQ4_NL" if n == "blk.0.attn_v.weight" else "F32"},
              ["blk.0.attn_v.weight", "IQ4_NL", "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K"]),
             ({"extra": {"blk.0.attn_x.weight": (np.ones((2, 4), np.float32), "F32")}}, ["blk.0.attn_x.weight"]),
             ({"extra": {"rope_freqs.weight": (np.array([1, 2, 1, 3], np.float32), "F32")}},
              ["rope_freqs.weight", "Llama 3"]),
             ({"meta": {"llama.rope.scaling.type": ("linear", None)}}, ["RoPE scaling 'linear'"]),
             ({"extra": {"blk.01.attn_q.weight": (np.ones((64, 64), np.float32), "F32")}}, ["blk.01.attn_q"]),
             ({"meta": {"llama.rope.dimension_count": (4, U32)}}, ["partial rotary"]),
             ({"meta": {"tokenizer.ggml.pre": ("qwen2", None)}, "tok": True}, ["'qwen2'", "--no-tokenizer"]),
             ({"meta": {"tokenizer.ggml.merges": (["Ġ t", "x"], None)}, "tok": True},
              ["merge", "tokenizer.ggml.merges"])]
    for i, (kw, words) in enumerate(cases):
        src = tmp_path / f"bad{i}.gguf"
        tok = _tokenizer_meta(hf) if kw.pop("tok", False) else None
        if kw.get("types"):  # IQ4_NL needs whole blocks of 32: a model whose matrices are
            hf_q = write_random_model(tmp_path / "hf32", "llama-9h", hidden_size=288, intermediate_size=64)
            write_gguf(src, hf_q, **kw)
        else:
            write_gguf(src, hf, tokenizer=tok, **kw)
        _fails(capsys, tmp_path, src, str(src), *words, args=[] if tok else ["--no-tokenizer"])


def _patched(data, at, code, value):
    return data[:at] + struct.pack(code, value) + data[at + struct.calcsize(code):]


def test_tensor_data_that_overlaps_shifts_or_lies_about_its_type(capsys, tmp_path, good):
    # Each of these converted with exit 0 into a wrong model (issue 21): k_proj holding q_proj's bytes, all
    # tensors shifted by the tensor count minus one, an offset with one bit flipped, F32 bytes read as F16.
    data, fields = good.read_bytes(), tensor_fields(good)
    q, k = "blk.0.attn_q.weight", "blk.0.attn_k.weight"
    cases = [(_patched(data, fields[k][1], "<Q", fields[q][2]), [q, k, "overlaps"]),
             (_patched(data, 8, "<Q", len(fields) - 1), ["tensor count"]),
             (_patched(data, fields[k][0], "<I", int(gguf.GGMLQuantizationType.F16)), [k, "F16", "unaccounted"]),
             (data + bytes(32), ["unaccounted", "tensor count, 21"])]
    for bit in (2, 5, 9, 14, 40):  # below the alignment, overlapping, leaving a hole, past the end of the file
        cases.append((_patched(data, fields[k][1], "<Q", fields[k][2] ^ 1 << bit), [k]))
    for i, (blob, words) in enumerate(cases):
        (tmp_path / f"bad{i}.gguf").write_bytes(blob)
        _fails(capsys, tmp_path, tmp_path / f"bad{i}.gguf", *words)


def test_padding_that_is_not_zero_is_refused(capsys, tmp_path):
    # A 4-value F32 tensor re-typed F16 still fits the 32-byte alignment gap: its last 8 bytes, now "padding",
    # are not the 0x00 the GGUF specification puts there.
    src = tmp_path / "m.gguf"
    write_gguf(src, model_dir("llama-gqa"), extra={"tiny.weight": (np.ones(4, np.float32), "F32")})
    fields = tensor_fields(src)
    src.write_bytes(_patched(src.read_bytes(), fields["tiny.weight"][0], "<I", int(gguf.GGMLQuantizationType.F16)))
    _fails(capsys, tmp_path, src, "not all 0x00", args=["--no-tokenizer"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_weights_that_are_not_finite_are_refused(capsys, tmp_path, good, bad):
    start = gguf.GGUFReader(str(good)).data_offset + tensor_fields(good)["blk.1.ffn_up.weight"][2]
    (tmp_path / "bad.gguf").write_bytes(_patched(good.read_bytes(), start + 40, "<f", bad))  # an F32 tensor
    _fails(capsys, tmp_path, tmp_path / "bad.gguf", "blk.1.ffn_up.weight", "not finite")


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@serial_only
@pytest.mark.parametrize("fails_on", ["tokenizer.json", "model.safetensors"])
def test_a_file_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, good, fails_on):
    # A full disk was "unexpected error", exit 1: tokenizers' Tokenizer.save raises its own Exception. A limit
    # on the size of a file makes the write fail as a full disk does (an OSError, EFBIG instead of ENOSPC),
    # without root, through the real libraries.
    assert run(good, tmp_path / "ref", "--quiet") == 0
    sizes = {f: os.path.getsize(tmp_path / "ref" / f) for f in os.listdir(tmp_path / "ref")}
    limit = max(v for v in sizes.values() if v < sizes[fails_on]) + 1  # the files written before it fit
    out = tmp_path / "sub" / "out"
    (tmp_path / "sub").mkdir()
    done = subprocess.run([sys.executable, "-m", "mpitp.convert", str(good), str(out)], capture_output=True,
                          text=True, timeout=60, env=child_env(), cwd=str(REPO), preexec_fn=_limit_file_size(limit))
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr == f"mpitp.convert: error: {out}: cannot be written (File too large).\n"
    assert os.listdir(tmp_path / "sub") == []


def test_output_folder_rules(capsys, tmp_path, good):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert run(good, tmp_path / "out") == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert run(good, tmp_path / "empty", "--quiet") == 0  # an empty folder is replaced
    assert sorted(os.listdir(tmp_path / "empty")) == ["config.json", "generation_config.json", "model.safetensors",
                                                       "tokenizer.json", "tokenizer_config.json"]
    missing = tmp_path / "nope.gguf"
    assert "cannot be opened" in _fails(capsys, tmp_path, missing, str(missing), out="other")


def test_nothing_half_written_when_a_late_tensor_fails(capsys, tmp_path):
    # A value float16 cannot hold, in the last tensor written: the error comes after the other files were
    # written, and the partial folder is removed.
    big = np.full((2, 64), 1e6, np.float32)
    hf = model_dir("llama-gqa")
    write_gguf(tmp_path / "m.gguf", hf, extra={})
    src = tmp_path / "m.gguf"
    tensors = read_safetensors(os.path.join(hf, "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].copy()
    tensors["lm_head.weight"][:2] = big
    from st_util import write_safetensors
    (tmp_path / "hf").mkdir()
    for f in ("config.json", "generation_config.json"):
        (tmp_path / "hf" / f).write_text(open(os.path.join(hf, f)).read())
    write_safetensors(tmp_path / "hf" / "model.safetensors", tensors)
    write_gguf(src, tmp_path / "hf")
    _fails(capsys, tmp_path, src, "output.weight", "float16", args=["--dtype", "float16", "--no-tokenizer"])


@serial_only
def test_cli_truncated_file_one_line_exit_2_fast(tmp_path, good):
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 100])
    cmd = [sys.executable, "-m", "mpitp.convert", str(tmp_path / "cut.gguf"), str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=child_env(), cwd=str(REPO))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "truncated" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    help_ = subprocess.run(cmd[:3] + ["--help"], capture_output=True, text=True, timeout=60, env=child_env())
    assert help_.returncode == 0 and "--dtype" in help_.stdout and "--no-tokenizer" in help_.stdout


def test_missing_libraries_are_clear_errors(capsys, tmp_path, good, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    _fails(capsys, tmp_path, good, "'tokenizers'", "mpitp[gguf]", "--no-tokenizer")
    monkeypatch.setitem(sys.modules, "gguf", None)
    _fails(capsys, tmp_path, good, "'gguf' package", "pip install 'mpitp[gguf]'")


def test_errors_are_mpitp_errors(tmp_path, good):
    with pytest.raises(CheckpointError, match="not the GGUF magic"):
        (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(40))
        convert(tmp_path / "x.gguf", tmp_path / "out")
    with pytest.raises(MpitpError, match="dtype"):
        convert(good, tmp_path / "out", dtype="int8")
