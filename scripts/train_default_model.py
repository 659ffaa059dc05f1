"""Train mpitp's bundled default model: a tiny GPT-2 that sorts digits ("sort:4721=" -> "1247").

The model must show, at a glance, that generation works: anyone can check a sorted string. It is trained
with PyTorch (the `train` extra; mpitp itself never needs it) and written as a Hugging Face GPT-2 folder
(config.json, model.safetensors, tokenizer.json, generation_config.json) that mpitp loads like any other.

    pip install -e ".[train]"
    python scripts/train_default_model.py            # writes mpitp/models/digit-sorter/

Everything is seeded; on this project's 2-core machine the 4,000 steps took 636 s (2026-11-28, sharing the
machine with other work) and the run ends with the held-out accuracy it measured, 200/200 that time (mpitp's
own test suite measures it again, through mpitp).
"""

import argparse
import json
import math
import os
import random
import struct
import sys
import time

import numpy as np


def parse_args():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join(here, "..", "mpitp", "models", "digit-sorter"),
                   help="the model folder to write")
    p.add_argument("--steps", type=int, default=4000, help="training steps")
    p.add_argument("--batch", type=int, default=128, help="sequences per step")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    return p.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before importing torch: --help and argument errors work without it
try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("scripts/train_default_model.py: error: training needs PyTorch, which is not installed: "
             "pip install -e '.[train]'")

EOS = 256  # "<|endoftext|>", after the 256 byte tokens
VOCAB = 257
MAX_DIGITS = 12
N_CTX = 32  # "sort:" + 12 digits + "=" + 12 digits + eos = 31
CONFIG = {"n_embd": 128, "n_head": 4, "n_layer": 3}


def sample(rng, max_digits=MAX_DIGITS):
    n = rng.randint(1, max_digits)
    digits = "".join(rng.choice("0123456789") for _ in range(n))
    return f"sort:{digits}=", "".join(sorted(digits))


def held_out(n=400, seed=12345):
    """Prompts and answers for evaluation, from a generator the training never uses."""
    rng = random.Random(seed)
    return [sample(rng) for _ in range(n)]


def encode(prompt, answer):
    ids = list(prompt.encode()) + list(answer.encode()) + [EOS]
    return ids, len(prompt)


