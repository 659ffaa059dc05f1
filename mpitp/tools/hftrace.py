"""A trace of Hugging Face transformers' own modules: ``python -m mpitp.hftrace MODEL_DIR OUT --prompt-ids IDS``.

Runs the model folder with transformers (unsharded, one process, greedy, ``--max-new-tokens`` tokens per prompt
and no stop at end-of-sequence) and writes ``OUT/rank0.npz`` in the trace format of docs/trace.md: the same
named tensors as ``mpitp.generate --trace``, read from transformers' modules through forward hooks. Then
``python -m mpitp.compare MPITP_TRACE OUT`` compares mpitp with Hugging Face tensor by tensor, and any engine
that writes the format can be compared with Hugging Face the same way.

Where each tensor comes from (layer ``l`` of ``transformer.h`` for GPT-2, of ``model.layers`` for Llama, Mistral
and Qwen2; "output" is a forward hook, "input" a forward pre-hook):

=====  ===============================================  ==================================================
name   GPT-2                                            Llama family
=====  ===============================================  ==================================================
A      ``ln_1`` output                                  ``input_layernorm`` output
Q K V  ``attn.c_attn`` output, cut in three             ``q_proj``, ``k_proj`` outputs rotated by the model's
                                                        own ``apply_rotary_pos_emb`` with the (cos, sin)
                                                        ``self_attn`` received; ``v_proj`` output
B      ``attn.c_proj`` input                            ``self_attn.o_proj`` input
C      ``ln_2`` output                                  ``post_attention_layernorm`` output
D      ``mlp.c_proj`` input (after gelu)                ``mlp.down_proj`` input (silu(gate) * up)
E      the block's output                               the decoder layer's output
=====  ===============================================  ==================================================

``logits`` are the model's output. torch and transformers are the optional ``hf`` extra (``pip install
'mpitp[hf]'``): imported only here, when this runs; mpitp itself never imports them.
"""

import argparse
import hashlib
import os
import sys

import numpy as np

from ..cli.runner import HelpFormatter, run_guarded, say
from ..errors import MpitpError, read_regular
from ..cli.runner import comma_ints

PROG = "mpitp.hftrace"
# model_type -> (where the layers are, module names inside a layer); Mistral and Qwen2 are Llama's names.
_LLAMA = ("model.layers", {"A": "input_layernorm", "Q": "self_attn.q_proj", "K": "self_attn.k_proj",
                           "V": "self_attn.v_proj", "B": "self_attn.o_proj", "C": "post_attention_layernorm",
                           "D": "mlp.down_proj", "rope": "self_attn"})
