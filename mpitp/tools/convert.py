"""The convert command: ``python -m mpitp.convert SRC.gguf OUT_DIR`` writes a Hugging Face model folder.

A tool beside the reference package (it needs the ``gguf`` extra: ``gguf`` and ``tokenizers``). It reads a
GGUF file (``mpitp.gguf_reader``) and writes ``config.json``, ``generation_config.json``, ``model.safetensors``
(float32, or float16 / bfloat16 on request), and ``tokenizer.json`` with ``tokenizer_config.json`` built with
the ``tokenizers`` library from the file's tokenizer metadata. mpitp and transformers both load the folder.

``mpitp.gguf_model`` says what the file's model is in Hugging Face's terms and ``mpitp.gguf_tokenizer``
rebuilds its tokenizer.
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time

import numpy as np

from ..config import config_from_dict
from ..cli.runner import HelpFormatter, run_guarded, say
from ..errors import CheckpointError, MpitpError
from .gguf_model import NAMES, hf_config, hf_tensors
from .gguf_reader import GGUFFile, shown
from .gguf_tokenizer import build_tokenizer

CHECKED_BY_MPITP = ("gpt2", "llama", "qwen2", "qwen3", "gemma3")  # architectures whose model_type mpitp's core reads today
DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}


def _bf16_bits(a):
    """float32 -> bfloat16 bit patterns, rounded to nearest even (NaN stays NaN)."""
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), (bits >> 16).astype(np.uint16) | 0x40, rounded)


def write_safetensors(path, tensors, dtype, src):
    """Write ``[(name, shape, read, source name)]`` as one safetensors file of ``dtype``, one tensor at a time."""
    code, itemsize = DTYPES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, *_ in tensors:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, read, source in tensors:
            a = np.ascontiguousarray(read(), dtype=np.float32)
            assert a.shape == tuple(shape), (name, a.shape, shape)
            if not np.isfinite(a).all():  # refused here, naming the GGUF tensor, not when the folder is loaded
                raise CheckpointError(src, source, f"has {a.size - np.isfinite(a).sum()} values that are not "
                                      "finite (NaN or inf) once dequantized; the file is damaged, or the model "
                                      "diverged in training.")
            if dtype == "float16":
                with np.errstate(over="ignore"):
                    a16 = a.astype(np.float16)
                if np.any(np.isinf(a16) & np.isfinite(a)):
                    raise CheckpointError(src, source, "values beyond float16's range (65504); use --dtype float32 "
                                                       "or bfloat16.")
                a = a16
            elif dtype == "bfloat16":
                a = _bf16_bits(a)
            f.write(memoryview(a).cast("B"))


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


class OutputError(MpitpError):
    """OUT_DIR cannot be written."""


def convert(src, out_dir, dtype="float32", tokenizer=True):
    """Convert the GGUF file ``src`` into the Hugging Face model folder ``out_dir`` (which must not exist, or be
    empty). Everything is checked before anything is written; the folder is written under a temporary name
    beside ``out_dir`` and renamed when complete. Returns a summary dict."""
    src, out_dir = str(src), os.path.abspath(str(out_dir))
    if dtype not in DTYPES:
        raise OutputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    g = GGUFFile(src)
    arch = g.get("general.architecture", "str")
    if arch not in NAMES:
        raise CheckpointError(src, None, f"architecture '{shown(arch)}' is not supported; supported: "
                                         f"{', '.join(NAMES)}.")
    if "token_embd.weight" not in g.infos:
        raise CheckpointError(src, "token_embd.weight", "tensor is missing.")
    n_vocab = g.shape("token_embd.weight")[0]
    config = hf_config(g, arch, g.infos.__contains__, n_vocab)
    config = {k: v for k, v in config.items() if v is not None}
    layers = config.get("n_layer", config.get("num_hidden_layers"))
    if layers > len(g.infos):
        raise CheckpointError(src, None, f"metadata '{arch}.block_count' is {layers}, more layers than the file "
                                         f"has tensors ({len(g.infos)}).")
    if arch in CHECKED_BY_MPITP:  # mpitp's own reading of config.json must accept what it will load
        config_from_dict(config, f"{src} (its metadata as config.json)")
    tensors = hf_tensors(g, arch, config)
    n_ctx = config.get("n_positions", config.get("max_position_embeddings"))
    tok = build_tokenizer(g, n_vocab, n_ctx) if tokenizer else None
    eot = config.pop("eot_token_id", None)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    if eot is not None and eot != generation.get("eos_token_id", eot):
        generation["eos_token_id"] = [generation["eos_token_id"], eot]
    if os.path.lexists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise OutputError(f"{out_dir}: already exists and is not an empty folder; give a new folder.")
    parent = os.path.dirname(out_dir)
    # Named before it exists, and made inside the clean-up's reach: Ctrl-C or SIGTERM at any point after the
    # mkdir (even inside it) finds the folder to remove. The handlers ignore a repeated signal during the removal.
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        try:
            os.makedirs(parent, exist_ok=True)
            os.mkdir(tmp, 0o700)
        except OSError as e:
            raise OutputError(f"{parent}: cannot create the output folder there ({e.strerror or e}).") from None
        _write_json(os.path.join(tmp, "config.json"), {**config, "torch_dtype": dtype})
        _write_json(os.path.join(tmp, "generation_config.json"), generation)
        if tok is not None:
            with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
                f.write(tok[0].to_str(pretty=True))  # not Tokenizer.save: a full disk is an OSError here
            _write_json(os.path.join(tmp, "tokenizer_config.json"), tok[1])
        write_safetensors(os.path.join(tmp, "model.safetensors"), tensors, dtype, src)
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty: checked above
        os.rename(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{out_dir}: cannot be written ({e.strerror or e}).") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(math.prod(shape) for _, shape, *_ in tensors)
    return {"model_type": arch, "params": n_params, "bytes": n_params * DTYPES[dtype][1],
            "tokens": None if tok is None else tok[0].get_vocab_size()}


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mpitp.convert", formatter_class=HelpFormatter,
                                description="Convert a GGUF file (llama.cpp's format; Llama, Qwen2, Qwen3, "
                                            "Gemma 3 and GPT-2 architectures) into a Hugging Face model folder "
                                            "that mpitp and transformers load. Needs the 'gguf' extra.")
    p.add_argument("src", metavar="SRC.gguf", help="the GGUF file; tensors may be F32, F16, BF16, Q8_0, Q4_0, "
                   "Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the model folder to write; it must not exist yet (or be "
                   "empty). It is written under a temporary name beside it and renamed when complete")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="float type of model.safetensors (float32 holds every dequantized value exactly)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="write no tokenizer.json (for a tokenizer the converter cannot build; mpitp then takes "
                        "--prompt-ids)")
    p.add_argument("--quiet", action="store_true", help="print nothing on stderr except errors")
    p.add_argument("--verbose", action="store_true", help="print full tracebacks for errors")
    return p


def main(argv=None):
    """Entry point; returns the exit status (0 ok, 2 bad input, 1 unexpected error, 130/143 interrupted)."""
    args = build_parser().parse_args(argv)
    # SIGTERM and Ctrl-C unwind through convert's clean-up: a kill leaves no partial folder either. No communicator,
    # so no watchdog: nothing can hang in a collective, and the clean-up is never cut short by a hard exit.
    return run_guarded(None, lambda: _run(args), args.verbose, "mpitp.convert")


def _run(args):
    t0 = time.perf_counter()
    done = convert(args.src, args.out_dir, args.dtype, not args.no_tokenizer)
    if not args.quiet:
        tokens = f"{done['tokens']} tokens" if done["tokens"] else "no tokenizer"
        say(f"mpitp.convert: wrote {args.out_dir} ({done['model_type']}, {done['params'] / 1e6:.2f}M parameters, "
            f"{args.dtype}, {done['bytes'] / 2**20:.1f} MiB; {tokens}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
