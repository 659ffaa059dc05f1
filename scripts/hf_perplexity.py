"""Hugging Face's perplexity of a model folder on a text, in llama-perplexity's protocol: an independent check
of ``python -m mpitp.perplexity`` (its own tokenizer, model and log-softmax; nothing from mpitp).

    python scripts/hf_perplexity.py --model DIR --file TEXT --ctx 128 --chunks 6   # prints one JSON object

Needs the hf extra (torch, transformers). Computes in float64.
"""

import argparse
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=None)
    args = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float64).eval()
    with open(args.file, encoding="utf-8") as f:
        ids = tokenizer(f.read())["input_ids"]  # what the tokenizer adds by default, as llama-perplexity does
    n_chunks = min(args.chunks or len(ids), len(ids) // args.ctx)
    add_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
    first, nll = args.ctx // 2, []
    with torch.no_grad():
        for c in range(n_chunks):
            chunk = torch.tensor(ids[c * args.ctx:(c + 1) * args.ctx])
            if add_bos:
                chunk[0] = tokenizer.bos_token_id
            logits = model(chunk[None]).logits[0]
            log_probs = torch.log_softmax(logits[first:-1], dim=-1)
            nll += (-log_probs.gather(1, chunk[first + 1:, None])[:, 0]).tolist()
    mean = sum(nll) / len(nll)
    print(json.dumps({"ppl": math.exp(mean), "nll_mean": mean, "n_scored": len(nll), "n_chunks": n_chunks,
                      "n_tokens": len(ids)}))


if __name__ == "__main__":
    main()
