"""The generate command: ``mpirun -n 2 python -m mpitp.generate [options]``.

Every rank parses its arguments, loads its shard and validates the request, then the ranks vote and compare
(``mpitp.cli.runner``). Only rank 0 writes to stdout: the text (streamed as it is generated), the ids, or with
``--json`` one JSON object. Diagnostics and timings go to stderr.
"""

import hashlib
import json
import os
import sys
import time

import numpy as np

from .. import comm as mpi
from .runner import (HelpFormatter, RankParser, add_comm_dtype, add_experts_option, add_pp_layers, add_run_options,
                     check_stdout, check_threads, check_writable, comma_ints, disagree, failed_vote, out,
                     prepare_and_agree, removed_if_killed, run_command, say, stage_count)
from ..errors import MpitpError, RequestError
from ..generation import check_request, generate_batch, new_batch_cache
from ..model import DTYPES, FINGERPRINTED, Model
from ..pipeline import generate_stages
from ..stages import check_stage_count, split_stages
from ..sampling import Sampler
from ..resources import check_fits, set_blas_threads
from ..tokenizer import Tokenizer
from ..trace import Trace, temporary_name
from ..weights import n_params

# The bundled model: a tiny GPT-2 trained to sort digits (scripts/train_default_model.py), so that a first
# run shows answers anyone can check. Without --prompt it answers these.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "digit-sorter")
DEFAULT_PROMPTS = ["sort:4721=", "sort:90210=", "sort:31415926=", "sort:8675309="]
MAX_NEW_TOKENS_CAP = 256  # without --max-new-tokens: the rest of the context, at most this many


def build_parser():
    p = RankParser(prog="mpitp-generate" if sys.argv[0].endswith("mpitp-generate") else "python -m mpitp.generate",
                description="Generate tokens with a tensor-parallel transformer split over the MPI ranks (run "
                            "under mpirun -n P; without mpirun it runs on one rank).",
                formatter_class=HelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="DIR",
                   help="Hugging Face model folder (config.json + model.safetensors or an index and shards); "
                        "default: the tiny digit-sorting GPT-2 shipped with mpitp")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a text prompt, encoded with the model's tokenizer.json (needs the 'text' extra); repeat "
                        "it for a batch. Default for the bundled model: " + ", ".join(DEFAULT_PROMPTS))
    p.add_argument("--prompt-ids", type=comma_ints, action="append", metavar="IDS",
                   help="a prompt as comma-separated token ids, e.g. 15,7,201; repeat it for a batch")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"tokens to generate at most per prompt (default: what the context leaves, at most "
                        f"{MAX_NEW_TOKENS_CAP})")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 means greedy (the most likely token, lowest id on ties)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample only from the K likeliest tokens; 0: all")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample only from the most likely tokens whose probabilities sum to P; 1: all")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (rank 0 samples, all ranks follow)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="compute dtype; weights are cast to it at load (float64 is the reference mode)")
    add_experts_option(p)
    add_comm_dtype(p)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the model's end-of-sequence token")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (ids, text, ranks, dtype, timing) instead of text")
    p.add_argument("--no-stream", action="store_true",
                   help="print a single prompt's text when it is complete instead of token by token")
    p.add_argument("--trace", metavar="DIR", default=None,
                   help="every rank writes DIR/rank{r}.npz with its tensors A,Q,K,V,B,C,D,E per step and layer "
                        "and the logits (with several prompts, their rows stacked in order)")
    p.add_argument("--pp", type=int, default=1, metavar="S",
                   help="pipeline stages: the ranks form S stages of (ranks / S) tensor-parallel ranks each, stage s "
                        "holding a contiguous range of layers (on a cluster: S = the number of nodes)")
    add_pp_layers(p)
    return add_run_options(p)


def _say(args, rank, message):
    if rank == 0 and not args.quiet:
        say(f"mpitp: {message}")


def _stages(args, comm):
    """With --pp or --pp-layers: this stage's tensor-parallel communicator (timed) and its ``StageGroup``, made
    once every rank agrees on the layout (a ``Split`` where some ranks are not would hang); None without; the
    exit status 2 when a rank differs or the rank count cannot form the stages (told once)."""
    if disagree(comm, [("--pp", args.pp), ("--pp-layers", args.pp_layers)], "mpitp"):
        return 2
    pp = stage_count(args)
    if pp == 1 and not args.pp_layers:
        return None
    error = None
    try:
        check_stage_count(comm.Get_size(), pp)
    except MpitpError as e:
        error = e
    if failed_vote(comm, error, "mpitp"):
        return 2
    tp, group = split_stages(comm, pp)
    return mpi.TimedComm(tp), group