class GPT2(torch.nn.Module):
    """GPT-2 with Hugging Face's tensor names and layouts (Conv1D weights are [in, out])."""

    def __init__(self, n_embd, n_head, n_layer):
        super().__init__()
        self.n_head = n_head
        p = {}  # Hugging Face names -> parameters (registered under names without dots below)
        p["wte.weight"] = torch.nn.Parameter(torch.randn(VOCAB, n_embd) * 0.02)
        p["wpe.weight"] = torch.nn.Parameter(torch.randn(N_CTX, n_embd) * 0.01)
        for i in range(n_layer):
            for ln in ("ln_1", "ln_2"):
                p[f"h.{i}.{ln}.weight"] = torch.nn.Parameter(torch.ones(n_embd))
                p[f"h.{i}.{ln}.bias"] = torch.nn.Parameter(torch.zeros(n_embd))
            for name, (n_in, n_out) in {"attn.c_attn": (n_embd, 3 * n_embd), "attn.c_proj": (n_embd, n_embd),
                                        "mlp.c_fc": (n_embd, 4 * n_embd), "mlp.c_proj": (4 * n_embd, n_embd)}.items():
                scale = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj") else 0.02
                p[f"h.{i}.{name}.weight"] = torch.nn.Parameter(torch.randn(n_in, n_out) * scale)
                p[f"h.{i}.{name}.bias"] = torch.nn.Parameter(torch.zeros(n_out))
        p["ln_f.weight"] = torch.nn.Parameter(torch.ones(n_embd))
        p["ln_f.bias"] = torch.nn.Parameter(torch.zeros(n_embd))
        for name, param in p.items():
            self.register_parameter(name.replace(".", "__"), param)
        self.p, self.n_layer, self.n_embd = p, n_layer, n_embd

    def forward(self, ids):
        p, (b, t), d = self.p, ids.shape, self.n_embd
        x = p["wte.weight"][ids] + p["wpe.weight"][:t]
        for i in range(self.n_layer):
            a = F.layer_norm(x, (d,), p[f"h.{i}.ln_1.weight"], p[f"h.{i}.ln_1.bias"], 1e-5)
            qkv = a @ p[f"h.{i}.attn.c_attn.weight"] + p[f"h.{i}.attn.c_attn.bias"]
            q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in qkv.split(d, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + y @ p[f"h.{i}.attn.c_proj.weight"] + p[f"h.{i}.attn.c_proj.bias"]
            c = F.layer_norm(x, (d,), p[f"h.{i}.ln_2.weight"], p[f"h.{i}.ln_2.bias"], 1e-5)
            h = F.gelu(c @ p[f"h.{i}.mlp.c_fc.weight"] + p[f"h.{i}.mlp.c_fc.bias"], approximate="tanh")
            x = x + h @ p[f"h.{i}.mlp.c_proj.weight"] + p[f"h.{i}.mlp.c_proj.bias"]
        x = F.layer_norm(x, (d,), p["ln_f.weight"], p["ln_f.bias"], 1e-5)
        return x @ p["wte.weight"].T


def batch(rng, size):
    rows, starts = zip(*(encode(*sample(rng)) for _ in range(size)))
    ids = torch.full((size, N_CTX), EOS, dtype=torch.long)
    loss_mask = torch.zeros((size, N_CTX - 1))
    for r, (row, start) in enumerate(zip(rows, starts)):
        ids[r, :len(row)] = torch.tensor(row)
        loss_mask[r, start - 1:len(row) - 1] = 1  # predict the answer and the eos, not the prompt
    return ids, loss_mask


@torch.no_grad()
def accuracy(model, cases):
    model.eval()
    correct = 0
    for prompt, answer in cases:
        ids = list(prompt.encode())
        while len(ids) < N_CTX:
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt == EOS:
                break
            ids.append(nxt)
        correct += bytes(ids[len(prompt):]).decode(errors="replace") == answer
    model.train()
    return correct / len(cases)


def byte_to_unicode():
    """GPT-2's reversible map from bytes to printable characters, used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_folder(model, out):
    os.makedirs(out, exist_ok=True)
    tensors = {f"transformer.{k}": v.detach().numpy().astype(np.float32) for k, v in model.p.items()}
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name]).tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt", "producer": "mpitp scripts/train_default_model.py"}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "n_embd": CONFIG["n_embd"], "n_head": CONFIG["n_head"], "n_layer": CONFIG["n_layer"],
              "n_positions": N_CTX, "vocab_size": VOCAB, "layer_norm_epsilon": 1e-5, "bos_token_id": EOS,
              "eos_token_id": EOS, "tie_word_embeddings": True,
              "task": "sort the digits: 'sort:4721=' -> '1247'"}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": EOS, "eos_token_id": EOS}, f, indent=2)
    chars = byte_to_unicode()
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": EOS, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {**{chars[b]: b for b in range(256)}, "<|endoftext|>": EOS}, "merges": []},
    }
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)


def main(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    rng = random.Random(args.seed)
    model = GPT2(**CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.98))
    lr = lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * s / args.steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr)
    t0 = time.time()
    for step in range(args.steps):
        ids, mask = batch(rng, args.batch)
        logits = model(ids[:, :-1])
        loss = (F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
                * mask.reshape(-1)).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f} s", flush=True)
    acc = accuracy(model, held_out(200))
    print(f"held-out accuracy (PyTorch, 200 prompts): {acc:.3f}; training took {time.time() - t0:.0f} s")
    write_folder(model, args.out)
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main(ARGS)