_GPT2 = ("transformer.h", {"A": "ln_1", "QKV": "attn.c_attn", "B": "attn.c_proj", "C": "ln_2", "D": "mlp.c_proj"})
FAMILIES = {"gpt2": _GPT2, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}
INPUTS = ("B", "D")  # read from a module's input (a pre-hook); the rest from outputs


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mpitp.hftrace", formatter_class=HelpFormatter,
                                description="Write a trace of a Hugging Face model run by transformers itself "
                                            "(unsharded), in mpitp's trace format, for python -m mpitp.compare.")
    p.add_argument("model", metavar="MODEL_DIR", help="Hugging Face model folder (config.json and weights) of a "
                                                      f"GPT-2 or Llama-family model ({', '.join(FAMILIES)})")
    p.add_argument("out", metavar="OUT", help="the trace folder to write; OUT/rank0.npz is created")
    p.add_argument("--prompt-ids", type=comma_ints, action="append", required=True, metavar="IDS",
                   help="a prompt as comma-separated token ids, e.g. 15,7,201; repeat it for several prompts "
                        "(each runs alone; their rows are stacked in order, as in mpitp's trace)")
    p.add_argument("--max-new-tokens", type=int, default=1, metavar="N",
                   help="greedy tokens per prompt (lowest id on ties, no stop at end-of-sequence: compare with "
                        "mpitp.generate --ignore-eos); the trace has N steps, the prefill and N-1 decode steps "
                        "(default: 1, the prefill only)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                   help="the dtype transformers loads the weights in and computes with")
    p.add_argument("--attn-implementation", choices=["sdpa", "eager"], default="sdpa",
                   help="transformers' attention: sdpa (torch's scaled_dot_product_attention, in the model's dtype) "
                        "or eager (its own matmuls; Llama's eager softmax computes in float32)")
    p.add_argument("--verbose", action="store_true", help="print full tracebacks for errors")
    return p


def _import_hf():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MpitpError(f"needs torch and transformers, the 'hf' extra: pip install 'mpitp[hf]' ({e}).") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


def _load(args):
    """The model in eval mode and its config.json's bytes; every bad input is an ``MpitpError``."""
    if args.max_new_tokens < 1:
        raise MpitpError(f"--max-new-tokens must be >= 1 (the prefill is step 0), got {args.max_new_tokens}.")
    config_path = os.path.join(args.model, "config.json")
    config_bytes = read_regular(config_path)
    torch, transformers = _import_hf()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                                  attn_implementation=args.attn_implementation)
    except Exception as e:  # noqa: BLE001 -- transformers raises many types for a bad folder; one line each
        raise MpitpError(f"{args.model}: transformers cannot load it: {str(e).strip().splitlines()[0]}") from None
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise MpitpError(f"{args.model}: model_type '{model_type}' has no hook map here; hftrace knows "
                    f"{', '.join(FAMILIES)}.")
    n_vocab, n_ctx = model.config.vocab_size, model.config.max_position_embeddings
    for ids in args.prompt_ids:
        bad = [i for i in ids if i >= n_vocab]
        if bad:
            raise MpitpError(f"token id {bad[0]} is outside the vocabulary 0..{n_vocab - 1} of {args.model}.")
        if len(ids) + args.max_new_tokens > n_ctx:  # as mpitp.generate counts
            raise MpitpError(f"the prompt ({len(ids)} tokens) plus max-new-tokens ({args.max_new_tokens}) is "
                        f"{len(ids) + args.max_new_tokens} tokens, more than the model's context of {n_ctx}.")
    return torch, transformers, model.eval(), config_bytes


class Hooks:
    """Forward hooks on every layer that keep the named tensors of the last forward, ``[rows, width]``."""

    def __init__(self, model):
        self.seen = {}
        where, self.family = FAMILIES[model.config.model_type]
        self.layers = model.get_submodule(where)
        for l, layer in enumerate(self.layers):
            for name, path in self.family.items():
                module = layer.get_submodule(path)
                if name == "rope":  # Llama: the (cos, sin) the attention receives, to rotate q_proj and k_proj
                    module.register_forward_pre_hook(self._keep_kwarg(l), with_kwargs=True)
                elif name in INPUTS:
                    module.register_forward_pre_hook(self._keep(l, name, lambda args, out: args[0]))
                else:
                    module.register_forward_hook(self._keep(l, name, lambda args, out: out))
            layer.register_forward_hook(self._keep(l, "E", lambda args, out: out))

    def _keep(self, l, name, pick):
        def hook(module, args, out=None):
            value = pick(args, out)
            self.seen[l, name] = value[0] if isinstance(value, tuple) else value
        return hook

    def _keep_kwarg(self, l):
        def hook(module, args, kwargs):
            self.seen[l, "rope"] = (module, kwargs["position_embeddings"])
        return hook

    def tensors(self, l):
        """Layer ``l``'s A..E of the last forward (batch of one sequence) as ``[rows, width]`` arrays."""
        seen, out = self.seen, {}
        if "QKV" in self.family:  # GPT-2's fused c_attn: [Q | K | V], each n_embd wide
            out["Q"], out["K"], out["V"] = seen[l, "QKV"].chunk(3, dim=-1)
        else:
            attn, (cos, sin) = seen[l, "rope"]
            rows, d_head = seen[l, "Q"].shape[1], attn.head_dim
            q, k = (seen[l, x].view(1, rows, -1, d_head).transpose(1, 2) for x in "QK")  # [1, heads, rows, d]
            q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
            out["Q"], out["K"], out["V"] = q.transpose(1, 2), k.transpose(1, 2), seen[l, "V"]
        out.update({x: seen[l, x] for x in "ABCDE"})
        return {x: v.detach().reshape(v.shape[1], -1).numpy().copy() for x, v in out.items()}  # [1, rows, ..]