def _prepare(args, comm, node_ranks, stages=None):
    """Everything that bad input can fail, with no communication: load, validate, allocate the KV cache,
    ready the trace folder."""
    check_threads(args.threads)
    if args.prompt and args.prompt_ids:
        raise RequestError("give the prompts either as text (--prompt) or as token ids (--prompt-ids), not both.")
    if args.trace == "":
        raise RequestError("--trace needs a folder name; leave the option out for no trace.")
    if comm.Get_rank() == 0:
        check_stdout()
    for text in args.prompt or ():
        if not text:
            raise RequestError("a prompt is empty; give some text to continue.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that were not UTF-8 reach Python as lone surrogates
            raise RequestError(f"a prompt is not valid UTF-8 (byte {ord(text[e.start]) & 0xFF:#04x} at character "
                               f"{e.start}); give text in UTF-8, or --prompt-ids.") from None
    model = Model.load(args.model, stages[0] if stages else comm, args.dtype, node_ranks=node_ranks,
                       pp=stages[1] if stages else 1, pp_layers=args.pp_layers, experts=args.experts,
                       comm_dtype=args.comm_dtype)
    texts = args.prompt
    if not args.prompt_ids and not texts:
        if os.path.abspath(args.model) != DEFAULT_MODEL:
            raise RequestError("no prompt: give --prompt TEXT (or --prompt-ids IDS).")
        texts = DEFAULT_PROMPTS
    tokenizer = None
    if texts or (args.json and os.path.exists(os.path.join(args.model, "tokenizer.json"))):
        try:
            tokenizer = Tokenizer(args.model, model.config.bos_token_id)
        except MpitpError:
            if texts:
                raise
    prompts = [tokenizer.encode(text) for text in texts] if texts else args.prompt_ids
    longest, max_new = max(len(p) for p in prompts), args.max_new_tokens
    if max_new is None and longest > model.config.n_ctx:
        raise RequestError(f"the prompt ({longest} tokens) is longer than the model's context of {model.config.n_ctx}.")
    if max_new is None:
        max_new = min(MAX_NEW_TOKENS_CAP, model.config.n_ctx - longest)
    prompts = check_request(model, prompts, max_new)
    cache = new_batch_cache(model, prompts, max_new)
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    if args.trace:  # created once every rank agrees to go on
        check_writable(os.path.join(args.trace, f"rank{comm.Get_rank()}.npz"), f"--trace {args.trace}")
        cfg, s = model.config, model.shard  # the trace keeps A..E of every layer and the logits, of every row
        width = len(model.blocks) * (3 * cfg.n_embd + 2 * cfg.d_head * (s.n_head_local + s.n_kv_head_local)
                                     + s.n_ffn_local)  # a stage's layers only
        rows = sum(len(p) for p in prompts) + len(prompts) * max_new
        check_fits(2 * rows * (width + s.n_vocab_local) * np.dtype(model.dtype).itemsize,  # 2: its final copies
                   f"--trace of {rows} tokens", "trace fewer or shorter prompts, or use more ranks", node_ranks)
    return model, tokenizer, texts, prompts, max_new, sampler, cache


class _Printer:
    """Rank 0's stdout: one text prompt streams token by token (a cut character is held back until whole);
    otherwise each prompt's whole line at the end."""

    def __init__(self, args, rank, tokenizer, texts):
        self.stream = rank == 0 and texts is not None and len(texts) == 1 and not args.json and not args.no_stream
        self.step, self.printed = (tokenizer.stream() if self.stream else None), ""
        if self.stream:
            out(texts[0], end="")

    def on_token(self, index, token):
        piece = self.step(token) if self.stream else ""
        if piece:
            out(piece, end="")
            self.printed += piece

    def finish(self, text):
        # whatever the stream held back, then the end of the line (never expected: the whole text again)
        out(text[len(self.printed):] if text.startswith(self.printed) else "\n" + text)


def _agreement(args, model, prompts, max_new):
    """What every rank must share, as (what, value) pairs: the model it loaded and the whole request. Each rank
    parses its own command line and is compared (not told by rank 0), so a mistaken launch is refused."""
    ids = hashlib.sha256(b"".join(np.int64(len(p)).tobytes() + p.tobytes() for p in prompts)).hexdigest()[:16]
    return [(FINGERPRINTED, model.fingerprint), ("prompt token ids (digest)", ids), ("--max-new-tokens", max_new),
            ("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p),
            ("--seed", args.seed), ("--dtype", args.dtype), ("--experts", model.shard.experts),
            ("--comm-dtype", args.comm_dtype),
            ("--ignore-eos", args.ignore_eos),
            ("--trace (given or not)", bool(args.trace))]


def _print_results(args, printer, results, texts, tokenizer, header, timing):
    """Rank 0's stdout once every sequence is done: one JSON object, the end of the streamed text, or each
    prompt's text (or ids), a blank line between two (a continuation can span lines)."""
    decoded = [tokenizer.decode(r.token_ids) if tokenizer else None for r in results]
    if args.json:
        sequences = [{"prompt_ids": r.prompt_ids, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                      **({"prompt": texts[i] if texts else tokenizer.decode(r.prompt_ids), "text": decoded[i]}
                         if tokenizer else {})} for i, r in enumerate(results)]
        out(json.dumps({**header, "sequences": sequences, "timing": timing}))
    elif printer.stream:
        printer.finish(decoded[0])
    else:
        out("\n\n".join(texts[i] + decoded[i] if texts else f"prompt ids:    {' '.join(map(str, r.prompt_ids))}\n"
                          f"generated ids: {' '.join(map(str, r.token_ids))}" for i, r in enumerate(results)))


def _layout(model):
    s = model.stage  # "; pipeline: 2 stages of 2 ranks, layers 5,7"
    return f"; pipeline: {s.count} stages of {s.tp} rank{'s' if s.tp > 1 else ''}, layers " \
           f"{','.join(map(str, s.counts))}" if s else ""


def _run(args, comm, node_ranks):
    rank, size = comm.Get_rank(), comm.Get_size()
    t_load = time.perf_counter()
    comm = mpi.TimedComm(comm)  # times the model's Allreduce calls
    stages = _stages(args, comm)
    if stages == 2:
        return 2
    prepared = prepare_and_agree(comm, lambda: _prepare(args, comm, node_ranks, stages),
                                 lambda p: _agreement(args, p[0], p[3], p[4]), "mpitp")
    if prepared is None:
        return 2
    model, tokenizer, texts, prompts, max_new, sampler, cache = prepared
    load_seconds = time.perf_counter() - t_load
    timed = stages[0] if stages else comm  # the model's communicator (its stage's, with --pp), timed
    sent_before = timed.sent  # the votes' reductions are not the run's
    threads, warning = set_blas_threads(args.threads, node_ranks)
    if warning:
        _say(args, rank, warning)
    cfg = model.config
    _say(args, rank, f"loaded {args.model} ({cfg.model_type}, {n_params(cfg) / 1e6:.2f}M params) on {size} "
                     f"rank{'s' if size > 1 else ''} in {load_seconds:.2f} s; dtype {args.dtype}; "
                     f"BLAS threads per rank: {threads if threads is not None else 'unknown'}; "
                     f"MPI: {mpi.library_version()}" + _layout(model))
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
    trace = Trace(args.model) if args.trace else None
    printer = _Printer(args, rank, tokenizer, texts)
    # A float overflow makes garbage that can still look finite (a norm of inf is 0): rank 0 (of each pipeline
    # stage), which every NaN or inf reaches through the Allreduce, refuses the first one; the others stay quiet.
    try:
        with np.errstate(over="raise", invalid="raise") if model.comm.Get_rank() == 0 else np.errstate(all="ignore"):
            generate = generate_stages if model.stage else generate_batch  # --pp: mpitp.pipeline
            results = generate(model, prompts, max_new, sampler, () if args.ignore_eos else cfg.eos_token_ids,
                               trace, on_token=printer.on_token, cache=cache)
    except FloatingPointError as e:
        raise RequestError(f"the model's activations overflow {args.dtype} ({e}); try --dtype float64, or check "
                           "the checkpoint.") from None
    if trace is not None:
        path = os.path.join(args.trace, f"rank{rank}.npz")
        with removed_if_killed(temporary_name(path)) as temporary:  # even if a signal ends the rank mid-write
            trace.save(path, temporary)
    allreduce_s, allreduce_bytes = mpi.max_over_ranks(comm, timed.seconds), timed.sent - sent_before
    if rank != 0:
        return 0
    t = results[0].timing
    timing = {"prefill_tokens_per_s": t.prefill_tokens_per_s, "decode_tokens_per_s": t.decode_tokens_per_s,
              "prefill_seconds": t.prefill_seconds, "decode_seconds": t.decode_seconds,
              "allreduce_seconds": allreduce_s, "allreduce_bytes": allreduce_bytes, "load_seconds": load_seconds}
    _print_results(args, printer, results, texts, tokenizer, {"model": args.model, "model_type": cfg.model_type,
                                                              "ranks": size, "dtype": args.dtype,
                                                              "pp": model.stage.count if model.stage else 1,
                                                              "comm_dtype": args.comm_dtype or args.dtype}, timing)
    _say_timing(args, results, allreduce_s, size)
    return 0


def _say_timing(args, results, allreduce_s, size):
    """Rank 0's timing line on stderr (and where the trace went)."""
    t = results[0].timing
    rate = lambda x: f"{x:.1f} tok/s" if x is not None else "n/a"  # noqa: E731
    _say(args, 0, f"prefill: {len(results)} prompt(s), {t.prefill_tokens} tokens, {t.prefill_seconds * 1e3:.1f}"
                  f" ms ({rate(t.prefill_tokens_per_s)}); decode: {t.decode_tokens} tokens after each prompt's "
                  f"first, {t.decode_seconds * 1e3:.1f} ms ({rate(t.decode_tokens_per_s)}); Allreduce: "
                  f"{allreduce_s * 1e3:.1f} ms in the calls, waits for other ranks included (the rank with most);"
                  f" finish: {', '.join(r.finish_reason for r in results)}")
    if args.trace:
        _say(args, 0, f"trace written to {os.path.join(args.trace, 'rank{r}.npz')} for r = 0..{size - 1}")


def main(argv=None):
    """Entry point; returns the process exit status (0 ok, 2 bad input, 1 unexpected error)."""
    return run_command(build_parser, _run, "mpitp", argv)  # a missing mpi4py is one line too (comm.MPIUnavailable)


if __name__ == "__main__":
    sys.exit(main())