def trace_arrays(torch, model, prompts, max_new_tokens):
    """The trace of greedy generation from each prompt, as the dict of arrays ``rank0.npz`` holds."""
    hooks = Hooks(model)
    steps = [[] for _ in range(max_new_tokens)]  # per step, per prompt: {name: [rows, width]}
    with torch.no_grad():
        for prompt in prompts:
            ids, cache = list(prompt), None
            for s in range(max_new_tokens):
                feed = ids if s == 0 else ids[-1:]
                out = model(input_ids=torch.tensor([feed]), cache=cache, use_cache=True)
                cache = out.cache
                row = {f"layer{l}/{x}": v for l in range(len(hooks.layers)) for x, v in hooks.tensors(l).items()}
                row["logits"] = out.logits[0].detach().numpy().copy()
                row["tokens"] = np.array([[t, len(ids) - len(feed) + i] for i, t in enumerate(feed)], dtype=np.int64)
                steps[s].append(row)
                ids.append(int(torch.argmax(out.logits[0, -1])))  # the first maximum: lowest id on ties
    arrays = {f"step{s}/{key}": np.concatenate([row[key] for row in rows])
              for s, rows in enumerate(steps) for key in rows[0]}
    d_head = int(hooks.layers[0].get_submodule("attn" if "QKV" in hooks.family else "self_attn").head_dim)
    n_head, n_kv_head = (arrays[f"step0/layer0/{x}"].shape[1] // d_head for x in "QK")
    shard = {"rank": 0, "size": 1, "d_head": d_head, "group": n_head // n_kv_head, "head_start": 0,
             "n_head_local": n_head, "kv_head_start": 0, "n_kv_head_local": n_kv_head, "ffn_start": 0,
             "n_ffn_local": arrays["step0/layer0/D"].shape[1], "vocab_start": 0,
             "n_vocab_local": arrays["step0/logits"].shape[1]}
    arrays.update({f"shard/{k}": np.int64(v) for k, v in shard.items()})
    return arrays


def _run(args):
    torch, transformers, model, config_bytes = _load(args)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise MpitpError(f"{args.out}: cannot create the trace folder ({e.strerror}).") from None
    arrays = trace_arrays(torch, model, args.prompt_ids, args.max_new_tokens)
    arrays["format/version"] = np.int64(1)
    arrays["meta/config_sha256"] = np.array(hashlib.sha256(config_bytes).hexdigest())
    if args.dtype == "float64" and FAMILIES[model.config.model_type] is _LLAMA:  # compare's tolerance follows it
        arrays["meta/precision"] = np.array("float32")  # LlamaRMSNorm and the RoPE tables compute in float32
    arrays["meta/engine"] = np.array(f"transformers {transformers.__version__} (torch {torch.__version__}, "
                                     f"{model.config._attn_implementation} attention, {args.dtype})")
    path = os.path.join(args.out, "rank0.npz")
    try:
        np.savez(path, **arrays)
    except OSError as e:
        raise MpitpError(f"{path}: cannot write it ({e.strerror}).") from None
    say(f"{PROG}: {len(args.prompt_ids)} prompt(s), {args.max_new_tokens} step(s) of {args.model} by "
        f"{arrays['meta/engine']} written to {path}")
    return 0


def main(argv=None):
    """Entry point; returns the exit status (0 written, 2 bad input, 1 unexpected error)."""
    args = build_parser().parse_args(argv)
    return run_guarded(None, lambda: _run(args), args.verbose, PROG)


if __name__ == "__main__":
    sys.exit(main())
